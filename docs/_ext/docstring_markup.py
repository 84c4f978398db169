"""Griffe extension for the API pages: docstring markup that Markdown would garble.

The project's docstrings are Google style with two habits that griffe's
Markdown rendering does not expect:

* ``>>>`` examples under ``Example:`` or straight in the text. Griffe renders
  only an ``Examples:`` section as code; elsewhere ``>>>`` would become a
  quote and ``['a', 'b']`` output a broken link. Every run of doctest lines
  is wrapped in a ```` ```pycon ```` fence.
* Sphinx roles such as ``:func:`torch.func.grad```. They become inline code.

The docstrings themselves are not changed (they stay plain doctests); only the
text griffe parses for the site is. Enabled in ``mkdocs.yml`` under the
python handler's ``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_PROMPT = re.compile(r"^(?P<indent>\s*)>>>")
_FENCE = re.compile(r"^\s*(```|~~~)")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`~?(?P<target>[^`]+)`")


def fence_doctests(text: str) -> str:
    r"""Wrap each run of doctest lines of ``text`` in a ```` ```pycon ```` fence.

    A run starts at a ``>>>`` line outside any fenced block and ends at the
    first blank line.

    >>> fence_doctests("Example:\n    >>> 1 + 1\n    2\n\nEnd.").splitlines()
    ['Example:', '    ```pycon', '    >>> 1 + 1', '    2', '    ```', '', 'End.']
    """
    out: list[str] = []
    lines = text.splitlines()
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _FENCE.match(line):
            in_fence = not in_fence
        prompt = None if in_fence else _PROMPT.match(line)
        if prompt is None:
            out.append(line)
            i += 1
            continue
        indent = prompt["indent"]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


def plain_roles(text: str) -> str:
    """Turn Sphinx cross-reference roles into inline code.

    >>> plain_roles("see :func:`torch.func.grad` and :class:`~torch.nn.Module`")
    'see `torch.func.grad` and `torch.nn.Module`'
    """
    return _ROLE.sub(lambda m: f"`{m['target']}`", text)


class DocstringMarkup(griffe.Extension):
    """Apply :func:`fence_doctests` and :func:`plain_roles` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(plain_roles(obj.docstring.value))
