"""The book's views of what the computing modules return: figures and tables drawn from their plain data.

The computing modules (``hada.attention``, ``hada.search``, ``hada.features.store``, ...) return dataclasses and
rows and import nothing from ``hada.book``; this module draws them, so a colour or a caption changed here changes
no run's key (``hada.runs.code_digest``) and trains nothing.

* :class:`AttentionView`: the attention figures of :class:`hada.attention.AttentionExamples`;
* :class:`RetrievalView`: the figure, table and galleries of :class:`hada.search.TextToImageComparison`;
* :func:`hits_table`: a search's hits; :func:`store_size_table`: a projected feature store's size;
* :class:`GraphSample`: one sample as HADA graphs, its figure and its node and edge counts.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hada.attention import MASS_PARTS, AttentionMass, upsample
from hada.book.figures import BACKBONE_COLOURS, FULL_WIDTH_PX, graph_pair_figure, retrieval_grid
from hada.book.tables import Table
from hada.search import Hit

MASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9e9e9e")


# ------------------------------------------------------------------------------------------ attention
class AttentionView:
    """:class:`hada.attention.AttentionExamples` with its two figures; every other attribute is the examples'."""

    def __init__(self, examples):
        self.examples = examples

    def __getattr__(self, name):
        if name == "examples":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.examples, name)

    def image_figure(self):
        return attention_image_figure(self.examples)

    def text_figure(self):
        return attention_text_figure(self.examples)


def _centre_square(path: Path) -> np.ndarray:
    """The image's central square crop: the region open_clip's eval transform (resize + centre crop) sees."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return np.asarray(im.crop((left, top, left + s, top + s)))


def attention_image_figure(examples):
    """One row per image: the image, each (CLS node, patch grid) heatmap, and each CLS node's attention mass.

    Heatmaps share the image's extent; each panel's colour scale runs from 0 to its own maximum (so the
    pattern is visible) and its title gives the mass on those patches (sum) and how peaked it is (max/mean;
    1.0 = uniform). Failure rows are framed and captioned in red, with one of the image's true captions.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    items, names = examples.items, examples.backbone_names
    if not items:
        return _empty_figure("no examples to show")
    K = items[0].nodes.num_backbones
    panels = [(k, j) for k in range(K) for j in examples.grid_backbones]
    cols = 2 + len(panels)
    # as wide as a full-width cell shows it unscaled (hada.book.figures.FULL_WIDTH_PX) with two backbones; wider
    # with more, and then every font grows by as much as the page will shrink the figure
    row_h, width = 2.75, 1.55 * cols + 0.4
    zoom = max(1.0, width * 96 / FULL_WIDTH_PX)
    height = row_h * len(items) + 0.9
    fig, axes = plt.subplots(len(items), cols, figsize=(width, height), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * (cols - 1) + [1.5]})
    extent = (0.0, 1.0, 1.0, 0.0)
    wrap = int(width * 11 / zoom)  # characters per caption line at font size 8
    for r, item in enumerate(items):
        row = axes[r]
        image = _centre_square(item.path)
        colour = "#2ca02c" if item.correct else "#d62728"
        ax = row[0]
        ax.imshow(image, extent=extent, interpolation="bilinear")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(1.5 if item.correct else 3.0)
        ax.set_title(f"image {item.image_id}\n" + ("correct top-1" if item.correct else "FAILURE"), fontsize=8 * zoom,
                     color=colour, fontweight="normal" if item.correct else "bold")
        for ax, (k, j) in zip(row[1:], panels):
            grid = item.grid(k, j)
            heat = upsample(grid)
            ax.imshow(image, extent=extent, interpolation="bilinear")
            ax.imshow(heat, extent=extent, cmap="inferno", alpha=0.55, vmin=0.0, vmax=max(float(heat.max()), 1e-12))
            ax.set_axis_off()
            total = float(grid.sum())
            peak = float(grid.max()) / max(total / grid.size, 1e-12)
            where = "own" if k == j else "other"
            ax.set_title(f"CLS {names[k]} →\n{names[j]} patches ({grid.shape[0]}×{grid.shape[1]})\n"
                         f"{where}: Σ={total:.2f}\nmax/mean={peak:.1f}", fontsize=7 * zoom)
        _mass_bars(row[-1], [item.mass(k) for k in range(K)], names, zoom)
        lines = [f"HADA's top caption: {item.top_caption}"]
        if not item.correct:
            lines.append(f"a true caption: {item.captions[0]}")
        text = "\n".join(textwrap.shorten(line, wrap, placeholder=" …") for line in lines)
        row[0].text(0.0, -0.05, text, transform=row[0].transAxes, fontsize=8 * zoom, va="top", ha="left", color=colour,
                    clip_on=False)
    layer = f"layer {examples.layer + 1} of {examples.num_layers}, " if examples.num_layers > 1 else ""
    fig.suptitle(f"Image encoder: each CLS node's attention ({examples.gnn}, {layer}mean over heads), "
                 f"{examples.split} split", fontsize=10 * zoom, y=1 - 0.1 / height)
    fig.legend(handles=[Patch(color=c, label=p) for p, c in zip(MASS_PARTS, MASS_COLOURS)], loc="lower right",
               ncol=4, fontsize=8 * zoom, frameon=False, title="attention mass on", title_fontsize=8 * zoom)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.75 / height, bottom=0.85 / height, hspace=0.55,
                        wspace=0.1)
    return fig


