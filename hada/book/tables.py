"""The one table type of the package (book and CLI): rows of named values that print as text and render
as HTML, and the tables built on it (results, the paper's claim, ablations, split counts, zero-shot scores).

Gains are relative Rsum differences in percent, the way the paper states its +3.6%.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from hada.labels import backbone_labels
from hada.metrics import ROW_METRICS, beyond, metric_row, rank_correlation, relative_gain, seed_band, seed_std  # noqa: F401

#: The labels of the result rows' numbers (:data:`hada.metrics.ROW_METRICS`), in that order.
METRIC_COLUMNS = tuple(zip(ROW_METRICS, ("I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10",
                                         "Rsum")))


def list_phrase(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``: items as one clause of prose."""
    items = list(items)
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def _fmt(value, digits: int = 1) -> str:
    """Floats to ``digits`` decimals (tiny ones in 3 significant digits), whole numbers with thousands commas."""
    if isinstance(value, float):
        small = abs(value) < 0.5 * 10.0 ** -digits and value != 0
        return f"{value:.3g}" if small else f"{value:.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


_NUMBER = re.compile(r"^[+\-−±]?[\d,]*\.?\d+%?$")  # a pre-formatted number cell: 0.7442, +1.2, 1,024, 12%


def _css_name(key: str) -> str:
    """A row key as a CSS class name: letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in key.lower())


def display_path(path) -> str:
    """A path as a published page may show it, never an absolute path of the machine that built it: relative to
    the data folder (``data/synthetic``) or the repository when inside them, else its last two parts
    (``…/flickr30k/images``)."""
    from hada.paths import data_dir, project_root

    path = Path(path).expanduser()
    if not path.is_absolute():
        return path.as_posix()
    resolved = path.resolve()
    for base, prefix in ((data_dir(), "data"), (project_root(), "")):
        try:
            relative = resolved.relative_to(Path(base).resolve())
        except ValueError:
            continue
        return "/".join(part for part in (prefix, relative.as_posix()) if part and part != ".") or "."
    return "…/" + "/".join(resolved.parts[-2:]) if len(resolved.parts) > 2 else resolved.name or "…"


def display_spec(spec: str) -> str:
    """A backbone spec (``name``, ``model:/weights/file.bin``) with any path in it shown by :func:`display_path`."""
    name, sep, rest = str(spec).partition(":")
    if sep and (rest.startswith(("/", "~")) or Path(rest).is_absolute()):
        return f"{name}:{display_path(rest)}"
    return str(spec)


def thumbnail_html(path, size: int = 96) -> str:
    """An image file as an ``<img>`` of at most ``size`` px a side, embedded in the page (a PNG data URI): the
    reader sees the image, and the page holds no path of the machine that built it."""
    import base64
    import io

    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
        width, height = im.size
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<img class="hada-thumb" src="data:image/png;base64,{data}" width="{width}" height="{height}" '
            f'alt="{html.escape(Path(path).name)}">')


@dataclass(repr=False)
class Table:
    """Rows of dicts with a ``name``; ``columns`` pairs a row key with its header. Floats show ``digits``
    decimals; strings are shown as given (pre-format a cell to choose its own format)."""

    rows: list[dict]
    columns: Sequence[tuple[str, str]] = (("name", "method"),) + METRIC_COLUMNS
    caption: str = ""
    digits: int = 1
    #: keys of columns holding image files: shown as the images themselves in HTML (a thumbnail embedded in the
    #: page, never the file's path), as the path in text
    images: Sequence[str] = ()

    def _cells(self) -> list[list[str]]:
        return [[_fmt(row.get(key, ""), self.digits) for key, _ in self.columns] for row in self.rows]

    def __str__(self) -> str:
        headers = [h for _, h in self.columns]
        cells = self._cells()
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in cells]
        return (self.caption + "\n" if self.caption else "") + "\n".join(line.rstrip() for line in lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        """The table in the theme's table style (``table``) inside its scroll container, so a wide table scrolls
        instead of being clipped; each cell carries its column's key as a class (``col-<key>``, for widths) and
        a column of numbers the class ``num`` (right-aligned, never wrapped): see ``book/_static/hada.css``."""
        def is_number(value) -> bool:
            return (isinstance(value, (int, float)) and not isinstance(value, bool)
                    or isinstance(value, str) and _NUMBER.match(value) is not None)

        numeric = {key for key, _ in self.columns  # a column of numbers only (blanks aside) is right-aligned
                   if any(row.get(key) not in (None, "") for row in self.rows)
                   and all(is_number(row.get(key)) for row in self.rows if row.get(key) not in (None, ""))}

        def cls(key: str) -> str:
            return f' class="col-{_css_name(key)}{" num" if key in numeric else ""}"'

        def cell(key: str, row: dict, text: str) -> str:
            if key in self.images and row.get(key):
                return f'<td class="col-{_css_name(key)} image">{thumbnail_html(row[key])}</td>'
            return f"<td{cls(key)}>{html.escape(text)}</td>"

        head = "".join(f"<th{cls(key)}>{html.escape(h)}</th>" for key, h in self.columns)
        body = "".join(
            "<tr>" + "".join(cell(key, row, c) for (key, _), c in zip(self.columns, cells)) + "</tr>"
            for row, cells in zip(self.rows, self._cells())
        )
        # the caption sits above the scroll container, so it wraps at the page's width however wide the table is
        caption = f'<p class="hada-table-caption">{html.escape(self.caption)}</p>' if self.caption else ""
        label = f' aria-label="{html.escape(self.caption)}"' if self.caption else ""
        return (f'{caption}<div class="pst-scrollable-table-container hada-table-scroll">'
                f'<table class="table hada-table"{label}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
                "</div>")

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r['name'] for r in self.rows]}")

    def best(self, key: str = "rsum") -> dict:
        return max(self.rows, key=lambda r: r[key])


#: The results' columns: the seed-mean recalls and Rsum, then the Rsum's spread over the seeds.
RESULT_COLUMNS = (("name", "method"),) + METRIC_COLUMNS + (("rsum_std", "± std"), ("seeds", "seeds"))


@dataclass(repr=False)
class ResultsTable(Table):
    """Backbones, fusion baselines and HADA on one split. Rows carry ``kind`` (:data:`hada.metrics.ROW_KINDS`);
    a trained row's metrics are the mean over its seeds, ``rsum_std`` their standard deviation. ``systems`` and
    ``caption_image_index`` (from ``hada.experiments.result_systems``) keep the per-query ranks the gains'
    bootstrap reads."""

    columns: Sequence[tuple[str, str]] = RESULT_COLUMNS
    systems: Sequence = ()
    caption_image_index: object = None

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

    def gain_over(self, kind: str) -> float:
        """HADA's relative Rsum gain over the row of ``kind`` (``average``, ``concat``, ...)."""
        return relative_gain(self.hada["rsum"], self.of_kind(kind)[0]["rsum"])


