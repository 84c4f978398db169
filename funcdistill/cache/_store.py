"""The files of a teacher cache: safetensors shards, a JSON index, checksums, atomic writes.

A cache is a folder::

    index.json                 what it was built for, its layout, and every shard's size and SHA-256
    shard-00000.safetensors    samples [0, shard_size), one tensor per stored leaf
    shard-00001.safetensors    ...

Shards are standard `safetensors <https://huggingface.co/docs/safetensors>`_
files, so other tools read them; they are memory-mapped when read. While a
build runs, ``build.json`` holds the layout and ``progress-rank<r>.json`` the
shards rank ``r`` has finished; ``index.json`` is written when all are done.
Every file is written to a temporary name, flushed to disk and renamed over
its final name (:func:`write_atomic`), so a crash leaves either the old file or
the new one, never half of one. ``safetensors`` is imported here, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__: list[str] = []

FORMAT = "funcdistill.TeacherCache"
VERSION = 2
"""The format of a cache of samples of one shape: 1 keyed teacher points by their ``repr``; 2 by stable keys."""
RAGGED_VERSION = 3
"""The format of a cache of token samples (ragged): 2 plus packed per-token tensors, ``offsets`` and ``tokens``.

A reader of format 2 only would misread one, so it has its own number (and
such a reader says "upgrade"); caches of samples of one shape are still
written as format 2, which every funcdistill that reads format 2 reads.
"""
READS = (VERSION, RAGGED_VERSION)
"""The formats this funcdistill reads."""
INDEX = "index.json"
BUILD = "build.json"
_CHUNK = 1 << 22


def shard_name(i: int) -> str:
    """The file name of shard ``i``."""
    return f"shard-{i:05d}.safetensors"


def progress_name(rank: int) -> str:
    """The file listing the shards rank ``rank`` has finished."""
    return f"progress-rank{rank}.json"


def _safetensors() -> Any:
    """The ``safetensors`` package, imported on first use, with the fix when it is missing."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise ModuleNotFoundError(
            'a teacher cache needs safetensors, which is not installed: pip install "funcdistill[cache]" '
            "(or pip install safetensors)."
        ) from None
    return safetensors


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON file of the cache, with a clear error when it is damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read the {what} {path} ({type(error).__name__}: {error}); the file is damaged: "
            "rebuild the cache (delete the folder and run TeacherCache.build again)."
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a funcdistill teacher cache {what} (no 'format': {FORMAT!r}).")
    if what in _VERSIONED or "version" in data:
        check_version(data, path)
    return data


_VERSIONED = ("index", "build record")


def check_version(data: dict[str, Any], path: Path) -> None:
    """Raise unless ``data`` (an index or build record) is in the format this funcdistill reads.

    Every index and build record funcdistill has written carries a ``version``,
    so one without it is damaged. Format 1 is not read: its point keys were
    ``repr`` strings; such a cache is rebuilt.
    """
    version = data.get("version")
    reads = " and ".join(map(str, READS))
    if isinstance(version, int) and not isinstance(version, bool) and version > max(READS):
        raise ValueError(
            f"{path} was written by a newer funcdistill (teacher cache format {version}; this one reads "
            f"formats {reads}): upgrade funcdistill (pip install -U funcdistill) to read it."
        )
    if version == 1:
        raise ValueError(
            f"{path} is teacher cache format 1, written by an older funcdistill that keyed teacher points "
            f"by their repr; this one reads formats {reads}. Rebuild the cache (delete the folder and run "
            "TeacherCache.build again)."
        )
    if version not in READS or isinstance(version, bool):
        what = "is missing" if "version" not in data else f"is {version!r}, not a format number"
        raise ValueError(f"{path} is damaged: its field 'version' {what}. {REBUILD}")


REBUILD = "Rebuild the cache (delete the folder and run TeacherCache.build again)."


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], first: int, *, count: int | None = None, tokens: int | None = None
) -> dict[str, Any]:
    """Write one shard atomically; return its index record (file, first sample, count, bytes, sha256).

    ``count`` defaults to the first tensor's rows; a ragged shard gives it,
    and its real ``tokens`` (recorded too).
    """
    save = _safetensors().torch.save
    count = next(iter(tensors.values())).shape[0] if count is None else count
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT, "first": str(first)})
    write_atomic(path, data)
    record = {"file": path.name, "first": first, "count": count}
    if tokens is not None:
        record["tokens"] = tokens
    return {**record, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@functools.cache
def stores_uint16() -> bool:
    """Whether the installed safetensors writes and reads ``torch.uint16`` tensors (top-k indices up to 65,536)."""
    st = _safetensors().torch
    try:
        back = st.load(st.save({"t": torch.tensor([65535], dtype=torch.int32).to(torch.uint16)}))["t"]
    except Exception:  # noqa: BLE001 - any failure means: not supported here
        return False
    return back.dtype == torch.uint16 and int(back.to(torch.int64)) == 65535


def check_size(folder: Path, record: dict[str, Any]) -> None:
    """Raise when a shard is missing or does not have the size the index records (truncated, grown)."""
    path = folder / record["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(
            f"teacher cache shard {path} is missing; rebuild the cache (run TeacherCache.build again "
            "after deleting the folder)."
        ) from None
    if size != record["bytes"]:
        raise ValueError(
            f"teacher cache shard {path} has {size} bytes where the index records {record['bytes']}: "
            "the file is truncated or was changed. Rebuild the cache (delete the folder and run "
            "TeacherCache.build again)."
        )


def load_shard(folder: Path, record: dict[str, Any], *, verify: bool) -> dict[str, torch.Tensor]:
    """The tensors of one shard, memory-mapped; its size (and, with ``verify``, checksum) checked first."""
    safe_open = _safetensors().safe_open
    path = folder / record["file"]
    check_size(folder, record)
    if verify:
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ValueError(
                f"teacher cache shard {path} is damaged: its SHA-256 is {digest[:16]}... where the index "
                f"records {record['sha256'][:16]}... Rebuild the cache (delete the folder and run "
                "TeacherCache.build again)."
            )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # noqa: BLE001 - any failure to parse the file is a damaged shard
        raise ValueError(
            f"cannot read teacher cache shard {path} ({type(error).__name__}: {error}); rebuild the cache."
        ) from None