def _empty_figure(message: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 1))
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return fig


def _mass_bars(ax, masses: Sequence[AttentionMass], names: Sequence[str], zoom: float = 1.0) -> None:
    """Horizontal stacked bars: each CLS node's attention on own patches / other patches / other CLS / self."""
    y = np.arange(len(masses), dtype=float)
    left = np.zeros(len(masses))
    for p, colour in enumerate(MASS_COLOURS):
        v = np.array([m.as_tuple()[p] for m in masses])
        ax.barh(y, v, left=left, color=colour, height=0.5)
        for yi, (l0, vi) in enumerate(zip(left, v)):
            if vi >= 0.1:
                ax.text(l0 + vi / 2, yi, f"{vi:.2f}", ha="center", va="center", fontsize=7 * zoom, color="white")
        left += v
    for yi, name in enumerate(names):
        ax.text(0.0, yi - 0.3, f"CLS {name}", ha="left", va="bottom", fontsize=7 * zoom)
    ax.set_yticks([])
    ax.set_ylim(len(masses) - 0.5, -0.9)
    ax.set_xlim(0, max(1.0, float(left.max())))
    ax.tick_params(axis="x", labelsize=7 * zoom)
    ax.set_title("attention mass\nper CLS node", fontsize=8 * zoom)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def attention_text_figure(examples):
    """Grouped bars per backbone's caption tokens: one bar per CLS node, token strings on the x axis.

    Panels share the x range, so the same word sits at the same place when two backbones tokenise alike
    (a shorter context length simply ends earlier).
    """
    import matplotlib.pyplot as plt

    t, names = examples.text, examples.backbone_names
    if t is None:
        return _empty_figure("no caption to show")
    K = t.nodes.num_backbones
    widest = max(len(tok) for tok in t.tokens)
    fig, axes = plt.subplots(K, 1, figsize=(max(7.0, 0.32 * widest + 1.5), 2.7 * K + 0.9), squeeze=False)
    width = 0.8 / K
    for j, ax in enumerate(axes[:, 0]):
        labels = list(t.tokens[j])
        labels[0] = f"{labels[0]} (CLS)"
        x = np.arange(len(labels))
        for k in range(K):
            v = t.over_backbone(k, j)
            own = " (own)" if k == j else ""
            ax.bar(x + (k - (K - 1) / 2) * width, v, width, color=BACKBONE_COLOURS[k % len(BACKBONE_COLOURS)],
                   label=f"CLS {names[k]}{own}: Σ={float(v.sum()):.2f}")
        ax.set_xticks(x, labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_xlim(-0.6, widest - 0.4)
        ax.set_ylabel("attention", fontsize=9)
        ax.set_title(f"tokens of {names[j]}", fontsize=10, loc="left")
        ax.legend(fontsize=9, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=K, frameon=False,
                  borderaxespad=0.1)
        ax.tick_params(axis="y", labelsize=9)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    parts = ("own tokens", "other tokens", "other CLS", "itself")
    masses = "\n".join(f"CLS {names[k]}: " + ", ".join(f"{p} {v:.2f}" for p, v in zip(parts, t.mass(k).as_tuple()))
                       for k in range(K))
    layer = f"layer {examples.layer + 1} of {examples.num_layers}, " if examples.num_layers > 1 else ""
    fig.suptitle(f"Text encoder ({examples.gnn}, {layer}mean over heads): " + textwrap.fill(f"“{t.caption}”", 120)
                 + "\n" + masses, fontsize=9)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ search
def hits_table(hits: list[Hit], caption: str = ""):
    """The hits as the package's one table. Images: rank, the image itself (in HTML; its path in text), its id
    and score, each in its own column; captions: the text and its image's id."""
    known = any(h.correct is not None for h in hits)
    rows = [{"name": str(h.rank), "score": f"{h.score:.4f}", "image_id": str(h.image_id), "path": str(h.path),
             "caption": h.caption or "", "match": "" if h.correct is None else ("yes" if h.correct else "no")}
            for h in hits]
    columns = [("name", "rank")]
    if hits and hits[0].caption is not None:
        columns += [("caption", "caption"), ("image_id", "its image"), ("score", "score")]
        images = ()
    else:
        columns += [("path", "image"), ("image_id", "image id"), ("score", "score")]
        images = ("path",)
    if known:
        columns.append(("match", "query's own"))
    return Table(rows, columns=tuple(columns), caption=caption, images=images)


class RetrievalView:
    """:class:`hada.search.TextToImageComparison` with its figure, table and galleries; every other attribute is
    the comparison's."""

    def __init__(self, comparison):
        self.comparison = comparison

    def __getattr__(self, name):
        if name == "comparison":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.comparison, name)

    def figure(self):
        return retrieval_grid(self.comparison.queries(), self.comparison.methods)

    def galleries(self) -> "Galleries":
        """Each shown query's top images as a small gallery: one row per rank, and per method the image itself, its
        id, its score and whether it is the caption's own, each in its own column (HTML; text lists the files)."""
        tables = []
        for query in self.comparison.queries():
            rows, columns = [], [("name", "rank")]
            for m, method in enumerate(self.comparison.methods):
                columns += [(f"image{m}", method), (f"id{m}", "image id"), (f"score{m}", "score"),
                            (f"own{m}", "its own")]
            for rank in range(max(len(hits) for hits in query["results"].values())):
                row = {"name": str(rank + 1)}
                for m, method in enumerate(self.comparison.methods):
                    hits = query["results"][method]
                    if rank < len(hits):
                        hit = hits[rank]
                        row.update({f"image{m}": str(hit["path"]), f"id{m}": str(hit["image_id"]),
                                    f"score{m}": f"{hit['score']:.3f}", f"own{m}": "yes" if hit["correct"] else ""})
                rows.append(row)
            tables.append(Table(rows, columns=tuple(columns), images=tuple(f"image{m}" for m in range(len(self.comparison.methods))),
                                caption=f"“{query['caption']}” {query['note']}"))
        return Galleries(tables)

    def table(self):
        """One row per shown query: the caption, where each method ranks its image, and who wins."""
        a, b = self.comparison.methods
        words = {1: "wins", -1: "loses", 0: "tie"}
        rows = [{"name": self.comparison.captions[j], "a": int(self.comparison.ranks[a][j]) + 1, "b": int(self.comparison.ranks[b][j]) + 1,
                 "outcome": words[int(self.comparison.outcome[j])]} for j in self.comparison.shown]
        return Table(rows, columns=(("name", "query caption"), ("a", f"rank: {a}"), ("b", f"rank: {b}"),
                                    ("outcome", f"{b} vs {a}")))


