"""How the teacher outputs at one point become stored tensors, and back.

An output is a pytree of batch-first tensors (``None`` entries allowed). Its
structure is recorded with torch's ``treespec_dumps``; each tensor leaf is
stored as ``p<point>.<leaf>`` in its storage dtype (the teacher's by default,
or e.g. ``float16``) and read back in the teacher's dtype. A top-k entry keeps
only ``log_softmax`` of a logits tensor at its ``k`` largest entries
(``p<point>.logprobs``) and their indices (``p<point>.indices``, in the
smallest integer dtype that holds the class count), read back as a
:class:`~funcdistill.cache.TopK` with ``int64`` indices. With ``K`` recorded
augmentation draws every stored tensor has a draw dimension after the sample
dimension.

In a cache of token samples (a *ragged* cache, :mod:`~funcdistill.cache._ragged`),
a leaf recorded with ``"tokens": true`` is per token: its output is
``(batch, tokens, ...)``, its recorded ``shape`` is what follows the token
dimension, and only the real tokens are stored, packed: ``(tokens in the
shard, ...)``. The other leaves are per sample, as in any cache.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from funcdistill._keys import display
from funcdistill._outputs import TopK, dtype_name
from funcdistill._pytree import torch_pytree
from funcdistill.cache import _precision, _store
from funcdistill.cache._fingerprint import to_dtype

__all__: list[str] = []

Entry = dict[str, Any]


def entry(
    index: int, key: str, output: Any, batch: int, *, storage: dict[str, Any], per_token: list[bool] | None = None
) -> Entry:
    """The layout entry of one teacher point (its stable ``key``), from its output on a first batch of ``batch`` samples.

    ``storage`` holds the point's storage ``dtype`` name (or ``None``), ``topk``
    and ``temperature``; ``per_token`` (a ragged cache) says which leaves are per token.
    """
    dtype = None if storage["dtype"] is None else to_dtype(storage["dtype"])
    topk = storage["topk"]
    point = display(key)
    leaves, spec = torch_pytree.tree_flatten(output)
    try:
        treespec = torch_pytree.treespec_dumps(spec)
    except Exception as error:  # noqa: BLE001 - any unserialisable structure gets the same advice
        raise TypeError(
            f"cannot record the structure of the teacher output at {point} ({error}); map a point whose "
            "output is a tensor, or a tuple, list or dict of tensors."
        ) from None
    entry: Entry = {
        "point": key,
        "treespec": treespec,
        "topk": topk,
        "temperature": storage["temperature"],
        "leaves": [],
    }
    for j, leaf in enumerate(leaves):
        if leaf is None:
            entry["leaves"].append(None)
            continue
        _check_batch_first(point, j, leaf, batch)
        stored = dtype if dtype is not None and leaf.is_floating_point() else leaf.dtype
        token = bool(per_token and per_token[j])
        entry["leaves"].append(
            {
                "name": f"p{index}.{j}",
                "shape": list(leaf.shape[2:] if token else leaf.shape[1:]),
                "dtype": dtype_name(leaf.dtype),
                "stored": dtype_name(stored),
                **({"tokens": True} if token else {}),
            }
        )
    if topk is not None:
        _describe_topk(entry, leaves, topk)
    return entry


def _describe_topk(entry: Entry, leaves: list[Any], k: int) -> None:
    point = display(entry["point"])
    if len(leaves) != 1 or leaves[0] is None or not leaves[0].is_floating_point() or leaves[0].dim() < 2:
        raise ValueError(
            f"topk storage needs logits: one floating tensor of shape (batch, ..., classes), but the "
            f"teacher output at {point} is not one; store this pair in full (leave it out of topk)."
        )
    classes = leaves[0].shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"topk={k} for the teacher output at {point}, which has {classes} classes; use 1..{classes}.")
    leaf = entry["leaves"][0]
    leaf["name"] = leaf["name"].rsplit(".", 1)[0]
    leaf["index_dtype"] = dtype_name(_index_dtype(classes))


def _index_dtype(classes: int) -> torch.dtype:
    """The smallest integer dtype holding class indices ``0 .. classes - 1`` that safetensors stores.

    ``int16`` up to 32,768 classes, ``uint16`` up to 65,536 (where the
    installed safetensors stores it), ``int32`` up to 2**31, else ``int64``.

    Example:
        >>> _index_dtype(32_000), _index_dtype(151_936)
        (torch.int16, torch.int32)
    """
    ladder = (torch.int16, torch.uint16, torch.int32) if _store.stores_uint16() else (torch.int16, torch.int32)
    for dtype in ladder:
        if classes - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _check_batch_first(point: str, j: int, leaf: Any, batch: int) -> None:
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"the teacher output at {point} has a {type(leaf).__name__} leaf; a cache stores tensors.")
    if leaf.dim() == 0 or leaf.shape[0] != batch:
        raise ValueError(
            f"the teacher output at {point} (leaf {j}) has shape {list(leaf.shape)}, whose first dimension "
            f"is not the batch ({batch} samples); a cache stores outputs per sample: map a point whose "
            "outputs are batch-first."
        )


def to_tensors(
    entry: Entry, output: Any, batch: int, first: int, *, pairs: list[int], mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The tensors to store for one teacher point of a batch (checked against the recorded layout).

    ``pairs`` are the indices of the mapping's pairs that read this point, for
    the message when a value does not fit its storage dtype
    (:func:`~funcdistill.cache._precision.check`). ``mask`` (a ragged cache:
    ``(batch, tokens)``, ``True`` at the real tokens) selects what a per-token
    leaf stores, packed.
    """
    leaves = torch_pytree.tree_leaves(output)
    point = display(entry["point"])
    where = f"the teacher output at {point} (pair{'s' if len(pairs) > 1 else ''} {', '.join(map(str, pairs))})"
    if isinstance(output, TopK) and entry["topk"] is not None:  # a served teacher's: its top-k as given
        return _given_topk(entry, output, batch, mask, where, pairs[0], first)
    if len(leaves) != len(entry["leaves"]):
        raise ValueError(
            f"the teacher output at {point} changed structure at sample {first}: {len(leaves)} leaves "
            f"where the first batch had {len(entry['leaves'])}; a cache needs one structure for all samples."
        )
    out = {}
    for j, (leaf, spec) in enumerate(zip(leaves, entry["leaves"])):
        if spec is None:
            if leaf is not None:
                raise ValueError(
                    f"the teacher output at {point} (leaf {j}) was None for the first batch, not at {first}."
                )
            continue
        _check_batch_first(point, j, leaf, batch)
        token = bool(spec.get("tokens")) and mask is not None
        if token and mask is not None:
            _check_tokens(point, j, leaf, mask, first)
        per = list(leaf.shape[2:] if token else leaf.shape[1:])
        if per != spec["shape"] or dtype_name(leaf.dtype) != spec["dtype"]:
            raise ValueError(
                f"the teacher output at {point} (leaf {j}) is {per} {dtype_name(leaf.dtype)} per "
                f"{'token' if token else 'sample'} at sample {first}, where the first batch had {spec['shape']} "
                f"{spec['dtype']}; a cache needs the same shape for every sample (pad the inputs to one length, "
                "or give token samples: 1-D tensors of token ids of any length)."
            )
        out.update(_stored(entry, spec, leaf.detach(), mask if token else None, where, pairs[0], first))
    return out


