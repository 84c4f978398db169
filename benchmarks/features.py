"""Which optional capabilities exist where the benchmark runs.

Each probe returns what is needed to use the capability, or a reason string
saying why it is missing; the benchmark then skips the row with that note.

>>> isinstance(truncate_support(), (bool, str))
True
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any

import funcdistill

__all__ = ["compat_module", "precision_keyword", "torchdistill_hook_manager", "truncate_support"]

_PRECISION_NAMES = ("teacher_dtype", "teacher_precision", "teacher_autocast")


def _distill_params() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(funcdistill.distill).parameters)


def truncate_support() -> bool | str:
    """``True`` when ``distill(..., truncate=True)`` exists, else a reason."""
    if "truncate" in _distill_params():
        return True
    return "funcdistill.distill has no truncate= keyword in this version"


def precision_keyword() -> str | None:
    """The name of ``distill``'s teacher-precision keyword, or ``None``."""
    params = _distill_params()
    for name in _PRECISION_NAMES:
        if name in params:
            return name
    return None


def compat_module() -> Any:
    """``funcdistill.compat`` or a reason string."""
    try:
        return importlib.import_module("funcdistill.compat")
    except ImportError as exc:
        return f"funcdistill.compat is not available ({exc})"


def torchdistill_hook_manager() -> Any:
    """torchdistill's ``ForwardHookManager`` class, or a reason string.

    The ``torchdistill`` package's own ``__init__`` imports torchvision, so only
    ``core/forward_hook.py`` (and the two small ``common`` modules it imports)
    are loaded, under a private package name, without running any
    ``__init__.py`` of torchdistill.
    """
    spec = importlib.util.find_spec("torchdistill")
    if spec is None or not spec.submodule_search_locations:
        return "torchdistill is not installed"
    root = Path(next(iter(spec.submodule_search_locations)))
    alias = "_benchmarks_torchdistill"
    for sub in ("", ".common", ".core"):
        pkg = types.ModuleType(alias + sub)
        pkg.__path__ = [str(root / sub.lstrip(".").replace(".", "/"))] if sub else [str(root)]
        sys.modules.setdefault(alias + sub, pkg)
    try:
        module = importlib.import_module(alias + ".core.forward_hook")
        return module.ForwardHookManager
    except Exception as exc:  # noqa: BLE001 - any failure means "skip this row"
        return f"torchdistill's core/forward_hook.py could not be loaded alone ({type(exc).__name__}: {exc})"
