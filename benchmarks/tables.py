"""The one table format every benchmark prints: a Markdown pipe table (pastes into notes and issues)."""

from __future__ import annotations


def markdown_table(header: list, rows: list[list]) -> str:
    """Columns right-aligned to their widest cell, the first one left-aligned (row labels)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(r, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])