def system_row(system) -> dict:
    """A results row from a ``hada.experiments.SystemResult``: seed-mean metrics, Rsum std and the seeds (blank
    for a row that trains nothing; the std shows only with two seeds or more)."""
    std = system.std("rsum")
    return metric_row(system.name, system.mean(), kind=system.kind,
                      rsum_std="" if std != std else f"{std:.1f}",
                      seeds=", ".join(str(s) for s in system.seeds))


def metrics_table(rows: Sequence[tuple[str, Mapping[str, float]]], caption: str = "") -> Table:
    """``(name, metrics)`` pairs as a table of the six recalls and Rsum, two decimals (what the CLI prints)."""
    return Table([metric_row(name, m) for name, m in rows], columns=(("name", "model"),) + METRIC_COLUMNS,
                 caption=caption, digits=2)


# ------------------------------------------------------------------------------------------ the claim
CLAIM_COLUMNS = (("name", "source"), ("data", "data"), ("backbones", "backbones"),
                 ("gain", "HADA vs best backbone, Rsum"))
PAPER_CLAIM = {"name": "paper (Nguyen et al., 2023)", "data": "Flickr30k", "backbones": "ALBEF + LightningDOT",
               "gain": "+3.6% (reported)"}


@dataclass(repr=False)
class ClaimTable(Table):
    """The paper's claim beside this build's measurement, clearly labelled as different experiments."""

    columns: Sequence[tuple[str, str]] = CLAIM_COLUMNS
    measured_gain: float = 0.0

    @classmethod
    def of(cls, results: ResultsTable, dataset: str) -> "ClaimTable":
        best, gain = results.best_backbone, results.gain_over_best_backbone
        measured = {"name": "this build", "data": dataset, "backbones": f"best single: {best['name']}",
                    "gain": f"{gain:+.1f}% (Rsum {best['rsum']:.1f} → {results.hada['rsum']:.1f})"}
        return cls([PAPER_CLAIM, measured], measured_gain=gain)