@dataclass
class Galleries:
    """Tables shown one after another (a gallery per query): HTML in a chapter, text in a terminal."""

    tables: list

    def _repr_html_(self) -> str:
        return "".join(table._repr_html_() for table in self.tables)

    def __str__(self) -> str:
        return "\n\n".join(map(str, self.tables))

    __repr__ = __str__


# ------------------------------------------------------------------------------------------ the store
def store_size_table(size) -> Table:
    """:func:`hada.features.store.projected_store_size` as a table (GB = 1e9 bytes)."""
    cols = (("name", "backbone"), ("image_tokens", "image tokens"), ("text_tokens", "text tokens (padded)"),
            ("image_gb", "images GB"), ("caption_gb", "captions GB"), ("total_gb", "total GB"))
    return Table(size.rows, columns=cols,
                 caption=f"{size.dataset}: {size.n_images:,} images, {size.n_captions:,} captions, fp16 tokens")


# ------------------------------------------------------------------------------------------ the graph
@dataclass
class GraphSample:
    """One image and one caption of a split as HADA graphs (networkx), with the backbones' token counts."""

    backbones: tuple[str, ...]
    image_counts: tuple[int, ...]
    text_counts: tuple[int, ...]
    caption: str
    image_graph: object
    text_graph: object

    def figure(self):
        import textwrap

        caption = textwrap.fill(f"caption: “{self.caption}”", 48)
        return graph_pair_figure(self.image_graph, self.text_graph, "image: CLS + patch tokens", caption,
                                 self.backbones)

    def count_table(self):
        """Nodes, edges and edges per type of both graphs."""
        from collections import Counter

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
