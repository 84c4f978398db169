"""A served teacher: teacher outputs from an inference server, in the form a teacher cache gives them.

:class:`ServedTeacher` ties a running OpenAI-compatible server (vLLM) to the
teacher point of a distill function that holds the teacher's logits, and
turns each batch of token sequences into a :class:`~funcdistill.cache.TeacherOutputs`
whose value there is a :class:`~funcdistill.cache.TopK`, exactly as a top-k
teacher cache's read gives it: ``fn(served(ids, mask), student_state, ...)``.
"""

from __future__ import annotations

from typing import Any

import torch

from funcdistill._distill import DistillFn
from funcdistill._frozen import Frozen, init
from funcdistill._keys import display, point_key
from funcdistill._outputs import BuiltFor, TeacherOutputs, TopK
from funcdistill.served import _response, _tokens
from funcdistill.served._client import Client

__all__ = ["ServedTeacher"]


class ServedTeacher(Frozen):
    """The top-k log-probabilities of a teacher served by vLLM, as teacher outputs for a distill function.

    ``ServedTeacher(fn, url, model=..., topk=k)`` is made once; each call
    ``served(input_ids, attention_mask)`` sends the batch's token sequences
    (without padding) to ``POST {url}/v1/completions`` in one request and
    returns a :class:`~funcdistill.cache.TeacherOutputs` that ``fn`` takes in
    place of the teacher state, as it takes a top-k cache's read: its value at
    ``fn``'s teacher point is a :class:`~funcdistill.cache.TopK` of shape
    ``(batch, tokens, k)``, position ``t`` holding ``log_softmax`` of the
    teacher's logits at ``t`` (the distribution of token ``t + 1``) at its
    ``k`` largest entries, largest first, and its ``mask`` is ``True`` at the
    real tokens. Padded places hold ``-inf`` log-probabilities (empty slots)
    and index 0; pass ``mask=outputs.mask`` to the loss. The log-probabilities
    are the server's raw ones (temperature 1), in float32.

    ``fn``'s mapping must read one teacher point, the one holding the logits:
    the teacher's output (``""``) or its output embedding (``lm_head``). The
    teacher itself never runs, so it may be built on the ``meta`` device (no
    memory); nothing of its state is checked against the server's model,
    whose name is checked in each answer instead.

    Args:
        fn: the distill function whose teacher the server serves.
        url: the server's base URL, such as ``http://127.0.0.1:8000`` (a
            trailing ``/v1`` is accepted).
        model: the served model's name (vLLM's ``--served-model-name``, by
            default the ``--model`` it was started with).
        topk: ``k``, the log-probabilities kept per token; the server must be
            started with ``--max-logprobs`` at least ``k`` (vLLM's default is 20).
        timeout: seconds to wait for a connection and for each answer.
        retries: how many times a refused or reset connection, a timeout or
            an HTTP 500, 502, 503 or 504 is retried before it raises.
        backoff: the retries wait ``backoff * 2 ** (n - 1)`` seconds before the
            ``n``-th retry after the first (urllib3's schedule; the first is
            immediate), or what a ``Retry-After`` header says.

    Raises:
        TypeError: ``fn`` is not a distill function.
        ValueError: ``fn``'s mapping reads a teacher point other than the
            logits, or several; a bad ``url``, ``topk``, ``timeout``,
            ``retries`` or ``backoff``.

    A call raises ``ConnectionError`` when nothing answers at ``url`` (with the
    command that starts a server), ``TimeoutError`` when it does not answer in
    time, and :class:`~funcdistill.served.ServerError` for an HTTP error (a
    model it does not serve, naming those it does; ``k`` above its
    ``--max-logprobs``) or an answer that does not fit the request (another
    model name, another number of sequences or positions, fewer than ``k``
    log-probabilities at a position): never zeros in place of a value.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import funcdistill as fd
        >>> from funcdistill.served import ServedTeacher
        >>> teacher, student = nn.Embedding(50, 50), nn.Embedding(50, 50)
        >>> served = ServedTeacher(fd.distill(teacher, student), "http://127.0.0.1:8000", model="tiny", topk=8)
        >>> served
        ServedTeacher('http://127.0.0.1:8000', model='tiny', topk=8, point='')
    """

    __slots__ = ("url", "model", "topk", "timeout", "retries", "backoff", "built_for", "_client")
    _immutable_name = "a served teacher"
    _immutable_hint = " Make another ServedTeacher for other settings."
    url: str
    model: str
    topk: int
    timeout: float
    retries: int
    backoff: float
    built_for: BuiltFor
    _client: Client

    def __init__(
        self,
        fn: DistillFn,
        url: str,
        *,
        model: str,
        topk: int,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
    ):
        if not isinstance(fn, DistillFn):
            raise TypeError(f"ServedTeacher takes a distill function (funcdistill.distill), got {type(fn).__name__}.")
        base = _base(url)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be the served model's name (a non-empty str), got {model!r}.")
        topk, retries = _count("topk", topk, 1), _count("retries", retries, 0)
        timeout, backoff = _seconds("timeout", timeout, positive=True), _seconds("backoff", backoff, positive=False)
        point = _logits_point(fn)
        built_for = BuiltFor(base, (point_key(point),), None, model=model)
        built_for.positions(fn)  # the check a call would make, now
        client = Client(base, timeout=timeout, retries=retries, backoff=backoff)
        init(
            self,
            url=base,
            model=model,
            topk=topk,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            built_for=built_for,
            _client=client,
        )

    def __call__(self, input_ids: Any, attention_mask: torch.Tensor | None = None) -> TeacherOutputs:
        """The teacher outputs of a batch: a list of 1-D id tensors, or padded ``(batch, tokens)`` ids and their mask.

        A list is padded on the right to its longest sequence; padded ids keep
        their layout. The answer's ``mask`` is the real tokens' places.
        """
        batch = _tokens.batch(input_ids, attention_mask)
        answer = self._client.post("/v1/completions", _response.request(self.model, batch.prompts, self.topk))
        rows = _response.topk_rows(answer, batch.prompts, self.topk, model=self.model, url=self.url)
        logprobs = _tokens.scatter(batch, [v for v, _ in rows], float("-inf"))
        indices = _tokens.scatter(batch, [i for _, i in rows], 0)
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu")
        return TeacherOutputs((TopK(logprobs, indices),), self.built_for, batch.mask).to(device)

    def __repr__(self) -> str:
        return f"ServedTeacher({self.url!r}, model={self.model!r}, topk={self.topk}, point={self.built_for.points[0]})"


