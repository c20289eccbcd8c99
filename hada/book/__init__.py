"""What the book's chapters call: one function per paragraph of the paper, each computing its numbers and
handing them to a table (``hada.book.tables``) or a figure (``hada.book.figures``). Every heavy step goes through the cached ``hada`` pipeline (data -> backbones -> features ->
runs under ``data/``), so chapters can run in any order, alone (papermill), or all together.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from hada.errors import HadaError

# Libraries import tqdm.auto, which warns in a kernel without ipywidgets; our own bars are plain text.
warnings.filterwarnings("ignore", message="IProgress not found")

FEATURE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Setting:
    """The parameters cell of a chapter, resolved: which data, which backbones, what budget."""

    dataset: str
    data_root: Path
    backbones: tuple[str, ...]
    epochs: int
    pairs_per_epoch: int | None
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
                ("training budget", f"{self.epochs} epochs of {self.pairs_per_epoch or 'all'} pairs, "
                                    f"seed {self.seed}")]
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


def resolve(dataset: str = "synthetic", data_root=None, backbones="default", epochs: int = 10,
            pairs_per_epoch: int | None = 3000, seed: int = 0) -> Setting:
    """The chapter parameters as a ``Setting``, checking the data (one clear error if it is missing).

    Generates the embedded synthetic set when it is the dataset and missing; trains and extracts nothing.
    The defaults are every chapter's parameters cell (a test keeps them equal), so ``hada prepare`` with
    no options makes exactly what the chapters read.
    """
    from hada.data import synthetic as synth
    from hada.data.datasets import default_root, load_dataset

    root = Path(data_root).expanduser() if data_root else default_root(dataset)
    if dataset == "synthetic" and data_root is None:
        synth.generate(root)
    ds = load_dataset(dataset, root)
    names = _parse_backbones(backbones)
    pairs = None if pairs_per_epoch in (None, "", "None", 0) else int(pairs_per_epoch)
    return Setting(dataset, root, names, int(epochs), pairs, int(seed), counts=ds.counts())


def setup(dataset: str = "synthetic", data_root=None, backbones="default", epochs: int = 10,
          pairs_per_epoch: int | None = 3000, seed: int = 0) -> Setting:
    """Check the data first (one clear error if it is missing), then make whatever the chapter needs.

    For the embedded default this generates the synthetic set and pretrains the embedded backbones when
    they are missing; for real data it only reads. Token features for train/val/test are extracted once.
    It runs ``hada prepare``'s step graph without the training runs, one step at a time in this process.
    """
    from hada.pipeline import book_steps, run_steps

    setting = resolve(dataset, data_root, backbones, epochs, pairs_per_epoch, seed)
    run_steps(book_steps(setting, runs=False), jobs=1, progress=False, log=lambda msg: None)
    return setting


def split_counts(setting: Setting):
    """Images and captions per split, beside the Karpathy Flickr30k sizes the loader checks real data against."""
    from hada.data.datasets import EXPECTED_IMAGES
    from hada.book.tables import Table

    flickr = EXPECTED_IMAGES["flickr30k"]
    rows = [{"name": s, "images": c["images"], "captions": c["captions"], "flickr30k": flickr.get(s, "-")}
            for s, c in setting.counts.items()]
    return Table(rows, columns=(("name", "split"), ("images", f"{setting.dataset} images"),
                                ("captions", f"{setting.dataset} captions"),
                                ("flickr30k", "Flickr30k images (Karpathy)")))


def sample_figure(setting: Setting, split: str = "test", n: int = 8):
    """The first ``n`` images of a split with two of their captions each."""
    from hada.book import figures as plots
    from hada.data.datasets import load_dataset

    records = load_dataset(setting.dataset, setting.data_root, check_images=False).split(split)
    return plots.show_samples(records, n=n)


def method_figure(setting: Setting | None = None, image_counts=(7, 5), text_counts=(5, 4)):
    """The paper's method figure, drawn from ``hada.model.graph``: one image and one caption, two backbones."""
    from hada.book.figures import graph_pair_figure
    from hada.model.graph import EdgeWeights, to_networkx

    names = ("backbone A (e.g. ALBEF)", "backbone B (e.g. LightningDOT)")
    return graph_pair_figure(to_networkx(image_counts, EdgeWeights()), to_networkx(text_counts, EdgeWeights()),
                             "image graph: CLS + patch tokens", "caption graph: CLS + word tokens", names)


