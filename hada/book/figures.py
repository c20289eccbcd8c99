"""Figures for the book: one function per picture, so chapters stay one call + one figure.

Functions take plain data (dicts, arrays, networkx graphs) and return the matplotlib Figure, which
Jupyter displays; nothing here trains or reads the feature store. ``GraphSample`` holds one image's and
one caption's graphs and draws them (figure and edge-count table).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

#: Width in CSS pixels of the book's text column, and of a ``full-width`` cell, at a 1280 px window
#: (sphinx-book-theme, measured in headless Chromium). A figure is shown at its own size (96 px per inch, as an SVG)
#: or scaled down to that width, whichever is smaller; its text must still be :data:`MIN_TEXT_PX` tall.
CONTENT_PX = 690
FULL_WIDTH_PX = 935
MIN_TEXT_PX = 9.0

BACKBONE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
#: Edge colour per edge type name of ``hada.model.graph.EDGE_TYPES``.
EDGE_COLOURS = {"fc": "#555555", "fcx": "#d62728", "cc": "#17becf", "ffx": "#bcbd22", "self": "#bbbbbb"}


def displayed_text_px(fig: plt.Figure, column_px: float = CONTENT_PX) -> float:
    """Height in CSS pixels of the figure's smallest drawn text as the page shows it: saved with a tight bounding
    box at 96 px per inch, then scaled down to ``column_px`` when wider (:data:`CONTENT_PX`, or
    :data:`FULL_WIDTH_PX` for a ``full-width`` cell)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width_px = fig.get_tightbbox(renderer).width * 96
    hidden = set()  # tick labels of axes drawn without their axis
    for ax in fig.axes:
        if not ax.axison:
            hidden.update(ax.get_xticklabels() + ax.get_yticklabels())
    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and t not in hidden]
    return min(sizes) * 96 / 72 * min(1.0, column_px / width_px) if sizes else float("inf")


def plot_history(history: Sequence[Mapping], title: str = "") -> plt.Figure:
    """Training curves: loss, validation Rsum, and the learned temperature and mix weight per epoch, two panels a
    row (four in a row would be shrunk to the text column until their labels were unreadable)."""
    epochs = [h["epoch"] for h in history]
    panels = [("train loss", "loss"), ("val Rsum", "val_rsum"), ("temperature $\\tau$", "tau"),
              ("mix weight $w$", "mix_weight")]
    panels = [(label, key) for label, key in panels if any(key in h for h in history)]
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, key) in zip(axes.flat, panels):
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
    fig, ax = plt.subplots(figsize=(5.0, 0.42 * len(rows) + 1.0))
    ax.barh(range(len(rows)), values, color=colours)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    _value_labels(ax, values, [f"{v:.1f}" for v in values])
    ax.set_xlabel("Rsum on the test split (max 600)")
    ax.set_xlim(0, max(values) * 1.02)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _value_labels(ax, values: Sequence[float], labels: Sequence[str], fontsize: float = 10) -> None:
    """Each bar's value inside its end, in white (never against the frame); a bar too short for it gets it
    just outside, in black."""
    reach = max(values) if len(values) else 0.0
    for i, (v, label) in enumerate(zip(values, labels)):
        inside = v > 0.3 * reach
        ax.text(v, i, f"{label} " if inside else f" {label}", va="center", ha="right" if inside else "left",
                fontsize=fontsize, color="white" if inside else "black")


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
    fig.set_size_inches(5.5, 0.42 * len(rows) + 1.8)
    ax = fig.axes[0]
    for text in list(ax.texts):
        text.remove()
    _value_labels(ax, [r["rsum"] for r in shown],
                  [f"{v:.1f}" + (" (axis cut)" if limit is not None and v > limit else "") for v in values])
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
    ax.legend(loc="upper center", bbox_to_anchor=(0.4, -0.13), ncol=1, fontsize=10, frameon=False)
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
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=10, frameon=False)
    if title:
        ax.set_title(title, fontsize=12)
    fig.tight_layout()
    return fig


