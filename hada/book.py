"""What the book's chapters call: one function per paragraph of the paper, each returning a table or a
figure. Every heavy step goes through the cached ``hada`` pipeline (data -> backbones -> features ->
runs under ``data/``), so chapters can run in any order, alone (papermill), or all together.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from hada.errors import HadaError

FEATURE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Setting:
    """The parameters cell of a chapter, resolved: which data, which backbones, what budget."""

    dataset: str
    data_root: Path
    backbones: tuple[str, ...]
    epochs: int
    seed: int
    counts: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def dataset_label(self) -> str:
        return "the embedded synthetic data" if self.dataset == "synthetic" else self.dataset

    def backbones_for(self, k: int) -> tuple[str, ...]:
        if k > len(self.backbones):
            raise HadaError(f"K={k} needs {k} backbones; this setting has {len(self.backbones)}: "
                            f"{', '.join(self.backbones)}")
        return self.backbones[:k]

    def _repr_html_(self) -> str:
        rows = [("dataset", f"{self.dataset} ({self.data_root})"),
                ("backbones (first = main)", ", ".join(self.backbones)),
                ("training budget", f"{self.epochs} epochs, seed {self.seed}")]
        rows += [(f"{split} split", f"{c['images']:,} images, {c['captions']:,} captions")
                 for split, c in self.counts.items() if c["images"]]
        body = "".join(f"<tr><th>{html.escape(a)}</th><td>{html.escape(b)}</td></tr>" for a, b in rows)
        return f'<table class="hada-table">{body}</table>'

    def __repr__(self) -> str:
        return (f"Setting(dataset={self.dataset!r}, root={str(self.data_root)!r}, "
                f"backbones={list(self.backbones)}, epochs={self.epochs}, seed={self.seed})")


def _parse_backbones(backbones) -> tuple[str, ...]:
    from hada.backbones import EMBEDDED_BACKBONES

    if backbones in (None, "", "default"):
        return tuple(EMBEDDED_BACKBONES)
    if isinstance(backbones, str):
        backbones = [b.strip() for b in backbones.split(",") if b.strip()]
    if len(backbones) < 2:
        raise HadaError(f"HADA fuses at least two backbones; got {list(backbones)}")
    return tuple(backbones)


def setup(dataset: str = "synthetic", data_root=None, backbones="default", epochs: int = 12,
          seed: int = 0) -> Setting:
    """Check the data first (one clear error if it is missing), then make whatever the chapter needs.

    For the embedded default this generates the synthetic set and pretrains the embedded backbones when
    they are missing; for real data it only reads. Token features for train/val/test are extracted once.
    """
    from hada import synth
    from hada.data import default_root, load_dataset

    root = Path(data_root).expanduser() if data_root else default_root(dataset)
    if dataset == "synthetic" and data_root is None:
        synth.generate(root)
    ds = load_dataset(dataset, root)
    names = _parse_backbones(backbones)
    _ensure_backbones(names, ds)
    _ensure_features(dataset, root, names)
    return Setting(dataset, root, names, int(epochs), int(seed), counts=ds.counts())


def _ensure_backbones(names, ds) -> None:
    from hada.backbones import EMBEDDED_BACKBONES
    from hada.backbones.pretrain import pretrain

    embedded = [n for n in names if n in EMBEDDED_BACKBONES]
    if embedded:
        if ds.name != "synthetic":
            pass  # embedded backbones are pretrained on the synthetic pretrain split only
        pretrain(embedded)


def _ensure_features(dataset, root, names) -> None:
    from hada.features import ensure_features

    ensure_features(dataset, list(names), list(FEATURE_SPLITS), data_root=root)


def split_counts(setting: Setting):
    """Images and captions per split, as a table."""
    from hada.report import Table

    rows = [{"name": s, "images": c["images"], "captions": c["captions"]} for s, c in setting.counts.items()]
    return Table(rows, columns=(("name", "split"), ("images", "images"), ("captions", "captions")))


def sample_figure(setting: Setting, split: str = "test", n: int = 8):
    """The first ``n`` images of a split with two of their captions each."""
    from hada import plots
    from hada.data import load_dataset

    records = load_dataset(setting.dataset, setting.data_root, check_images=False).split(split)
    return plots.show_samples(records, n=n)


def method_figure(setting: Setting | None = None, image_counts=(7, 5), text_counts=(5, 4)):
    """The paper's method figure, drawn from ``hada.graph``: one image and one caption, two backbones."""
    import matplotlib.pyplot as plt

    from hada import plots
    from hada.graph import EdgeWeights, to_networkx

    names = ("backbone A (e.g. ALBEF)", "backbone B (e.g. LightningDOT)")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    plots.draw_node_graph(to_networkx(image_counts, EdgeWeights()), "image graph: CLS + patch tokens",
                          names, ax=axes[0])
    plots.draw_node_graph(to_networkx(text_counts, EdgeWeights()), "caption graph: CLS + word tokens",
                          names, ax=axes[1])
    axes[0].get_legend().remove()
    fig.tight_layout()
    return fig


def edge_weight_table(setting: Setting | None = None):
    """The edge types with the paper's weights, straight from ``hada.graph.EdgeWeights``."""
    from hada.graph import EDGE_TYPE_LABELS, EDGE_TYPES, EdgeWeights
    from hada.report import Table

    weights = EdgeWeights()
    values = dict(zip(EDGE_TYPES, (weights.w_fc, weights.w_fcx, weights.w_cc, weights.w_ffx, weights.w_self)))
    rows = [{"name": label, "weight": "no edges" if values[t] is None else values[t]}
            for t, label in zip(EDGE_TYPES, EDGE_TYPE_LABELS)]
    return Table(rows, columns=(("name", "edge type"), ("weight", "weight (paper default)")))