# ---------------------------------------------------------------------------- gains with their intervals
GAIN_COLUMNS = (("name", "HADA's gain over"), ("reference", "its Rsum"), ("hada", "HADA Rsum"),
                ("difference_text", "Δ Rsum [95% interval]"), ("relative_text", "relative [95% interval]"),
                ("verdict", "claim"))

VERDICT_PHRASES = {"holds": "holds (its interval lies above zero)",
                   "within noise": "is within noise (its interval contains zero)",
                   "reversed": "is reversed (its interval lies below zero)"}


def gain_row(key: str, name: str, reference_rsum: float, hada_rsum: float, boot) -> dict:
    """One comparison from a ``hada.metrics.PairedBootstrap``: numbers for glue, formatted cells for the page. An
    interval's two ends are joined by a no-break space, so a narrow column breaks a cell only between the estimate
    and its interval (``book/_static/hada.css``)."""
    (low, high), (rel_low, rel_high) = boot.difference_interval, boot.relative_interval
    return {"key": key, "name": name, "reference": reference_rsum, "hada": hada_rsum,
            "difference": boot.difference, "low": low, "high": high,
            "relative": boot.relative, "relative_low": rel_low, "relative_high": rel_high,
            "difference_text": f"{boot.difference:+.1f} [{low:+.1f},\u00a0{high:+.1f}]",
            "relative_text": f"{boot.relative:+.1f}% [{rel_low:+.1f},\u00a0{rel_high:+.1f}]",
            "verdict": boot.verdict, "phrase": VERDICT_PHRASES[boot.verdict]}


@dataclass(repr=False)
class GainTable(Table):
    """HADA's Rsum gain over each reference with its paired bootstrap interval over test images; ``gain(key)``
    is the row of a comparison (best, average, concat) for glue."""

    columns: Sequence[tuple[str, str]] = GAIN_COLUMNS

    def gain(self, key: str) -> dict:
        return next(r for r in self.rows if r["key"] == key)

    def summary(self) -> str:
        """Which gains hold and which do not, as one clause for the page (from the computed intervals)."""
        groups: dict[str, list[str]] = {}
        for row in self.rows:
            groups.setdefault(row["verdict"], []).append(row["name"])
        words = {"holds": "hold", "within noise": "are within noise", "reversed": "are reversed"}
        parts = []
        for verdict in ("holds", "within noise", "reversed"):
            names = groups.get(verdict, [])
            if names:
                listed = list_phrase(names)
                verb = words[verdict] if len(names) > 1 else VERDICT_PHRASES[verdict].split(" (")[0]
                parts.append(f"the gain{'s' if len(names) > 1 else ''} over {listed} {verb}")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------ fusion and strength
@dataclass(repr=False)
class RecipeTable(Table):
    """One row per recipe trained on the same data (``hada.experiments.RecipeResult``), the book's first."""

    columns: Sequence[tuple[str, str]] = (("name", "recipe"),) + METRIC_COLUMNS + (
        ("epochs", "epochs run"), ("speed", "train pairs / s"), ("parameters", "trained parameters"))

    @classmethod
    def of(cls, results, caption: str = "") -> "RecipeTable":
        return cls([metric_row(r.recipe, r.metrics, epochs=r.epochs, speed=f"{r.pairs_per_second:,.0f}",
                               parameters=r.parameters, result=r) for r in results], caption=caption)

    def slowdown(self, name: str) -> float:
        """How many times longer recipe ``name`` takes per training pair than the book's (the first row)."""
        return self.rows[0]["result"].pairs_per_second / self.row(name)["result"].pairs_per_second

    def size_ratio(self, name: str) -> float:
        """How many times as many parameters recipe ``name`` trains as the book's."""
        return self.row(name)["parameters"] / self.rows[0]["parameters"]



