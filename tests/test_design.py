"""docs/design.md's Layout and Glossary tables against the package's files and source.

Layout: every private module of ``funcdistill/`` (``_x.py``) and every subpackage
(``x/``) has a row, and every row names one that exists; a subpackage's row that
names its modules (`` `_x` ``) names only modules it has, and all of them.
Glossary: each name in the "in code" column exists: a module path (``_x.py``,
``cache/_x.py``), a class or module-level name (``class Name`` or ``Name = ...``
anywhere in ``funcdistill/``), or ``Class.attribute`` (a member of that class's body).
The source is read as text (parsed, never imported).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "funcdistill"
DESIGN = ROOT / "docs" / "design.md"
_CODE = re.compile(r"`([^`]+)`")


def table(section: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first table under ``## <section>`` in docs/design.md."""
    text = DESIGN.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    lines = [line for line in text[start : None if end < 0 else end].splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[2:]]


def definitions() -> tuple[set[str], dict[str, set[str]]]:
    """The module-level names bound in ``funcdistill/`` (classes, assignments), and each class's members."""
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                members.setdefault(node.name, set()).update(_bound(node.body))
            else:
                names.update(_bound([node]))
    return names, members


def _bound(body: list[ast.stmt]) -> set[str]:
    """The names that the statements of ``body`` bind (definitions and plain or annotated assignments)."""
    out: set[str] = set()
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update(t.id for t in targets if isinstance(t, ast.Name))
    return out


def test_layout_table_matches_the_files():
    rows = {row[0].strip("`"): row[1] for row in table("Layout")}
    modules = {p.name for p in PACKAGE.glob("_*.py") if not p.name.startswith("__")}
    packages = {f"{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    problems = [f"{name} has no row" for name in sorted((modules | packages) - rows.keys())]
    problems += [f"the row {name} names no file of funcdistill/" for name in sorted(rows.keys() - modules - packages)]
    for name in sorted(packages & rows.keys()):
        named = {m for m in _CODE.findall(rows[name]) if re.fullmatch(r"_\w+", m)}
        have = {p.stem for p in (PACKAGE / name).glob("_*.py") if not p.name.startswith("__")}
        problems += [f"the row {name} names {m}, which {name} does not have" for m in sorted(named - have)]
        if named:
            problems += [f"the row {name} does not name {name}{m}.py" for m in sorted(have - named)]
    assert not problems, "docs/design.md's Layout table is out of date:\n  " + "\n  ".join(problems)


def test_glossary_names_exist():
    names, members = definitions()
    problems = []
    for word, _, in_code in table("Glossary"):
        for name in _CODE.findall(in_code):
            if name.endswith(".py"):
                ok = (PACKAGE / name).is_file()
            elif re.fullmatch(r"\w+", name):
                ok = name in names
            elif re.fullmatch(r"\w+\.\w+", name):
                cls, member = name.split(".")
                ok = member in members.get(cls, ())
            else:
                problems.append(f"{word}: {name!r} is neither a module path, a name nor Class.attribute")
                continue
            if not ok:
                problems.append(f"{word}: {name} is not in funcdistill/")
    assert not problems, "docs/design.md's Glossary names what the code lacks:\n  " + "\n  ".join(problems)
