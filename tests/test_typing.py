"""The package ships ``py.typed``, so its annotations must type-check."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_type_checks_with_mypy():
    pytest.importorskip("mypy", reason="mypy comes with the [test] extra")
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [sys.executable, "-m", "mypy", "funcdistill", "--ignore-missing-imports", "--cache-dir", cache],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    assert out.returncode == 0, out.stdout + out.stderr
