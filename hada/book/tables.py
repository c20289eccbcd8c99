"""Result tables for the book and the CLI: rows of named metrics that print as text and render as HTML.

Gains are relative Rsum differences in percent, the way the paper states its +3.6%.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Mapping, Sequence

METRIC_COLUMNS = (
    ("text_retrieval_recall@1", "I→T R@1"),
    ("text_retrieval_recall@5", "I→T R@5"),
    ("text_retrieval_recall@10", "I→T R@10"),
    ("image_retrieval_recall@1", "T→I R@1"),
    ("image_retrieval_recall@5", "T→I R@5"),
    ("image_retrieval_recall@10", "T→I R@10"),
    ("rsum", "Rsum"),
)


def relative_gain(value: float, reference: float) -> float:
    """Percent change of ``value`` over ``reference`` (the paper's "+3.6% Rsum")."""
    return 100.0 * (value - reference) / reference


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 0.05 or value == 0 else f"{value:.3g}"
    return str(value)


@dataclass(repr=False)
class Table:
    """Rows of dicts with a ``name``; ``columns`` pairs a row key with its header."""

    rows: list[dict]
    columns: Sequence[tuple[str, str]] = (("name", "method"),) + METRIC_COLUMNS
    caption: str = ""

    def _cells(self) -> list[list[str]]:
        return [[_fmt(row.get(key, "")) for key, _ in self.columns] for row in self.rows]

    def __str__(self) -> str:
        headers = [h for _, h in self.columns]
        cells = self._cells()
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in cells]
        return (self.caption + "\n" if self.caption else "") + "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for _, h in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self._cells()
        )
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f'<table class="hada-table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r['name'] for r in self.rows]}")

    def best(self, key: str = "rsum") -> dict:
        return max(self.rows, key=lambda r: r[key])


@dataclass(repr=False)
class ResultsTable(Table):
    """Backbones, fusion baselines and HADA on one split. Rows carry ``kind`` in {backbone, fusion, hada}."""

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == kind]

    @property
    def best_backbone(self) -> dict:
        return max(self.of_kind("backbone"), key=lambda r: r["rsum"])

    @property
    def hada(self) -> dict:
        return self.of_kind("hada")[0]

    def fusion_rows(self) -> list[dict]:
        return [r for r in self.rows if r.get("kind") != "backbone"]

    @property
    def gain_over_best_backbone(self) -> float:
        return relative_gain(self.hada["rsum"], self.best_backbone["rsum"])

    def gain_over(self, name_contains: str) -> float:
        reference = next(r for r in self.rows if name_contains in r["name"] and r.get("kind") == "fusion")
        return relative_gain(self.hada["rsum"], reference["rsum"])


def metric_row(name: str, metrics: Mapping[str, float], **extra) -> dict:
    """A table row from a metrics dict (CLIP_benchmark names), keeping only the table's metrics."""
    row = {"name": name, **extra}
    row.update({key: float(metrics[key]) for key, _ in METRIC_COLUMNS})
    return row
