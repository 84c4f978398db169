"""Every ``>>>`` example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import funcdistill

MODULES = sorted(
    ["funcdistill"] + [f"funcdistill.{m.name}" for m in pkgutil.iter_modules(funcdistill.__path__)]
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed"


def test_examples_exist_where_the_style_promises_them():
    finder = doctest.DocTestFinder()
    for name in ("funcdistill._mapping", "funcdistill._distill", "funcdistill._state", "funcdistill.losses"):
        examples = sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        assert examples > 0, name
