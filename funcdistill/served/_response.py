"""vLLM's completions answer with prompt log-probabilities, read back as per-token top-k tensors.

A request for prompts of ``T`` tokens with ``prompt_logprobs=k``,
``logprobs=k`` and ``max_tokens=1`` answers, per prompt (``choices[i]``, by
its ``index``):

- ``prompt_logprobs``: ``T`` entries, ``null`` first; entry ``t`` holds the
  distribution that *predicts* token ``t``, made from the logits at position
  ``t - 1``: ``{"<id>": {"logprob", "rank", ...}}`` with the top ``k`` and the
  actual token (``k + 1`` entries when it is not among them);
- ``logprobs.top_logprobs[0]``: the distribution after the last token, from
  the logits at position ``T - 1``, which ``prompt_logprobs`` does not hold:
  ``{"token_id:<id>": logprob}`` (with ``return_tokens_as_token_ids``).

So the teacher's logits at position ``t`` are ``prompt_logprobs[t + 1]`` for
``t < T - 1`` and the generated token's ``top_logprobs`` at ``T - 1``: every
position a live teacher's ``log_softmax(logits)`` has, in order. Each keeps
exactly the ``k`` most likely tokens (by rank, then value), largest first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from funcdistill.served._errors import ServerError

__all__: list[str] = []


def request(model: str, prompts: Sequence[list[int]], k: int) -> dict[str, Any]:
    """The ``/v1/completions`` body asking for the top-``k`` log-probabilities at every position of each prompt.

    Example:
        >>> body = request("tiny", [[5, 6, 7]], 4)
        >>> body["prompt"], body["prompt_logprobs"], body["logprobs"], body["max_tokens"]
        ([[5, 6, 7]], 4, 4, 1)
    """
    return {
        "model": model,
        "prompt": [list(p) for p in prompts],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": k,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }


def topk_rows(
    answer: dict[str, Any], prompts: Sequence[list[int]], k: int, *, model: str, url: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, the ``(T, k)`` float32 log-probabilities and int64 indices at each position, largest first."""
    where = f"the served teacher at {url}"
    answered = answer.get("model")
    if answered != model:
        raise ServerError(
            f"{where} answered for model {answered!r}, but model {model!r} was asked for: another server may be "
            f"listening there. Pass model={answered!r} if that is the teacher, or the URL of the server of {model!r}."
        )
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) != len(prompts):
        got = len(choices) if isinstance(choices, list) else type(choices).__name__
        raise ServerError(
            f"{where} answered {got} choices for {len(prompts)} prompts; one choice per prompt is expected "
            "(an OpenAI-compatible completions server with n=1)."
        )
    by_index = {c.get("index") if isinstance(c, dict) else None: c for c in choices}
    if sorted(by_index, key=str) != sorted(range(len(prompts)), key=str):
        raise ServerError(
            f"{where} answered choices with indices {sorted(map(str, by_index))}, not one per prompt 0..{len(prompts) - 1}."
        )
    return [_row(by_index[i], len(p), k, where=f"{where}, prompt {i}") for i, p in enumerate(prompts)]


def _row(choice: dict[str, Any], length: int, k: int, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = choice.get("prompt_logprobs")
    if not isinstance(prompt, list) or len(prompt) != length:
        got = f"{len(prompt)} positions" if isinstance(prompt, list) else f"prompt_logprobs={prompt!r}"[:80]
        raise ServerError(
            f"{where} of {length} tokens: the answer has {got}, not one per token; ask a server that returns "
            "prompt_logprobs (vLLM's OpenAI-compatible server)."
        )
    last = (choice.get("logprobs") or {}).get("top_logprobs")
    if not isinstance(last, list) or not last or not isinstance(last[0], dict):
        raise ServerError(
            f"{where}: the answer has no log-probabilities after the last token (choices[i].logprobs.top_logprobs); "
            "ask a server that returns them for logprobs=k (vLLM's OpenAI-compatible server)."
        )
    positions = [_prompt_entry(prompt[t], t - 1, k, where) for t in range(1, length)]
    positions.append(_generated_entry(last[0], length - 1, k, where))
    values = torch.tensor([[v for _, _, v in p] for p in positions], dtype=torch.float32).reshape(length, k)
    indices = torch.tensor([[i for _, i, _ in p] for p in positions], dtype=torch.int64).reshape(length, k)
    return values, indices


Entry = tuple[float, int, float]  # (rank, token id, log-probability)


def _prompt_entry(entry: Any, position: int, k: int, where: str) -> list[Entry]:
    if not isinstance(entry, dict):
        raise ServerError(f"{where}, position {position}: expected a dict of log-probabilities, got {entry!r:.80}.")
    try:
        found = [(float(e.get("rank") or math.inf), int(key), float(e["logprob"])) for key, e in entry.items()]
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ServerError(f"{where}, position {position}: unreadable log-probabilities ({error}).") from None
    return _top(found, position, k, where)


def _generated_entry(entry: dict[str, Any], position: int, k: int, where: str) -> list[Entry]:
    try:
        found = [(math.inf, int(str(key).removeprefix("token_id:")), float(v)) for key, v in entry.items()]
    except (TypeError, ValueError) as error:
        raise ServerError(
            f"{where}, position {position}: token keys are not ids ({error}); the request asks for "
            "return_tokens_as_token_ids, which the server must support."
        ) from None
    return _top(found, position, k, where)


def _top(found: list[Entry], position: int, k: int, where: str) -> list[Entry]:
    """The ``k`` most likely entries, largest first; an actual token outside the top ``k`` (rank > k) is dropped."""
    ranked = sorted(found, key=lambda e: (-e[2], e[0]))
    top = [e for e in ranked if e[0] == math.inf or e[0] <= k][:k]
    if len(top) < k or any(math.isnan(v) for _, _, v in top):
        raise ServerError(
            f"{where}, position {position}: {len(top)} top log-probabilities where topk={k} were asked for "
            f"({len(found)} entries); the server must return the top k at every position (vLLM does; is it "
            "started with --max-logprobs >= k?)."
        )
    return top
