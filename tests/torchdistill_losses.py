"""torchdistill 1.1.5's loss module, loaded alone, for the comparisons in the loss tests.

torchdistill's package ``__init__`` imports torchvision (not installable with
every torch build), so only ``losses/mid_level.py`` and the small modules it
imports are loaded, under a private package name, without running any
``__init__.py`` of torchdistill. Tests that use it skip when it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

_ALIAS = "_tests_torchdistill"


def mid_level() -> Any:
    """``torchdistill.losses.mid_level``, or skip the calling test."""
    spec = importlib.util.find_spec("torchdistill")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchdistill is not installed (pip install --no-deps torchdistill==1.1.5)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("", "common", "losses"):
        name = f"{_ALIAS}.{sub}" if sub else _ALIAS
        package = types.ModuleType(name)
        package.__path__ = [str(root / sub)]
        sys.modules.setdefault(name, package)
    try:
        return importlib.import_module(f"{_ALIAS}.losses.mid_level")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip the comparison"
        pytest.skip(f"torchdistill's losses/mid_level.py could not be loaded alone ({type(exc).__name__}: {exc})")
