"""The repository passes ``ruff check`` and ``ruff format --check`` with the configuration in ``pyproject.toml``."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None,
    reason='ruff is not installed; it comes with the test extra: pip install -e ".[test]"',
)
def test_ruff_check_passes():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "full", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"ruff check . found problems:\n{out.stdout}{out.stderr}"


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None,
    reason='ruff is not installed; it comes with the test extra: pip install -e ".[test]"',
)
def test_ruff_format_is_clean():
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"ruff format --check . would reformat (run `ruff format .`):\n{out.stdout}{out.stderr}"