STRENGTH_COLUMNS = (("name", "pair (main first)"), ("zero_shot", "zero-shot A / B"), ("a", "HADA on A"),
                    ("b", "HADA on B"), ("ratio", "weaker / stronger"), ("disagreement", "disagree, %"),
                    ("hada", "HADA on A + B"), ("gain", "fusion gain"), ("beyond", "beyond noise"))


@dataclass(repr=False)
class StrengthTable(Table):
    """One row per backbone pair (``hada.experiments.StrengthPoint``), weakest first: each backbone's zero-shot
    Rsum, HADA trained on each alone and on the pair, and the fusion gain (the pair over the better single);
    ``noise`` is twice the seed std of HADA's Rsum, the band within which a gain is not told apart from none."""

    columns: Sequence[tuple[str, str]] = STRENGTH_COLUMNS
    noise: float = float("nan")

    @classmethod
    def of(cls, points, noise: float) -> "StrengthTable":
        rows = [{"name": " + ".join(backbone_labels(p.pair)),
                 "zero_shot": f"{p.zero_shot[0]:.1f} / {p.zero_shot[1]:.1f}",
                 "a": p.singles[0], "b": p.singles[1], "ratio": f"{p.ratio:.2f}", "disagreement": p.disagreement,
                 "hada": p.hada, "gain": f"{p.gain:+.1f}",
                 "beyond": "yes" if p.gain > noise else ("below" if p.gain < -noise else "no"),
                 "point": p} for p in sorted(points, key=lambda p: (p.best, p.ratio))]
        return cls(rows, noise=noise, caption=f"HADA (K=2) on weaker and stronger backbone pairs and on each backbone "
                                              f"alone (K=1), test Rsum; noise = ±{noise:.1f} (twice the seed std of "
                                              f"HADA's Rsum)")

    @property
    def points(self) -> list:
        return [r["point"] for r in self.rows]

    def helped(self) -> list:
        """The pairs where HADA on both backbones beats HADA on the better one alone by more than the noise."""
        return [p for p in self.points if p.gain > self.noise]

    def not_helped(self) -> list:
        return [p for p in self.points if p.gain <= self.noise]

    def lowest(self):
        """The pair with the smallest fusion gain (None without pairs)."""
        return min(self.points, key=lambda p: p.gain, default=None)

    def highest(self):
        """The pair with the largest fusion gain (None without pairs)."""
        return max(self.points, key=lambda p: p.gain, default=None)

    @staticmethod
    def describe(points) -> str:
        """Pairs as prose: ``A + B (+12.3 at a strength ratio of 0.74)``, joined; "no pair" for none."""
        return list_phrase([f"{' + '.join(p.pair)} ({p.gain:+.1f} at a strength ratio of {p.ratio:.2f})"
                            for p in points if p is not None]) or "no pair"

    def rank_correlation(self) -> float:
        """Spearman's rank correlation between the strength ratio and the fusion gain over the pairs (nan with
        fewer than three): whether pairs closer in strength gain more."""
        return rank_correlation([p.ratio for p in self.points], [p.gain for p in self.points])

    def figure(self):
        """The plot of :func:`hada.book.figures.plot_fusion_strength`; None without pairs (real backbones)."""
        from hada.book.figures import plot_fusion_strength

        if not self.rows:
            return None
        return plot_fusion_strength([{"label": " + ".join(backbone_labels(p.pair)), "ratio": p.ratio, "gain": p.gain,
                                      "disagreement": p.disagreement} for p in self.points], self.noise)


# ------------------------------------------------------------------------------------------ ablations
ABLATION_COLUMNS = (("name", "variant"),) + METRIC_COLUMNS + (("delta", "Δ Rsum"), ("epochs", "epochs run"))


