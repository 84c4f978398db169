"""Token samples: sequences of token ids of any length, and the one way they are padded into a batch.

A *token sample* is a 1-D integer tensor of token ids, or a dict with
``input_ids`` (a 1-D integer tensor or a list of ints) and optionally an
``attention_mask`` of ones then zeros (a sample already padded on the right:
its real tokens are the first ``attention_mask.sum()``). :func:`pad_tokens`
pads a batch of them on the right to its longest sample, with token id
``pad_id`` (0 by default), and makes the attention mask. A teacher cache
built from token samples pads each batch with it, and training collates the
student's batch with it too, so cached outputs and the student's line up
token for token. With right padding the real tokens come first in every row,
so a causal model's outputs at the real tokens never see the padding (whatever
the pad id); a bidirectional one needs the attention mask.

:func:`teacher_call` is how a cache build calls the teacher on a padded batch:
``input_ids`` by keyword when ``forward`` has a parameter of that name (the
``transformers`` convention), else as the first positional input; and
``attention_mask`` by keyword when ``forward`` has a parameter of that name.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["pad_tokens"]

SAMPLE = (
    "a token sample is a 1-D integer tensor of token ids, or a dict with 'input_ids' (a 1-D integer tensor "
    "or a list of ints) and optionally 'attention_mask'"
)


def is_token_sample(item: Any) -> bool:
    """Whether a dataset item is a token sample: a dict with ``input_ids``, or a 1-D integer tensor.

    Example:
        >>> is_token_sample(torch.tensor([5, 9, 2])), is_token_sample(torch.randn(3)), is_token_sample({"x": 1})
        (True, False, False)
    """
    if isinstance(item, Mapping):
        return "input_ids" in item
    return isinstance(item, torch.Tensor) and item.dim() == 1 and _integer(item)


def dict_hint(item: Mapping[Any, Any]) -> str:
    """What a dict item lacks to be a token sample, for the message refusing it."""
    keys = [str(k) for k in item]
    close = difflib.get_close_matches("input_ids", keys, n=1)
    return f"a dict item is a token sample when it has 'input_ids'{f' (did you mean {close[0]!r}?)' if close else ''}; its keys are {keys}"


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def tokens(item: Any, where: str) -> torch.Tensor:
    """The real tokens of one token sample, a 1-D ``int64`` tensor; ``where`` names it in errors.

    Raises:
        TypeError: the item is not a token sample (the message says what it is).
        ValueError: its attention mask does not fit its ids, or it has no token.
    """
    if isinstance(item, Mapping):
        return _from_dict(item, where)
    if not (isinstance(item, torch.Tensor) and item.dim() == 1 and _integer(item)):
        raise TypeError(f"{where} is {_describe(item)}: {SAMPLE}.")
    return _nonempty(item.to(torch.int64), where)


def _describe(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return f"a {str(item.dtype).removeprefix('torch.')} tensor of shape {list(item.shape)}"
    return f"a {type(item).__name__}"


def _from_dict(item: Mapping[Any, Any], where: str) -> torch.Tensor:
    if "input_ids" not in item:
        raise TypeError(f"{where} is a dict without 'input_ids' ({dict_hint(item)}): {SAMPLE}.")
    ids = _as_ids(item["input_ids"], f"{where}['input_ids']")
    mask = item.get("attention_mask")
    if mask is None:
        return _nonempty(ids, where)
    mask = _as_ids(mask, f"{where}['attention_mask']")
    n = int(mask.sum()) if mask.numel() else 0
    right = mask.numel() == ids.numel() and bool((mask == (torch.arange(mask.numel()) < n)).all())
    if not right:
        raise ValueError(
            f"{where} has an attention_mask {_show(mask)} that is not ones then zeros over its "
            f"{ids.numel()} input_ids: a token sample holds its real tokens (mask all ones), or is padded on "
            "the right (ones, then zeros). Remove the padding, or pad on the right."
        )
    return _nonempty(ids[:n], where)


def _show(t: torch.Tensor) -> str:
    values = t.tolist()
    return str(values) if len(values) <= 12 else f"{str(values[:12])[:-1]}, ...] ({len(values)} entries)"


def _as_ids(value: Any, where: str) -> torch.Tensor:
    if isinstance(value, Sequence) and not isinstance(value, str):
        try:
            value = torch.tensor(value, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(
                f"{where} must be a 1-D integer tensor or a list of ints; got a list that is not."
            ) from None
    if not (isinstance(value, torch.Tensor) and value.dim() == 1 and _integer(value)):
        raise TypeError(f"{where} must be a 1-D integer tensor or a list of ints, got {_describe(value)}.")
    return value.to(torch.int64)


def _nonempty(ids: torch.Tensor, where: str) -> torch.Tensor:
    if ids.numel() == 0:
        raise ValueError(f"{where} has no token; a token sample needs at least one. Leave empty samples out.")
    return ids


def pad(samples: Sequence[torch.Tensor], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token tensors (1-D ``int64``) padded on the right: ``(input_ids, attention_mask)``, both ``int64``."""
    longest = max(len(s) for s in samples) if samples else 0
    ids = torch.full((len(samples), longest), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(samples), longest), dtype=torch.int64)
    for row, s in enumerate(samples):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    return ids, mask


