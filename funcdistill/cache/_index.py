"""What :meth:`TeacherCache.open` checks before it trusts an index: its fields, and each shard's header.

Reading trusts the index: ``shard_size`` and each shard's ``first`` and
``count`` say where a sample is, the layout ``entries`` what each shard
holds. :func:`check` refuses an index whose fields are missing, of the wrong
type or inconsistent with each other (every problem in one message naming the
file and the fields), and a shard ``file`` that is not a plain file name in the
cache's folder. :func:`check_shards` compares each shard file with its record:
its size, and its safetensors header (the first sample it holds, its tensor
names, shapes and dtypes). Neither reads tensor data; the SHA-256 of each
shard is checked on its first read and by :meth:`TeacherCache.verify`.

A cache of token samples (format 3, ``"ragged": true``) also records each
shard's ``tokens`` (its packed length: at least one token per sample), and
its per-token tensors hold that many rows, next to ``offsets`` (``count + 1``
entries); the offsets themselves are data, checked when a shard is first read
(:func:`~funcdistill.cache._ragged.check_offsets`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from funcdistill import _keys
from funcdistill._outputs import dtype_name
from funcdistill.cache import _layout, _ragged, _store
from funcdistill.cache._fingerprint import to_dtype

__all__: list[str] = []

_SHOWN = 6  # problems listed in one message; the rest are counted


def plain_file_name(name: Any) -> bool:
    """Whether ``name`` names a file directly in a folder (no separator, drive, ``..`` or absolute path).

    Example:
        >>> plain_file_name("shard-00000.safetensors"), plain_file_name("../x"), plain_file_name("/tmp/x")
        (True, False, False)
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "\0" not in name
        and PurePosixPath(name).name == name
        and PureWindowsPath(name).name == name
    )


def check(index: dict[str, Any], path: Path) -> None:
    """Raise unless the fields of the index at ``path`` are present, well-typed and consistent.

    Raises:
        ValueError: naming ``path`` and every field that is wrong.
    """
    problems: list[str] = []
    bad = _top_level(index, problems)
    if bad.isdisjoint({"entries", "points", "ragged"}):
        _entries(index, problems)
    if bad.isdisjoint({"shards", "samples", "shard_size", "ragged"}):
        _shards(index, problems)
    _raise(problems, f"the teacher cache index {path} is damaged")


def check_shards(folder: Path, index: dict[str, Any], path: Path) -> None:
    """Raise unless every shard file has the recorded size and a header that matches the index.

    Reads each shard's safetensors header only (tensor names, shapes, dtypes
    and the recorded first sample), not its data.

    Raises:
        ValueError: a shard is missing or has another size (naming it), or
            its header disagrees with the index at ``path`` (every such
            problem, naming the shard and the field).
    """
    safe_open = _store._safetensors().safe_open
    problems: list[str] = []
    for i, record in enumerate(index["shards"]):
        _store.check_size(folder, record)
        want = _expected(index, record["count"], record.get("tokens", 0))
        name = record["file"]
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                first = (f.metadata() or {}).get("first")
                found = {key: f.get_slice(key) for key in f.keys()}
                if first != str(record["first"]):
                    problems.append(
                        f"{name} holds the samples from {first} (its header), where shards[{i}].first "
                        f"is {record['first']}"
                    )
                problems += _compare(name, found, want)
        except Exception as error:  # noqa: BLE001 - any failure to parse a header is a damaged shard
            problems.append(f"{name}: cannot read its header ({type(error).__name__}: {error})")
    _raise(problems, f"the teacher cache at {folder} does not match its index {path}")


def _raise(problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:_SHOWN])
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise ValueError(f"{what}: {shown}{more}. {_store.REBUILD}")