def graph_pair_figure(image_graph, text_graph, image_title: str, text_title: str,
                      backbone_names: Sequence[str] | None = None, figsize=(9.5, 5.6)) -> plt.Figure:
    """An image graph and a caption graph side by side, one legend (underneath) for both."""
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    draw_node_graph(image_graph, image_title, backbone_names, ax=axes[0])
    draw_node_graph(text_graph, text_title, backbone_names, ax=axes[1])
    axes[0].get_legend().remove()
    legend = axes[1].get_legend()
    handles, labels = legend.legend_handles, [t.get_text() for t in legend.get_texts()]
    legend.remove()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=11, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * (len(labels) + 1) / 2 * 5.6 / figsize[1], 1, 1))
    return fig


def show_samples(records, n: int = 8, captions_per_image: int = 1, cols: int = 4) -> plt.Figure:
    """A grid of images, each with its first captions (wrapped) underneath; as wide as the text column."""
    import textwrap

    from PIL import Image

    records = list(records)[:n]
    rows = (len(records) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.55 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, rec in zip(axes.flat, records):
        with Image.open(rec.path) as im:
            ax.imshow(im.convert("RGB"), interpolation="nearest")
        text = "\n".join(textwrap.fill(c, 24) for c in rec.captions[:captions_per_image])
        ax.text(0.0, -0.04, text, transform=ax.transAxes, fontsize=9, va="top", ha="left")
    fig.subplots_adjust(hspace=0.55, wspace=0.08, left=0.02, right=0.98, top=0.98, bottom=0.14)
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
                ax.set_xlabel(f"{i + 1}. {hit['score']:.3f}", fontsize=10.5, labelpad=2)
                if i == 0 and r == 0:
                    ax.set_title(method, fontsize=12, loc="left", fontweight="bold", pad=44)
        text = textwrap.shorten(f"“{query['caption']}”", int(10 * 1.2 * cols), placeholder=" …")
        first = axes[r, 0]
        first.text(0.0, 1.05, text + ("\n" + query["note"] if query.get("note") else ""),
                   transform=first.transAxes, fontsize=12, va="bottom", ha="left", clip_on=False, linespacing=1.35)
    height = 2.3 * len(queries) + 0.7
    fig.set_size_inches(1.2 * cols + 0.4, height)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.95 / height, bottom=0.03, hspace=0.95, wspace=0.06)
    return fig


def plot_fusion_strength(points: Sequence[Mapping], noise: float | None = None) -> plt.Figure:
    """The fusion gain of each pair (``points``: dicts with ``label``, ``ratio``, ``disagreement`` and ``gain``: HADA
    on the pair minus HADA on the better backbone alone) against how close the two are in strength and how
    differently they fail; the grey band is +-``noise`` (the seed spread), where a gain is not told apart from
    none. Each pair has its own marker and colour, named once in the legend under the panels, so no label can
    run into another or past the axes however close the points lie."""
    from matplotlib.lines import Line2D

    markers = "osD^v<>PXph*"
    styles = [(BACKBONE_COLOURS[i % len(BACKBONE_COLOURS)], markers[i % len(markers)]) for i in range(len(points))]
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.6), sharey=True)
    panels = (("ratio", "strength ratio\n(weaker single Rsum / stronger's)"),
              ("disagreement", "disagreement (% of captions in\nthe top 5 of exactly one)"))
    banded = noise is not None and noise == noise
    for ax, (key, label) in zip(axes, panels):
        if banded:
            ax.axhspan(-noise, noise, color="#cccccc", alpha=0.5, lw=0)
        ax.axhline(0, color="#555555", lw=0.8)
        for p, (colour, marker) in zip(points, styles):
            ax.scatter([p[key]], [p["gain"]], color=colour, marker=marker, s=55, zorder=3, edgecolors="black",
                       linewidths=0.5)
        ax.set_xlabel(label, fontsize=10)
        ax.tick_params(labelsize=10)
        ax.margins(x=0.15, y=0.15)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fusion gain, Rsum\n(pair − better single)", fontsize=10)
    handles = [Line2D([], [], ls="", marker=m, color=c, markeredgecolor="black", markeredgewidth=0.5, ms=7,
                      label=p["label"]) for p, (c, m) in zip(points, styles)]
    if banded:
        handles.append(Line2D([], [], ls="", marker="s", ms=10, color="#cccccc", label=f"seed spread (±{noise:.1f})"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=10, frameon=False)
    legend_height = 0.3 * ((len(handles) + 1) // 2) + 0.1  # inches: two names a row
    fig.set_size_inches(7.2, 3.6 + legend_height)
    fig.tight_layout(rect=(0, legend_height / (3.6 + legend_height), 1, 1))
    return fig