def _stored(
    entry: Entry, spec: dict[str, Any], leaf: torch.Tensor, mask: torch.Tensor | None, where: str, pair: int, first: int
) -> dict[str, torch.Tensor]:
    """The stored tensors of one leaf: cast (or top-k), checked against the storage dtype, packed when per token."""
    stored = to_dtype(spec["stored"])
    if entry["topk"] is None:
        _precision.check(_zero_padding(leaf, mask), stored, where=where, pair=pair, first=first)
        return {spec["name"]: _pack(leaf.to("cpu"), mask).to(stored)}
    logits = _pack(leaf.to("cpu"), mask).to(torch.float32)  # a ragged cache: only the real tokens
    values, indices = torch.log_softmax(logits / entry["temperature"], dim=-1).topk(entry["topk"], dim=-1)
    shown = values if mask is None else _unpack(values, mask)
    _precision.check(shown, stored, where=f"{where}, its top-k log-probabilities,", pair=pair, first=first)
    return {
        spec["name"] + ".logprobs": values.to(stored),
        spec["name"] + ".indices": indices.to(to_dtype(spec["index_dtype"])),
    }


def _given_topk(
    entry: Entry, given: TopK, batch: int, mask: torch.Tensor | None, where: str, pair: int, first: int
) -> dict[str, torch.Tensor]:
    """The stored tensors of a top-k given as it is (a served teacher's), checked against the layout, packed."""
    spec, k = entry["leaves"][0], entry["topk"]
    classes = spec["shape"][-1]
    values, indices = (_pack(t.detach().to("cpu"), mask) for t in given)
    if values.dim() < 1 or values.shape[-1] != k or indices.shape != values.shape or len(given.logprobs) != batch:
        raise ValueError(
            f"{where} was given top-k log-probabilities {list(given.logprobs.shape)} and indices "
            f"{list(given.indices.shape)} at sample {first}, where the cache stores the top {k} of each of "
            f"{batch} samples' tokens."
        )
    if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < classes:
        bad = int(indices.max()) if int(indices.max()) >= classes else int(indices.min())
        raise ValueError(
            f"{where} was given class index {bad} at sample {first}, outside the teacher's {classes} classes (the "
            "size of its logits): the server's model has another vocabulary than this distill function's teacher. "
            "Serve the model of this teacher, or distil with the architecture of the served one."
        )
    stored = to_dtype(spec["stored"])
    shown = values if mask is None else _unpack(values, mask)
    _precision.check(shown, stored, where=f"{where}, its top-k log-probabilities,", pair=pair, first=first)
    return {
        spec["name"] + ".logprobs": values.to(stored),
        spec["name"] + ".indices": indices.to(to_dtype(spec["index_dtype"])),
    }