def _int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _need(data: dict[str, Any], field: str, ok: Any, want: str, problems: list[str], where: str = "") -> bool:
    """Check ``data[field]`` with ``ok``; record a problem naming ``where + field`` when it fails."""
    if field not in data:
        problems.append(f"field '{where}{field}' is missing")
        return False
    if not ok(data[field]):
        problems.append(f"field '{where}{field}' is {_short(data[field])}, not {want}")
        return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _top_level(index: dict[str, Any], problems: list[str]) -> set[str]:
    """Check the top-level fields; return the names of those that are wrong."""
    fields = (
        ("samples", lambda v: _int(v, 1), "a positive int"),
        ("draws", lambda v: _int(v, 0), "an int >= 0"),
        ("shard_size", lambda v: _int(v, 1), "a positive int"),
        ("augment", lambda v: v is None or isinstance(v, str), "null or a name"),
        ("points", lambda v: isinstance(v, list), "a list"),
        ("entries", lambda v: isinstance(v, list), "a list"),
        ("shards", lambda v: isinstance(v, list) and v, "a non-empty list"),
        ("teacher", lambda v: isinstance(v, dict), "an object"),
    )
    bad = {field for field, ok, want in fields if not _need(index, field, ok, want, problems)}
    ragged = index.get("ragged", False)
    if not isinstance(ragged, bool) or ragged != (index.get("version") == _store.RAGGED_VERSION):
        problems.append(
            f"field 'ragged' is {_short(ragged) if 'ragged' in index else 'missing'} in a format "
            f"{index.get('version')!r} index, where format "
            f"{_store.RAGGED_VERSION} (token samples) has true and format {_store.VERSION} none"
        )
        bad.add("ragged")
    if "points" not in bad:
        for i, key in enumerate(index["points"]):
            try:
                _keys.parse_key(key)
            except ValueError as error:
                problems.append(f"field 'points[{i}]': {error}")
                bad.add("points")
        if len(set(map(repr, index["points"]))) != len(index["points"]):
            problems.append("field 'points' names a point twice")
            bad.add("points")
    if "teacher" not in bad:
        teacher = index["teacher"]
        _need(teacher, "class", lambda v: isinstance(v, str), "a class name", problems, "teacher.")
        if "served" in teacher:  # built from a served teacher: its model's name, no weights
            _need(teacher, "served", _is_served, "an object with the served model's name", problems, "teacher.")
            _need(
                teacher,
                "weights",
                lambda v: v is None,
                "null (a served teacher's are in its server)",
                problems,
                "teacher.",
            )
        else:
            _need(teacher, "weights", lambda v: isinstance(v, str), "a SHA-256", problems, "teacher.")
        _need(teacher, "structure", _is_structure, "a list of [name, shape, dtype]", problems, "teacher.")
    return bad


def _is_served(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("model"), str) and bool(value["model"])


def _is_structure(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and _is_shape(e[1]) and isinstance(e[2], str)
        for e in value
    )


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_int(d, 0) for d in value)


def _is_dtype(value: Any, *, floating: bool | None = None) -> bool:
    try:
        dtype = to_dtype(value) if isinstance(value, str) else None
    except ValueError:
        return False
    return dtype is not None and (floating is None or dtype.is_floating_point == floating)


def _entries(index: dict[str, Any], problems: list[str]) -> None:
    entries, points = index["entries"], index["points"]
    if len(entries) != len(points):
        problems.append(f"field 'entries' has {len(entries)} entries for {len(points)} points")
        return
    names: list[str] = []
    for i, (entry, key) in enumerate(zip(entries, points)):
        where = f"entries[{i}]."
        if not isinstance(entry, dict):
            problems.append(f"field 'entries[{i}]' is {_short(entry)}, not an object")
            continue
        _need(entry, "point", lambda v, key=key: v == key, f"points[{i}] ({key!r})", problems, where)
        topk_ok = _need(entry, "topk", lambda v: v is None or _int(v, 1), "null or a positive int", problems, where)
        leaves_ok = _need(entry, "leaves", lambda v: isinstance(v, list), "a list", problems, where)
        if leaves_ok and topk_ok:
            ragged = bool(index.get("ragged"))
            oks = [
                _leaf(leaf, entry["topk"], f"{where}leaves[{j}]", problems, ragged=ragged)
                for j, leaf in enumerate(entry["leaves"])
            ]
            if all(oks):
                names += _layout.tensor_names(entry)
        if _need(entry, "treespec", lambda v: isinstance(v, str), "a string", problems, where) and leaves_ok:
            try:
                leaves = _layout.load_spec(entry).num_leaves
            except Exception as error:  # noqa: BLE001 - any failure to load is a damaged field
                problems.append(f"field '{where}treespec' does not load ({type(error).__name__}: {error})")
                continue
            if leaves != len(entry["leaves"]):
                problems.append(f"field '{where}treespec' has {leaves} leaves, '{where}leaves' {len(entry['leaves'])}")
    if len(set(names)) != len(names) or "seeds" in names:
        problems.append("fields 'entries[...].leaves[...].name' are not distinct tensor names")