def edge_weight_table(setting: Setting | None = None):
    """The edge types with the paper's weights, straight from ``hada.model.graph.EdgeWeights``."""
    from hada.model.graph import EDGE_TYPE_LABELS, EDGE_TYPES, EdgeWeights
    from hada.book.tables import Table

    weights = EdgeWeights()
    values = dict(zip(EDGE_TYPES, (weights.w_fc, weights.w_fcx, weights.w_cc, weights.w_ffx, weights.w_self)))
    rows = [{"name": label, "weight": "no edges" if values[t] is None else values[t]}
            for t, label in zip(EDGE_TYPES, EDGE_TYPE_LABELS)]
    return Table(rows, columns=(("name", "edge type"), ("weight", "weight (paper default)")))


# ------------------------------------------------------------------------------------ training runs
#: The recipe every chapter trains (``hada.config.RECIPES``), with the chapter's data, budget and seed applied.
BOOK_RECIPE = "miniature"


def base_config(setting: Setting, k: int = 2, **overrides):
    """The book's default HADA configuration for the first ``k`` backbones (chapter parameters applied);
    ``overrides`` by a setting's own name (``gnn="gcn"``) or dotted path (``**{"model.layers": 2}``)."""
    from hada.config import recipe

    chapter = {"data": {"dataset": setting.dataset, "data_root": _root_arg(setting),
                        "backbones": list(setting.backbones_for(k))},
               "optim": {"epochs": setting.epochs, "pairs_per_epoch": setting.pairs_per_epoch},
               "seed": setting.seed}
    return recipe(BOOK_RECIPE, chapter, **overrides)


def _root_arg(setting: Setting):
    from hada.data.datasets import default_root

    return None if setting.data_root == default_root(setting.dataset) else str(setting.data_root)


def train_hada(setting: Setting, k: int = 2, **overrides):
    """Train (or load the cached) default HADA run for K backbones; returns a ``RunResult``."""
    from hada.experiments import run_experiment

    return run_experiment(base_config(setting, k, **overrides), f"hada-k{k}")


def result_runs(setting: Setting, k: int = 2) -> list[tuple[str, object]]:
    """``(run name, TrainConfig)`` of the two runs ``results`` trains: concat + linear, and HADA."""
    from hada.experiments import concat_run

    config = base_config(setting, k)
    concat_config, concat_name = concat_run(setting.dataset, list(setting.backbones_for(k)), _root_arg(setting),
                                            config)
    return [(concat_name, concat_config), (f"hada-k{k}", config)]


def results(setting: Setting, k: int = 2):
    """Every backbone alone, similarity averaging, concat + linear and HADA, on the test split."""
    from hada.experiments import baseline_table
    from hada.book.tables import ResultsTable, metric_row

    config = base_config(setting, k)
    rows = baseline_table(setting.dataset, list(setting.backbones_for(k)), "test", data_root=_root_arg(setting),
                          config=config)
    run = train_hada(setting, k)
    rows.append(metric_row(f"HADA (K={k})", run.test_metrics, kind="hada"))
    return ResultsTable(rows, caption=f"Test split of {setting.dataset}, K={k} backbones (Rsum max 600)")


def claim_table(table, setting: Setting):
    """The paper's +3.6% beside this build's gain of HADA over the best single backbone (``table`` from
    ``results``)."""
    from hada.book.tables import ClaimTable

    return ClaimTable.of(table, setting.dataset)


def backbone_table(setting: Setting):
    """Each backbone alone (its own embeddings' cosine) on the test split."""
    from hada.experiments import baseline_table
    from hada.book.tables import ResultsTable

    rows = baseline_table(setting.dataset, list(setting.backbones), "test", data_root=_root_arg(setting),
                          concat=False, config=base_config(setting, len(setting.backbones)))
    return ResultsTable([r for r in rows if r["kind"] == "backbone"],
                        caption=f"Each backbone alone, test split of {setting.dataset}")