def _pack(leaf: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The real tokens of a ``(batch, tokens, ...)`` leaf, sample after sample: ``(real tokens, ...)``."""
    return leaf if mask is None else leaf[mask.to(leaf.device)]


def _unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Packed tokens back to ``(batch, tokens, ...)`` with zeros at the padding (for the per-sample check)."""
    out = packed.new_zeros((*mask.shape, *packed.shape[1:]))
    out[mask] = packed
    return out


def _zero_padding(leaf: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The leaf with zeros at the padding positions, which are not stored (so not checked)."""
    if mask is None:
        return leaf
    keep = mask.to(leaf.device).reshape(*mask.shape, *([1] * (leaf.dim() - 2)))
    return leaf.masked_fill(~keep, 0)


def _check_tokens(point: str, j: int, leaf: torch.Tensor, mask: torch.Tensor, first: int) -> None:
    if leaf.dim() < 2 or leaf.shape[1] != mask.shape[1]:
        raise ValueError(
            f"the teacher output at {point} (leaf {j}) has shape {list(leaf.shape)} at sample {first}, where "
            f"the first batch's was per token (batch, tokens, ...); this batch is padded to {mask.shape[1]} "
            "tokens. A leaf must be per token in every batch, or in none."
        )


def tensor_names(entry: Entry) -> list[str]:
    """Names of the stored tensors of one teacher point."""
    return list(stored_tensors(entry, 0, 0))


def token_names(entry: Entry) -> list[str]:
    """Names of the stored tensors of one teacher point that are per token (packed), in a ragged cache."""
    return list(stored_tensors(entry, 0, 0, only_tokens=True))


def stored_tensors(
    entry: Entry, count: int, draws: int, *, tokens: int = 0, only_tokens: bool = False
) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype name) of the stored tensors of one teacher point in a shard of ``count`` samples.

    A per-token leaf of a ragged cache is stored packed: ``tokens`` rows (the shard's real tokens).
    """
    out = {}
    for spec in entry["leaves"]:
        if spec is None or (only_tokens and not spec.get("tokens")):
            continue
        lead = [tokens] if spec.get("tokens") else [count, draws] if draws else [count]
        if entry["topk"] is None:
            out[spec["name"]] = (lead + spec["shape"], spec["stored"])
        else:
            shape = lead + spec["shape"][:-1] + [entry["topk"]]
            out[spec["name"] + ".logprobs"] = (shape, spec["stored"])
            out[spec["name"] + ".indices"] = (shape, spec["index_dtype"])
    return out


def load_spec(entry: Entry) -> Any:
    """The recorded output structure of one teacher point (a torch ``TreeSpec``)."""
    return torch_pytree.treespec_loads(entry["treespec"])


Reader = Callable[[dict[str, torch.Tensor]], Any]
"""One teacher point's output, in the teacher's dtypes, from the stored tensors a read gathered (by name)."""


def reader(entry: Entry) -> Reader:
    """The :data:`Reader` of one teacher point, made once (when a cache is opened) for all its reads.

    What depends only on the layout is decided here: which tensors to take,
    which to cast, and whether the output is a plain tensor (no tree to
    rebuild); a read only looks its tensors up and casts those stored in
    another dtype.
    """
    if entry["topk"] is not None:
        spec = entry["leaves"][0]
        logprobs = _leaf(spec["name"] + ".logprobs", spec["stored"], spec["dtype"])
        indices = _leaf(spec["name"] + ".indices", spec["index_dtype"], "int64")
        return lambda read: TopK(logprobs(read), indices(read))
    leaves = [None if spec is None else _leaf(spec["name"], spec["stored"], spec["dtype"]) for spec in entry["leaves"]]
    tree = load_spec(entry)
    if tree.is_leaf() and len(leaves) == 1 and leaves[0] is not None:  # the output is one tensor
        return leaves[0]
    return lambda read: torch_pytree.tree_unflatten([None if f is None else f(read) for f in leaves], tree)


def _leaf(name: str, stored: str, dtype: str) -> Reader:
    """The stored tensor ``name`` in the teacher's ``dtype`` (cast only when stored in another).

    ``uint16`` is always cast: a ragged read widens it (:func:`~funcdistill.cache._ragged.gather`).
    """
    if stored == dtype and dtype != "uint16":
        return operator.itemgetter(name)
    cast = to_dtype(dtype)
    return lambda read: read[name].to(cast)


def bytes_per_sample(entry: Entry, draws: int, *, tokens: float = 1.0) -> int:
    """Stored bytes of one sample at this point (all draws), headers not counted; ``tokens`` per sample when ragged."""
    total = 0.0
    for spec in entry["leaves"]:
        if spec is None:
            continue
        before = total
        if entry["topk"] is None:
            n = 1
            for d in spec["shape"]:
                n *= d
            total += n * to_dtype(spec["stored"]).itemsize
        else:
            rest = 1
            for d in spec["shape"][:-1]:
                rest *= d
            k = entry["topk"]
            total += rest * k * (to_dtype(spec["stored"]).itemsize + to_dtype(spec["index_dtype"]).itemsize)
        if spec.get("tokens"):
            total = before + (total - before) * tokens
    return int(total * max(draws, 1))
