"""A cache built from a served teacher: the server's top-k stored as a live teacher's ragged top-k cache stores it.

``TeacherCache.build(fn, served, dataset, path, topk=k)`` takes a
:class:`~funcdistill.served.ServedTeacher` in place of the teacher state. The
teacher never runs here (it may be built on the ``meta`` device): each batch
of token samples is padded as for a live teacher and sent to the server in
one request, and its answer, a :class:`~funcdistill.cache.TopK` per token, is
stored as is, packed, in the layout a live top-k build of the same teacher
architecture records (the index dtype from the teacher's output size, its
number of classes).

What makes two builds "of the same teacher" is the served model's *name*, not
the URL it was reached at (a resumed build, or another rank, may ask another
replica of the same server): the index records ``teacher.served.model`` (and,
for information, the ``url`` rank 0 asked) with ``teacher.weights`` null,
since the weights are in the server. The ranks and a resumed build compare
the model name; :meth:`TeacherCache.open(path, teacher_state=...)
<funcdistill.TeacherCache.open>` takes the :class:`ServedTeacher` (its model
name is compared) and refuses a teacher state, whose weights such a cache
cannot check, rather than accept it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from funcdistill._distill import DistillFn
from funcdistill._keys import display, point_key
from funcdistill._outputs import TopK
from funcdistill.served._teacher import ServedTeacher

__all__ = ["ServedTeacher"]


def check(served: ServedTeacher, fn: DistillFn, storage: tuple[dict[str, Any], ...], device: Any) -> int:
    """Check a build's options against the served teacher; return the teacher's number of classes.

    Raises:
        ValueError: ``fn`` maps a teacher point the served teacher does not
            give; ``topk`` is not the served teacher's ``k``; a
            ``topk_temperature`` other than 1; a ``device``; or the teacher's
            number of classes cannot be told.
    """
    served.built_for.positions(fn)  # fn maps the served teacher's one logits point, and nothing else
    k, temperature = storage[0]["topk"], storage[0]["temperature"]
    if k != served.topk:
        given = "no topk" if k is None else f"topk={k}"
        raise ValueError(
            f"{given}, but the served teacher gives its top-{served.topk} log-probabilities (ServedTeacher(..., "
            f"topk={served.topk})); a cache built from a server stores what it gives: pass topk={served.topk}"
            + (
                "."
                if k is None
                else f", or make the served teacher with topk={k} (a server started with --max-logprobs {k} or more)."
            )
        )
    if temperature != 1.0:
        raise ValueError(
            f"topk_temperature={temperature}, but a served teacher gives its log-probabilities at temperature 1 "
            "(the server's raw ones), from which those at another temperature cannot be made: leave it out."
        )
    if device is not None:
        raise ValueError(
            f"device={str(device)!r} says where the teacher runs, but a served teacher runs in its server (its "
            "answers are stored from the CPU): leave device out."
        )
    return classes(fn)


def classes(fn: DistillFn) -> int:
    """The teacher's number of classes (its vocabulary) at its logits point: what a top-k index is one of.

    The rows of the logits point's weight (``lm_head``; the output embedding
    for the teacher's output ``""``), else the teacher's ``config.vocab_size``:
    read from the architecture, so a teacher on the ``meta`` device will do.
    """
    teacher, point = fn.teacher_model, fn.teacher_points[0]
    getter = getattr(teacher, "get_output_embeddings", None)
    module: Any
    if isinstance(point, str) and point:
        module = teacher.get_submodule(point)
    else:
        module = getter() if callable(getter) else None
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        return vocab
    raise ValueError(
        f"cannot tell the number of classes of the teacher's logits at {display(point_key(point))}, which a cache "
        "built from a served teacher needs for its index dtype: the teacher has no output embedding with a 2-D "
        "weight and no config.vocab_size. Map its output embedding (a Linear layer, lm_head), or give the teacher "
        "config.vocab_size."
    )


def ask(served: ServedTeacher, fn: DistillFn, args: tuple, kwargs: Mapping[str, Any], mask: torch.Tensor) -> dict:
    """The server's top-k of a padded batch (as a cache build calls a teacher), keyed by ``fn``'s teacher point."""
    ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]  # where _tokens.teacher_call put them
    return dict(zip(fn.teacher_points, served(ids, mask).values))


def logits_like(top: TopK, classes: int) -> torch.Tensor:
    """A ``meta`` tensor of the logits a server ranked: what a live top-k build's layout entry is made from."""
    return torch.empty((*top.logprobs.shape[:-1], classes), dtype=top.logprobs.dtype, device="meta")


def record(served: ServedTeacher) -> dict[str, Any]:
    """What the index records of a served teacher, but its URL (added by the build: recorded, not compared)."""
    return {"model": served.model}


def describe(teacher: Mapping[str, Any]) -> str:
    """A recorded teacher, for messages: served by a model, or a teacher state.

    Example:
        >>> describe({"served": {"model": "tiny"}}), describe({"weights": "ab12"})
        ("served by model 'tiny'", 'a teacher state')
    """
    served = teacher.get("served")
    return f"served by model {served.get('model')!r}" if isinstance(served, dict) else "a teacher state"


def check_open(index: Mapping[str, Any], given: Any, folder: Path) -> bool:
    """For ``TeacherCache.open(teacher_state=given)``: check a served teacher's model name; whether it was one.

    Raises:
        ValueError: a served cache opened with a teacher state (its weights
            cannot be checked), a cache of a teacher state opened with a
            served teacher, or a served teacher of another model.
    """
    served = index["teacher"].get("served")
    if isinstance(given, ServedTeacher):
        if served is None:
            raise ValueError(
                f"the teacher cache at {folder} was built from a teacher state, not a served teacher: open it with "
                "teacher_state=funcdistill.state(teacher) to check its weights, or without teacher_state."
            )
        if served["model"] != given.model:
            raise ValueError(
                f"the teacher cache at {folder} was built from the served model {served['model']!r}, not "
                f"{given.model!r}. Build a cache from this model."
            )
        return True
    if served is not None:
        raise ValueError(
            f"the teacher cache at {folder} was built from the served model {served['model']!r} (at "
            f"{served.get('url')}), whose weights it does not know, so it cannot check them against teacher_state: "
            "open it without teacher_state, or with the ServedTeacher (its model name is compared)."
        )
    return False
