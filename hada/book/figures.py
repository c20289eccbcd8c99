"""Figures for the book: one function per picture, so chapters stay one call + one figure.

Functions take plain data (dicts, arrays, networkx graphs) and return the matplotlib Figure, which
Jupyter displays; nothing here trains or reads the feature store. ``GraphSample`` holds one image's and
one caption's graphs and draws them (figure and edge-count table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

BACKBONE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
#: Edge colour per edge type name of ``hada.model.graph.EDGE_TYPES``.
EDGE_COLOURS = {"fc": "#555555", "fcx": "#d62728", "cc": "#17becf", "ffx": "#bcbd22", "self": "#bbbbbb"}


def plot_history(history: Sequence[Mapping], title: str = "") -> plt.Figure:
    """Training curves: loss, validation Rsum, and the learned temperature and mix weight per epoch."""
    epochs = [h["epoch"] for h in history]
    panels = [("train loss", "loss"), ("val Rsum", "val_rsum"), ("temperature $\\tau$", "tau"),
              ("mix weight $w$", "mix_weight")]
    panels = [(label, key) for label, key in panels if any(key in h for h in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 2.8), squeeze=False)
    for ax, (label, key) in zip(axes[0], panels):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_rsum_bars(rows: Sequence[Mapping], title: str = "", highlight: str = "HADA") -> plt.Figure:
    """A horizontal bar per method (rows with `name` and `rsum`), HADA rows highlighted."""
    names = [r["name"] for r in rows]
    values = [r["rsum"] for r in rows]
    colours = ["#d62728" if highlight in n else "#7f7f7f" for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 0.42 * len(rows) + 1.0))
    ax.barh(range(len(rows)), values, color=colours)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("Rsum on the test split (max 600)")
    ax.set_xlim(0, max(values) * 1.12)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _clip_limit(values: Sequence[float], centre: float, spread: float) -> float | None:
    """Where to cut the axis so that one far-off bar (K=3 beside K=2 variants) does not flatten the others: past
    1.5 times the largest other distance from ``centre`` when the farthest is over 3 times that; else None."""
    distances = sorted(abs(v - centre) for v in values)
    if len(distances) < 3 or distances[-1] <= 3 * max(distances[-2], spread if spread == spread else 0, 1e-9):
        return None
    return centre + 1.5 * max(distances[-2], spread if spread == spread else 0)


def plot_rsum_bars_with_band(rows: Sequence[Mapping], centre: float, spread: float, seed_values: Sequence[float] = (),
                             title: str = "", highlight: str = "default") -> plt.Figure:
    """:func:`plot_rsum_bars` zoomed on the highlighted row, with a shaded band ``centre +- spread`` (its seed
    noise) and its seeds' values as ticks, so a bar ending outside the band reads as a real difference. A bar far
    beyond the others is cut at the axis edge and keeps its value as a label."""
    values = [r["rsum"] for r in rows]
    limit = _clip_limit(values, centre, spread)
    shown = [dict(r, rsum=min(r["rsum"], limit)) if limit else r for r in rows]
    fig = plot_rsum_bars(shown, title=title, highlight=highlight)
    fig.set_size_inches(7.5, 0.42 * len(rows) + 1.8)
    ax = fig.axes[0]
    for text in list(ax.texts):
        text.remove()
    for i, v in enumerate(values):
        cut = limit is not None and v > limit
        ax.text(min(v, limit) if cut else v, i, f" {v:.1f}" + (" (axis cut)" if cut else ""), va="center",
                fontsize=8)
    if spread == spread and spread > 0:  # not nan: at least two seeds
        ax.axvspan(centre - spread, centre + spread, color="#1f77b4", alpha=0.18, zorder=0,
                   label=f"default ± {spread:.1f} (2 std over {len(seed_values)} seeds)")
    if seed_values:
        row = next((i for i, r in enumerate(rows) if highlight in r["name"]), 0)
        ax.plot(list(seed_values), [row] * len(seed_values), "|", color="black", ms=14, mew=1.5,
                label="default, each seed")
    reach = max(min(v, limit) if limit else v for v in values)
    low = min(values + [centre - (spread if spread == spread else 0)])
    ax.set_xlim(max(0.0, low - 0.3 * (reach - low)), reach + 0.22 * (reach - low))
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.13), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _node_positions(graph) -> dict:
    """Each backbone's feature tokens on an arc around its CLS node; the CLS nodes in the middle."""
    backbones = sorted({d["backbone"] for _, d in graph.nodes(data=True)})
    positions = {}
    for k in backbones:
        angle = 2 * np.pi * k / len(backbones) + np.pi / 2
        centre = np.array([np.cos(angle), np.sin(angle)])
        cls = [n for n, d in graph.nodes(data=True) if d["backbone"] == k and d["is_cls"]]
        feats = [n for n, d in graph.nodes(data=True) if d["backbone"] == k and not d["is_cls"]]
        for n in cls:
            positions[n] = 0.45 * centre
        spread = np.linspace(-0.9, 0.9, max(len(feats), 1)) * (np.pi / max(len(backbones), 2))
        for n, a in zip(feats, spread):
            positions[n] = 1.6 * np.array([np.cos(angle + a), np.sin(angle + a)])
    return positions