def _logits_point(fn: DistillFn) -> Any:
    """The one teacher point of ``fn``, checked to hold the logits: ``""`` or the output embedding's name."""
    teacher = fn.teacher_model
    getter = getattr(teacher, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    head_name = next((n for n, m in teacher.named_modules() if head is not None and m is head), None)
    allowed = {point_key(""): "''"} | ({point_key(head_name): repr(head_name)} if head_name else {})
    points = fn.teacher_points
    wrong = [p for p in points if point_key(p) not in allowed]
    if len(points) != 1 or wrong:
        shown = ", ".join(display(point_key(p)) for p in points)
        raise ValueError(
            f"a served teacher gives the top-k log-probabilities of the teacher's logits only, but this distill "
            f"function's mapping reads the teacher at {shown}. Map one teacher point holding the logits: "
            f"{' or '.join(allowed.values())} (the teacher's output or its output embedding)."
        )
    return points[0]


def _base(url: Any) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must be an http(s) URL such as 'http://127.0.0.1:8000', got {url!r}.")
    base = url.rstrip("/")
    return base.removesuffix("/v1")


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}.")
    return value


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    if not ok or (positive and value == 0):
        raise ValueError(
            f"{name} must be a {'positive' if positive else 'non-negative'} number of seconds, got {value!r}."
        )
    return float(value)
