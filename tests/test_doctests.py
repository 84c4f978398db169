"""Every ``>>>`` example in the package's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import funcdistill

# every module, those of the subpackages (funcdistill.losses._logit, ...) included
MODULES = sorted(["funcdistill"] + [m.name for m in pkgutil.walk_packages(funcdistill.__path__, prefix="funcdistill.")])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples in {name} failed"


def test_every_source_file_is_walked():
    root = Path(funcdistill.__file__).parent
    files = {
        ".".join(("funcdistill", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for p in root.rglob("*.py")
    }
    assert files == set(MODULES)


def test_examples_exist_where_the_style_promises_them():
    finder = doctest.DocTestFinder()
    for name in (
        "funcdistill._mapping",
        "funcdistill._point",
        "funcdistill._distill",
        "funcdistill._state",
        "funcdistill.losses",
        "funcdistill.losses._logit",
        "funcdistill.losses._feature",
        "funcdistill.losses._relational",
        "funcdistill.losses._similarity",
        "funcdistill.losses._contrastive",
        "funcdistill.losses._divergence",
        "funcdistill.losses._fused",
        "funcdistill.align",
        "funcdistill.align._alignment",
        "funcdistill.align._spans",
        "funcdistill.align._groups",
        "funcdistill.align._vocab",
        "funcdistill.cache._cache",
        "funcdistill.served._teacher",
        "funcdistill.served._launch",
        "funcdistill.compat",
        "funcdistill.compat._distill",
        "funcdistill.compat._mapping",
    ):
        examples = sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        assert examples > 0, name