# ------------------------------------------------------------------------------------------ ablations
#: One change each against the default K=2 model, same budget and seed (DESIGN section 3, chapter 6).
ABLATIONS: tuple[tuple[str, int, dict], ...] = (
    ("default (GATv2, paper weights)", 2, {}),
    ("GNN: GCN", 2, {"gnn": "gcn"}),
    ("GNN: TransformerConv", 2, {"gnn": "transformer"}),
    ("all edge weights = 1", 2, {"w_fc": 1.0, "w_fcx": 1.0, "w_cc": 1.0, "w_self": 1.0}),
    ("without ITM", 2, {"itm": False}),
    ("without mix weight (w = 0)", 2, {"mix": False}),
    ("without momentum encoders and queue", 2, {"use_momentum": False, "queue_size": 0}),
    ("two GNN layers", 2, {"layers": 2}),
    ("K = 3 backbones", 3, {}),
)


def ablation_runs(setting: Setting, variants=ABLATIONS) -> list[tuple[str, str, object]]:
    """``(label, run name, TrainConfig)`` of every variant this setting has the backbones for."""
    runs = []
    for label, k, overrides in variants:
        if k > len(setting.backbones):
            continue
        name = f"hada-k{k}" if not overrides else "ablation-" + "-".join(f"{a}{b}" for a, b in overrides.items())
        runs.append((label, name, base_config(setting, k, **overrides)))
    return runs


def ablations(setting: Setting, variants=ABLATIONS):
    """Train (or load) every variant with the same budget; test Rsum and its change from the default."""
    from hada.book.tables import AblationTable, metric_row
    from hada.experiments import run_experiment

    rows = []
    for label, name, config in ablation_runs(setting, variants):
        run = run_experiment(config, name)
        rows.append(metric_row(label, run.test_metrics, epochs=len(run.history)))
    for row in rows:
        row["delta"] = row["rsum"] - rows[0]["rsum"]
    return AblationTable(rows)


def book_runs(setting: Setting) -> list[tuple[str, object]]:
    """Every training run the chapters read (results for K=2 and K=3, the ablations), each once: what
    ``hada prepare`` trains ahead of a build."""
    runs = [run for k in (2, 3) if k <= len(setting.backbones) for run in result_runs(setting, k)]
    runs += [(name, config) for _, name, config in ablation_runs(setting)]
    unique: dict = {}
    for name, config in runs:
        unique.setdefault((name, json.dumps(config.resolved().to_dict(), sort_keys=True)), (name, config))
    return list(unique.values())


# --------------------------------------------------------------------------------------- node graphs
def graph_sample(setting: Setting, k: int = 2, split: str = "test", index: int = 0):
    """The graphs of image ``index`` of ``split`` and of its first caption, from the stored token counts."""
    import numpy as np

    from hada.book.figures import GraphSample
    from hada.data.datasets import load_dataset
    from hada.features.store import open_features
    from hada.model.graph import EdgeWeights, to_networkx

    names = setting.backbones_for(k)
    stores = [open_features(setting.dataset, b, split) for b in names]
    image_counts = tuple(int(s.image_tokens.shape[1]) for s in stores)
    caption_row = int(np.flatnonzero(np.asarray(stores[0].caption_image_index) == index)[0])
    text_counts = tuple(int(s.text_lengths[caption_row]) for s in stores)
    record = load_dataset(setting.dataset, setting.data_root, check_images=False).split(split)[index]
    weights = EdgeWeights()
    return GraphSample(names, image_counts, text_counts, record.captions[0],
                       to_networkx(image_counts, weights), to_networkx(text_counts, weights))


# ----------------------------------------------------------------------------------------- attention
def attention_examples(setting: Setting, k: int = 2, n_correct: int = 2, n_failures: int = 1):
    """Attention of the trained default model's CLS nodes for a few test images (hits and a failure)."""
    from hada.attention import attention_examples as examples
    from hada.data.datasets import load_dataset

    run = train_hada(setting, k)
    dataset = load_dataset(setting.dataset, setting.data_root, check_images=False)
    return examples(run.load_model(), dataset, split="test", n_correct=n_correct, n_failures=n_failures,
                    seed=setting.seed)
