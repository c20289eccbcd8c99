"""A chapter's own code, read from its MyST source: the cells carrying a tag, and how many lines of code they hold
("HADA in 60 lines" glues its count from its own cells, and ``tests/test_sixty.py`` executes the same cells)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

CELL = re.compile(r"```\{code-cell\} ipython3\n((?::[^\n]*\n)*)\n?(.*?)```", re.S)


def chapter_path(chapter) -> Path:
    """``chapter`` as given when it exists (a chapter runs from ``book/``), else the checkout's ``book/<chapter>``."""
    from hada.paths import project_root

    path = Path(chapter)
    return path if path.exists() else project_root() / "book" / path.name


def tagged_cells(chapter, tag: str) -> list[str]:
    """Source of the code cells of the MyST chapter ``chapter`` (a path, or a file name in ``book/``) whose
    ``:tags:`` line names ``tag``, in page order."""
    return [code for meta, code in CELL.findall(chapter_path(chapter).read_text())
            if re.search(rf":tags:\s*\[[^\]]*\b{re.escape(tag)}\b", meta)]


def code_lines(code: str) -> int:
    """Lines of code in ``code``: not counting blank lines, imports and the docstrings of functions and classes."""
    skip = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None:
            skip.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(1 for n, line in enumerate(code.splitlines(), 1) if line.strip() and n not in skip)


def method_lines(chapter, tag: str = "hada-in-60") -> int:
    """Lines of code (:func:`code_lines`) in the cells of ``chapter`` tagged ``tag``, taken together."""
    return code_lines("\n".join(tagged_cells(chapter, tag)))
