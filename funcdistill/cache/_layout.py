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
"""

from __future__ import annotations

from typing import Any

import torch

from funcdistill._keys import display
from funcdistill._outputs import TopK, dtype_name
from funcdistill._pytree import torch_pytree
from funcdistill.cache import _precision
from funcdistill.cache._fingerprint import to_dtype

__all__: list[str] = []

Entry = dict[str, Any]


def entry(index: int, key: str, output: Any, batch: int, *, storage: dict[str, Any]) -> Entry:
    """The layout entry of one teacher point (its stable ``key``), from its output on a first batch of ``batch`` samples.

    ``storage`` holds the point's storage ``dtype`` name (or ``None``), ``topk`` and ``temperature``.
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
        entry["leaves"].append(
            {
                "name": f"p{index}.{j}",
                "shape": list(leaf.shape[1:]),
                "dtype": dtype_name(leaf.dtype),
                "stored": dtype_name(stored),
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
    for dtype in (torch.int16, torch.int32):
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


def to_tensors(entry: Entry, output: Any, batch: int, first: int, *, pairs: list[int]) -> dict[str, torch.Tensor]:
    """The tensors to store for one teacher point of a batch (checked against the recorded layout).

    ``pairs`` are the indices of the mapping's pairs that read this point, for
    the message when a value does not fit its storage dtype
    (:func:`~funcdistill.cache._precision.check`).
    """
    leaves = torch_pytree.tree_leaves(output)
    point = display(entry["point"])
    where = f"the teacher output at {point} (pair{'s' if len(pairs) > 1 else ''} {', '.join(map(str, pairs))})"
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
        if list(leaf.shape[1:]) != spec["shape"] or dtype_name(leaf.dtype) != spec["dtype"]:
            raise ValueError(
                f"the teacher output at {point} (leaf {j}) is {list(leaf.shape[1:])} {dtype_name(leaf.dtype)} "
                f"per sample at sample {first}, where the first batch had {spec['shape']} {spec['dtype']}; a "
                "cache needs the same shape for every sample (pad the inputs to one length)."
            )
        stored = to_dtype(spec["stored"])
        if entry["topk"] is None:
            _precision.check(leaf, stored, where=where, pair=pairs[0], first=first)
            out[spec["name"]] = leaf.detach().to("cpu", stored)
            continue
        logprobs = torch.log_softmax(leaf.detach().to("cpu", torch.float32) / entry["temperature"], dim=-1)
        values, indices = logprobs.topk(entry["topk"], dim=-1)
        _precision.check(values, stored, where=f"{where}, its top-k log-probabilities,", pair=pairs[0], first=first)
        out[spec["name"] + ".logprobs"] = values.to(stored)
        out[spec["name"] + ".indices"] = indices.to(to_dtype(spec["index_dtype"]))
    return out


def tensor_names(entry: Entry) -> list[str]:
    """Names of the stored tensors of one teacher point."""
    return list(stored_tensors(entry, 0, 0))


def stored_tensors(entry: Entry, count: int, draws: int) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype name) of the stored tensors of one teacher point in a shard of ``count`` samples."""
    lead = [count, draws] if draws else [count]
    out = {}
    for spec in entry["leaves"]:
        if spec is None:
            continue
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


def from_tensors(entry: Entry, spec_tree: Any, read: dict[str, torch.Tensor]) -> Any:
    """The teacher output of one point, from its gathered stored tensors, in the teacher's dtypes."""
    if entry["topk"] is not None:
        spec = entry["leaves"][0]
        logprobs, indices = read[spec["name"] + ".logprobs"], read[spec["name"] + ".indices"]
        return TopK(_as(logprobs, to_dtype(spec["dtype"])), _as(indices, torch.int64))
    leaves = [None if spec is None else _as(read[spec["name"]], to_dtype(spec["dtype"])) for spec in entry["leaves"]]
    return torch_pytree.tree_unflatten(leaves, spec_tree)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def bytes_per_sample(entry: Entry, draws: int) -> int:
    """Stored bytes of one sample at this point (all draws), headers not counted."""
    total = 0
    for spec in entry["leaves"]:
        if spec is None:
            continue
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
    return total * max(draws, 1)