def pad_tokens(items: Sequence[Any], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token samples of any lengths as one batch, padded on the right: ``(input_ids, attention_mask)``.

    The collation a teacher cache built from token samples uses: collate the
    student's batch with it and the cached teacher outputs (``cache[idx]``,
    padded to the same longest sample, with ``mask == attention_mask.bool()``)
    line up with the student's outputs token for token.

    Args:
        items: token samples: 1-D integer tensors of token ids, or dicts with
            ``input_ids`` (and optionally an ``attention_mask`` of ones then
            zeros; the padding it marks is dropped before padding again).
        pad_id: the token id at the padding positions. With right padding a
            causal model's outputs at the real tokens do not depend on it.

    Returns:
        ``input_ids`` and ``attention_mask``, ``int64`` tensors
        ``(len(items), longest)``; the mask is 1 at the real tokens.

    Raises:
        TypeError: an item is not a token sample (the message names it).
        ValueError: an item has no token, or an attention mask that is not ones then zeros.

    Example:
        >>> ids, mask = pad_tokens([torch.tensor([5, 6, 7]), {"input_ids": [8]}])
        >>> ids
        tensor([[5, 6, 7],
                [8, 0, 0]])
        >>> mask
        tensor([[1, 1, 1],
                [1, 0, 0]])
    """
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise TypeError(f"pad_tokens(pad_id=...) must be an int token id, got {pad_id!r}.")
    return pad([tokens(item, f"item {i}") for i, item in enumerate(items)], pad_id=pad_id)


def teacher_call(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` a cache build calls ``model`` with on a padded batch (see the module's docstring).

    Example:
        >>> args, kwargs = teacher_call(nn.Embedding(10, 2), torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3))
        >>> len(args), sorted(kwargs)
        (1, [])
    """
    try:
        params: Mapping[str, Any] = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no signature to read: the first positional input
        params = {}
    kwargs: dict[str, Any] = {}
    args: tuple = (input_ids,)
    if "input_ids" in params:
        args, kwargs["input_ids"] = (), input_ids
    if "attention_mask" in params:
        kwargs["attention_mask"] = attention_mask
    return args, kwargs


def teacher_batch(
    items: Sequence[Any], first: int, *, model: nn.Module, options: str | None = None
) -> tuple[tuple, dict[str, Any], torch.Tensor]:
    """A cache build's batch of token samples: the teacher's ``(args, kwargs)`` and the bool mask of real tokens.

    ``first`` is the dataset index of ``items[0]`` (for messages); ``options``
    names a build option that does not apply to token samples, if one was given.

    Raises:
        ValueError: ``options`` is given (augmentation, ``inputs=``).
        TypeError: an item is not a token sample (the message names it).
    """
    if options is not None:
        raise ValueError(
            f"{options} does not apply to token samples (this dataset's items are token ids): augmentation "
            "needs inputs of one shape, and inputs= counts the model inputs of tuple items. Leave it out."
        )
    samples = []
    for j, item in enumerate(items):
        try:
            samples.append(tokens(item, f"dataset item {first + j}"))
        except TypeError as error:
            raise TypeError(
                f"this build caches token samples (its first item is one), so every item must be one: {error}"
            ) from None
    ids, attention = pad(samples)
    args, kwargs = teacher_call(model, ids, attention)
    return args, kwargs, attention.bool()