def draw_node_graph(graph, title: str = "", backbone_names: Sequence[str] | None = None, ax=None):
    """Draw one sample's HADA graph: nodes coloured by backbone (CLS nodes large), edges by type."""
    import networkx as nx
    from matplotlib.lines import Line2D

    from hada.model.graph import EDGE_TYPE_LABELS, EDGE_TYPES

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 5.6))
    else:
        fig = ax.figure
    pos = _node_positions(graph)
    nodes = list(graph.nodes(data=True))
    nx.draw_networkx_nodes(
        graph, pos, ax=ax, nodelist=[n for n, _ in nodes],
        node_color=[BACKBONE_COLOURS[d["backbone"] % len(BACKBONE_COLOURS)] for _, d in nodes],
        node_size=[260 if d["is_cls"] else 40 for _, d in nodes], edgecolors="black", linewidths=0.4,
    )
    present = []
    for name in EDGE_TYPES:
        edges = [(u, v) for u, v, d in graph.edges(data=True) if d["type"] == name and u != v]
        if edges:
            present.append(name)
            nx.draw_networkx_edges(graph, pos, ax=ax, edgelist=edges, edge_color=EDGE_COLOURS[name],
                                   width=1.4 if name == "cc" else 0.5, alpha=0.8, arrowsize=6,
                                   connectionstyle="arc3,rad=0.08", node_size=40)
    has_self = any(u == v for u, v in graph.edges())
    ax.set_axis_off()
    names = backbone_names or [f"backbone {k}" for k in sorted({d["backbone"] for _, d in nodes})]
    handles = [Line2D([], [], marker="o", ls="", color=BACKBONE_COLOURS[k % len(BACKBONE_COLOURS)],
                      label=f"{n} (CLS large)") for k, n in enumerate(names)]
    labels = dict(zip(EDGE_TYPES, EDGE_TYPE_LABELS))
    handles += [Line2D([], [], color=EDGE_COLOURS[t], label=labels[t]) for t in present]
    if has_self:
        handles.append(Line2D([], [], ls="", marker="$\\circlearrowleft$", color=EDGE_COLOURS["self"],
                              label=labels["self"] + " (every node, not drawn)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def graph_pair_figure(image_graph, text_graph, image_title: str, text_title: str,
                      backbone_names: Sequence[str] | None = None, figsize=(12, 5.2)) -> plt.Figure:
    """An image graph and a caption graph side by side, one legend (on the right) for both."""
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    draw_node_graph(image_graph, image_title, backbone_names, ax=axes[0])
    draw_node_graph(text_graph, text_title, backbone_names, ax=axes[1])
    axes[0].get_legend().remove()
    fig.tight_layout()
    return fig


@dataclass
class GraphSample:
    """One image and one caption of a split as HADA graphs (networkx), with the backbones' token counts."""

    backbones: tuple[str, ...]
    image_counts: tuple[int, ...]
    text_counts: tuple[int, ...]
    caption: str
    image_graph: object
    text_graph: object

    def figure(self) -> plt.Figure:
        import textwrap

        caption = textwrap.fill(f"caption: “{self.caption}”", 70)
        return graph_pair_figure(self.image_graph, self.text_graph, "image: CLS + patch tokens", caption,
                                 self.backbones, figsize=(13, 5.6))

    def count_table(self):
        """Nodes, edges and edges per type of both graphs."""
        from collections import Counter

        from hada.book.tables import Table
        from hada.model.graph import EDGE_TYPE_LABELS, EDGE_TYPES

        rows = []
        for label, graph, counts in (("image", self.image_graph, self.image_counts),
                                     ("caption", self.text_graph, self.text_counts)):
            types = Counter(d["type"] for _, _, d in graph.edges(data=True))
            row = {"name": label, "nodes": graph.number_of_nodes(), "edges": graph.number_of_edges(),
                   "tokens": " + ".join(str(c) for c in counts)}
            row.update({t: types.get(t, 0) for t in EDGE_TYPES})
            rows.append(row)
        columns = (("name", "graph"), ("tokens", "tokens per backbone"), ("nodes", "nodes"), ("edges", "edges"))
        columns += tuple((t, label.split(" (")[0]) for t, label in zip(EDGE_TYPES, EDGE_TYPE_LABELS))
        return Table(rows, columns=columns)


def show_samples(records, n: int = 8, captions_per_image: int = 1, cols: int = 4) -> plt.Figure:
    """A grid of images, each with its first captions (wrapped) underneath."""
    import textwrap

    from PIL import Image

    records = list(records)[:n]
    rows = (len(records) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, rec in zip(axes.flat, records):
        with Image.open(rec.path) as im:
            ax.imshow(im.convert("RGB"), interpolation="nearest")
        text = "\n".join(textwrap.fill(c, 36) for c in rec.captions[:captions_per_image])
        ax.text(0.0, -0.04, text, transform=ax.transAxes, fontsize=7, va="top", ha="left")
    fig.subplots_adjust(hspace=0.75, wspace=0.08, left=0.02, right=0.98, top=0.98, bottom=0.12)
    return fig


def retrieval_grid(queries: Sequence[Mapping], methods: Sequence[str], frame: str = "#2ca02c") -> plt.Figure:
    """Text -> image retrieval, seen: one row per query caption, each method's top images side by side.

    ``queries``: dicts with ``caption``, ``note`` (a line under it) and ``results``: per method name a list of
    ``{"path", "score", "correct"}`` in rank order. Correct images (the caption's own) get a thick frame.
    """
    import textwrap

    from PIL import Image

    top = max(len(q["results"][m]) for q in queries for m in methods) if queries else 0
    cols = len(methods) * top + (len(methods) - 1)  # one narrow gap between methods
    ratios = ([1.0] * top + [0.25]) * (len(methods) - 1) + [1.0] * top
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.2 * cols + 0.4, 1.95 * len(queries) + 0.5),
                             squeeze=False, gridspec_kw={"width_ratios": ratios})
    for ax in axes.flat:
        ax.set_axis_off()
    for r, query in enumerate(queries):
        for m, method in enumerate(methods):
            for i, hit in enumerate(query["results"][method]):
                ax = axes[r, m * (top + 1) + i]
                with Image.open(hit["path"]) as im:
                    ax.imshow(im.convert("RGB"), interpolation="nearest")
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor(frame if hit["correct"] else "#cccccc")
                    spine.set_linewidth(4.0 if hit["correct"] else 0.6)
                ax.set_xlabel(f"{i + 1}. {hit['score']:.3f}", fontsize=9.5, labelpad=2)
                if i == 0 and r == 0:
                    ax.set_title(method, fontsize=12, loc="left", fontweight="bold", pad=44)
        text = textwrap.shorten(f"“{query['caption']}”", int(11 * 1.2 * cols), placeholder=" …")
        first = axes[r, 0]
        first.text(0.0, 1.05, text + ("\n" + query["note"] if query.get("note") else ""),
                   transform=first.transAxes, fontsize=11, va="bottom", ha="left", clip_on=False, linespacing=1.35)
    height = 2.3 * len(queries) + 0.7
    fig.set_size_inches(1.2 * cols + 0.4, height)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.95 / height, bottom=0.03, hspace=0.95, wspace=0.06)
    return fig


def plot_fusion_strength(points: Sequence[Mapping], noise: float | None = None) -> plt.Figure:
    """The fusion gain of each pair (``points``: dicts with ``label``, ``ratio``, ``disagreement`` and ``gain``: HADA
    on the pair minus HADA on the better backbone alone) against how close the two are in strength and how
    differently they fail; the grey band is +-``noise`` (the seed spread), where a gain is not told apart from
    none."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = (("ratio", "strength: weaker single-backbone Rsum / stronger's"),
              ("disagreement", "difference: captions in the top 5 of exactly one (%)"))
    for ax, (key, label) in zip(axes, panels):
        xs, ys = [p[key] for p in points], [p["gain"] for p in points]
        if noise is not None and noise == noise:
            ax.axhspan(-noise, noise, color="#cccccc", alpha=0.5, lw=0, label=f"seed spread (±{noise:.1f})")
        ax.axhline(0, color="#555555", lw=0.8)
        ax.scatter(xs, ys, color="#d62728", zorder=3)
        for p, x, y in zip(points, xs, ys):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fusion gain (Rsum: pair − better single)")
    if noise is not None and noise == noise:
        axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
