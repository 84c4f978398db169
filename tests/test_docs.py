"""Every Python code block in README.md and docs/*.md runs, so no example can rot.

The rule for fenced code blocks:

* A block runs when its fence's language (the first word after the backticks)
  is ``python`` or ``py``: ```` ```python ````. The fence may be indented (for
  example inside an admonition); the block is dedented by the fence's indent.
* Any other language is shown, never run: use ```` ```text ```` for output,
  signatures and pseudo-code, ```` ```pycon ```` for an interactive session
  shown as an illustration, ```` ```bash ```` / ```` ```console ```` for shell
  commands.

The blocks of one file run in order in one fresh namespace, so a later block on
a page may use names defined by an earlier one; pages do not share names. The
random seeds are reset before each page. A failure names the file and the line
of the block, and the traceback points at lines of the Markdown file.

The site itself must build with ``mkdocs build --strict`` (the last test); it
needs the ``docs`` extra and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN_LANGUAGES = frozenset({"python", "py"})
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<info>[^`]*)$")


class Block(NamedTuple):
    """One fenced code block: its language, first code line (1-based) and source."""

    language: str
    line: int
    source: str


def code_blocks(text: str) -> list[Block]:
    """All fenced (backtick) code blocks of a Markdown text, in order.

    >>> code_blocks("x\\n```python\\nprint(1)\\n```\\n")
    [Block(language='python', line=3, source='print(1)\\n')]
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        words = opening["info"].strip().split()
        language = words[0].lower() if words else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"].startswith(fence)
                and not closing["info"].strip()
                and len(closing["indent"]) <= len(indent)
            ):
                break
            body.append(lines[j])
            j += 1
        else:
            raise ValueError(f"the code fence opened at line {i + 1} is never closed.")
        source = textwrap.dedent("\n".join(body)) + "\n" if body else ""
        blocks.append(Block(language, i + 2, source))
        i = j + 1
    return blocks


def runnable_blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` that the docs tests execute."""
    return [b for b in code_blocks(path.read_text(encoding="utf-8")) if b.language in RUN_LANGUAGES]


def run_page(path: Path) -> dict:
    """Run the runnable blocks of ``path`` in order in one fresh namespace; return it.

    Raises:
        AssertionError: a block failed; the message names the file and the
            block's line, with the traceback.
    """
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    random.seed(0)
    torch.manual_seed(0)
    for block in runnable_blocks(path):
        # pad with newlines so that tracebacks give the line in the Markdown file
        code = compile("\n" * (block.line - 1) + block.source, str(path), "exec")
        try:
            exec(code, namespace)  # running the documentation is the point
        except Exception as exc:
            raise AssertionError(
                f"{name}: the python block at line {block.line} failed with "
                f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
            ) from exc
    return namespace


def _pages() -> list:
    """README.md (listed even when missing, so that its absence fails) and docs/*.md.

    A page whose blocks call ``torch.compile`` carries the ``compile`` marker.
    """
    params = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        compiles = path.is_file() and any("torch.compile(" in b.source for b in runnable_blocks(path))
        params.append(
            pytest.param(
                path,
                id=str(path.relative_to(ROOT)),
                marks=[pytest.mark.compile] if compiles else [],
            )
        )
    return params


@pytest.mark.parametrize("path", _pages())
def test_page_examples_run(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing."
    try:
        run_page(path)
    finally:
        torch._dynamo.reset()  # compiled recipes must not leak into other tests


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/concepts.md", "docs/recipes.md"])
def test_example_pages_have_runnable_blocks(page: str) -> None:
    # guards the extraction: a typo in a fence would otherwise silently run nothing
    path = ROOT / page
    assert path.is_file(), f"{page} is missing."
    assert len(runnable_blocks(path)) >= 1, f"{page} has no ```python block."


def test_extraction_rule() -> None:
    text = (
        "intro\n"
        "```python\n"
        "a = 1\n"
        "```\n"
        "```pycon\n"
        ">>> a\n"
        "```\n"
        "!!! note\n"
        '    ```py title="x.py"\n'
        "    if a:\n"
        "        b = 2\n"
        "    ```\n"
        "```text\n"
        "not code\n"
        "```\n"
        "````python\n"
        "s = '''\n"
        "```\n"
        "'''\n"
        "````\n"
    )
    blocks = code_blocks(text)
    assert [b.language for b in blocks] == ["python", "pycon", "py", "text", "python"]
    assert [b.line for b in blocks] == [3, 6, 10, 14, 17]
    assert blocks[2].source == "if a:\n    b = 2\n"
    assert blocks[4].source == "s = '''\n```\n'''\n"
    with pytest.raises(ValueError, match="opened at line 2 is never closed"):
        code_blocks("x\n```python\nprint(1)\n")


def test_blocks_share_one_namespace_per_page(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 2\n```\n\n```pycon\n>>> raise SystemExit\n```\n```python\ny = x * 3\n```\n")
    namespace = run_page(page)
    assert (namespace["x"], namespace["y"]) == (2, 6)


def test_failure_names_file_and_block_line(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("# Broken\n\n```python\nok = 1\n```\n\ntext\n\n```python\nok += 1\nraise ValueError('boom')\n```\n")
    with pytest.raises(
        AssertionError, match=r"broken\.md: the python block at line 10 failed with ValueError: boom"
    ) as info:
        run_page(page)
    # the traceback points at the Markdown line of the failing statement
    assert f'File "{page}", line 11' in str(info.value)


def _load_docstring_markup():
    spec = importlib.util.spec_from_file_location("docstring_markup", ROOT / "docs" / "_ext" / "docstring_markup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_pages_fence_doctests_and_plain_roles() -> None:
    pytest.importorskip("griffe")
    markup = _load_docstring_markup()
    text = (
        "Run :func:`torch.func.grad` on :class:`~funcdistill.Mapping`.\n\n"
        "Example:\n    >>> x = [1]\n    >>> x\n    [1]\n\n"
        "```python\n>>> kept as is\n```\n"
    )
    assert markup.fence_doctests(markup.plain_roles(text)).splitlines() == [
        "Run `torch.func.grad` on `funcdistill.Mapping`.",
        "",
        "Example:",
        "    ```pycon",
        "    >>> x = [1]",
        "    >>> x",
        "    [1]",
        "    ```",
        "",
        "```python",
        ">>> kept as is",
        "```",
    ]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # the API page is generated from the docstrings, not left as ::: directives
    assert "funcdistill.distill" in api and ":::" not in api
    assert "Return a pure function that runs both models" in api