@dataclass(repr=False)
class AblationTable(Table):
    """One row per variant, the default first; ``delta`` is each row's Rsum change from the default.
    ``seed_rsums`` are the test Rsums of the default trained with other seeds (the first is the default's own);
    a variant differs by more than the seed spread when ``|delta|`` exceeds :attr:`spread`."""

    columns: Sequence[tuple[str, str]] = ABLATION_COLUMNS
    seed_rsums: Sequence[float] = ()

    @property
    def seed_std(self) -> float:
        """Sample standard deviation (n - 1) of the default's Rsum over its seeds."""
        return seed_std(self.seed_rsums)

    @property
    def spread(self) -> float:
        """Twice the seed std: the band around the default within which a variant is not told apart from it."""
        return seed_band(self.seed_rsums)

    def beyond_spread(self) -> list[dict]:
        """The variants whose Rsum differs from the default's by more than :attr:`spread`."""
        return [r for r in self.variants if beyond(r["delta"], self.spread)]

    def beyond_text(self) -> str:
        """The variants beyond the seed spread as ``name (+delta)``, for the page; "none" when there are none."""
        return "; ".join(f"{r['name']} ({r['delta']:+.1f})" for r in self.beyond_spread()) or "none"

    def mark_spread(self) -> "AblationTable":
        """Add the column saying, per variant, whether it lies outside the default's seed band."""
        if self.seed_rsums and "beyond" not in dict(self.columns):
            self.columns = tuple(self.columns) + (("beyond", f"beyond ±{self.spread:.1f}"),)
            for row in self.variants:
                row["beyond"] = "yes" if beyond(row["delta"], self.spread) else "no"
        return self

    @property
    def default(self) -> dict:
        return self.rows[0]

    @property
    def variants(self) -> list[dict]:
        return self.rows[1:]

    @property
    def worst(self) -> dict:
        return min(self.variants, key=lambda r: r["delta"])

    @property
    def best_variant(self) -> dict:
        return max(self.variants, key=lambda r: r["delta"])


# -------------------------------------------------------------------------------------- data and backbones
def split_count_table(counts: Mapping[str, Mapping[str, int]], expected: Mapping[str, int] | None = None) -> Table:
    """Images and captions per split and in total, beside the Karpathy image counts when known."""
    rows = [{"name": split, "images": c["images"], "captions": c["captions"]} for split, c in counts.items()]
    if expected:
        for row in rows:
            want = expected.get(row["name"])
            row["expected"] = "" if want is None else f"{want:,}" + ("" if want == row["images"] else "  (differs)")
    rows.append({"name": "total", "images": sum(r["images"] for r in rows),
                 "captions": sum(r["captions"] for r in rows)})
    columns = (("name", "split"), ("images", "images"), ("captions", "captions"))
    return Table(rows, columns=columns + ((("expected", "expected images"),) if expected else ()))


def zeroshot_table(results: Mapping[str, dict], title: str = "") -> Table:
    """Each backbone's zero-shot recalls and Rsum, then its per-attribute pair accuracy when measured."""
    kinds = sorted({k for r in results.values() for k in r.get("attributes", {})})
    rows = []
    for name, r in results.items():
        row = metric_row(name, r["recalls"])
        row.update({k: f"{r['attributes'][k]:.0f}" for k in kinds if k in r.get("attributes", {})})
        rows.append(row)
    note = (f"(recalls in %; {', '.join(kinds)}: % of one-edit near-duplicate pairs told apart, chance 50)"
            if kinds else "")
    caption = "\n".join(line for line in (title, note) if line)
    return Table(rows, columns=(("name", "backbone"),) + METRIC_COLUMNS + tuple((k, k) for k in kinds),
                 caption=caption)


def setting_table(setting) -> Table:
    """A chapter's resolved parameters (a ``hada.experiments.Setting``): data, backbones, budget, split sizes."""
    rows = [{"name": "dataset", "value": f"{setting.dataset} ({display_path(setting.data_root)})"},
            {"name": "backbones (first = main)", "value": ", ".join(display_spec(b) for b in setting.backbones)},
            {"name": "training budget", "value": f"{setting.epochs} epochs of {setting.pairs_per_epoch or 'all'} "
                                                 f"pairs, seed {setting.seed}"}]
    rows += [{"name": f"{split} split", "value": f"{c['images']:,} images, {c['captions']:,} captions"}
             for split, c in setting.counts.items() if c["images"]]
    return Table(rows, columns=(("name", "setting"), ("value", "value")))