def _leaf(leaf: Any, topk: int | None, where: str, problems: list[str], *, ragged: bool = False) -> bool:
    """Check one leaf record of a layout entry; return whether it is sound."""
    if leaf is None:
        return True
    if not isinstance(leaf, dict):
        problems.append(f"field '{where}' is {_short(leaf)}, not null or an object")
        return False
    where += "."
    ok = _need(leaf, "name", lambda v: isinstance(v, str) and v, "a tensor name", problems, where)
    ok &= _need(leaf, "shape", _is_shape, "a list of sizes", problems, where)
    ok &= _need(leaf, "dtype", _is_dtype, "a dtype name", problems, where)
    ok &= _need(leaf, "stored", _is_dtype, "a dtype name", problems, where)
    if "tokens" in leaf:
        want = "true (a per-token leaf)" if ragged else "absent (only a cache of token samples has per-token leaves)"
        ok &= _need(leaf, "tokens", lambda v: ragged and v is True, want, problems, where)
    if topk is not None and ok:
        ok &= _need(
            leaf, "index_dtype", lambda v: _is_dtype(v, floating=False), "an integer dtype name", problems, where
        )
        ok &= _need(
            leaf, "shape", lambda v: len(v) >= 1 and v[-1] >= topk, f"classes >= topk ({topk})", problems, where
        )
    return ok


def _shards(index: dict[str, Any], problems: list[str]) -> None:
    shards, samples, size = index["shards"], index["samples"], index["shard_size"]
    fields = (
        ("file", plain_file_name, "a plain file name in the cache's folder"),
        ("first", lambda v: _int(v, 0), "an int >= 0"),
        ("count", lambda v: _int(v, 1), "a positive int"),
        ("bytes", lambda v: _int(v, 0), "an int >= 0"),
        ("sha256", lambda v: isinstance(v, str) and len(v) == 64, "a SHA-256 (64 hex digits)"),
    )
    ok = True
    for i, record in enumerate(shards):
        if not isinstance(record, dict):
            problems.append(f"field 'shards[{i}]' is {_short(record)}, not an object")
            ok = False
            continue
        for field, test, want in fields:
            ok &= _need(record, field, test, want, problems, f"shards[{i}].")
        if index.get("ragged") and _int(record.get("count"), 1):
            count = record["count"]
            want = f"an int >= its count {count} (every sample has a token)"
            ok &= _need(record, "tokens", lambda v, c=count: _int(v, c), want, problems, f"shards[{i}].")
        elif "tokens" in record and not index.get("ragged"):
            problems.append(f"field 'shards[{i}].tokens' is there, but only a cache of token samples has one")
            ok = False
    if not ok:
        return
    held = sum(r["count"] for r in shards)
    if held != samples:
        problems.append(f"field 'samples' is {samples}, but the shards' counts add up to {held}")
    need = -(-samples // size)
    if len(shards) != need:
        problems.append(
            f"field 'shards' has {len(shards)} records, where samples {samples} in shards of {size} need {need}"
        )
    for i, record in enumerate(shards):
        first, count = i * size, min(size, samples - i * size)
        if record["first"] != first:
            problems.append(
                f"field 'shards[{i}].first' is {record['first']}, where shard_size {size} puts shard {i} at {first}"
            )
        elif record["count"] != count:
            problems.append(f"field 'shards[{i}].count' is {record['count']}, where shard {i} holds {count} samples")
    files = [r["file"] for r in shards]
    if len(set(files)) != len(files):
        problems.append("field 'shards[...].file' names a file twice")


def _expected(index: dict[str, Any], count: int, tokens: int) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype name) of every tensor of a shard of ``count`` samples (``tokens`` real tokens)."""
    draws = index["draws"]
    want = {}
    for entry in index["entries"]:
        want.update(_layout.stored_tensors(entry, count, draws, tokens=tokens))
    if draws:
        want["seeds"] = ([count, draws], "int64")
    if index.get("ragged"):
        want[_ragged.OFFSETS] = ([count + 1], "int64")
    return want


def _compare(name: str, found: dict[str, Any], want: dict[str, tuple[list[int], str]]) -> list[str]:
    problems = []
    for key, (shape, dtype) in want.items():
        if key not in found:
            problems.append(f"{name} has no tensor {key!r}")
            continue
        got = list(found[key].get_shape())
        if got != shape:
            problems.append(f"{name}: tensor {key!r} is {got}, where the index gives {shape}")
        elif dtype_name(found[key][:0].dtype) != dtype:
            problems.append(
                f"{name}: tensor {key!r} is {dtype_name(found[key][:0].dtype)}, where the index gives {dtype}"
            )
    extra = sorted(set(found) - set(want))
    if extra:
        problems.append(f"{name} has tensors the index does not list: {', '.join(map(repr, extra[:3]))}")
    return problems
