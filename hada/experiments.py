"""The experiments as data: a chapter's resolved parameters (:class:`Setting`), the configuration of every run the
book trains (results for K = 2 and 3, the ablations), and the baseline rows of the results table. Both the chapters
and ``hada prepare`` read their runs from here, so they cannot disagree. A run's identity, folder and train-or-load
live in :mod:`hada.runs`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from hada.paths import runs_dir
from hada.runs import content_key, features_fingerprint, run_experiment, shared_data
from hada.config import DEFAULT_RECIPE, TrainConfig, backbone_list, recipe
from hada.errors import HadaError
from hada.io import write_bytes, write_json


# -------------------------------------------------------------------------------------- baselines
def baseline_table(dataset: str, backbones, split: str = "test", data_root=None, concat: bool = True,
                   config: TrainConfig | None = None, progress: bool | None = None) -> list[dict]:
    """Rows ``{name, kind, six recalls, rsum}`` for each backbone alone, their similarity average and
    (``concat``) the trained concatenation + linear baseline, all scored on ``split``.

    ``config`` sets the concatenation run's training (epochs, seed, loss); its data and arch fields
    are overridden. Untrained rows are cached as json next to the runs, keyed like runs. Rows name a backbone
    by its label (:func:`hada.labels.backbone_labels`: its model, never a weights file's path), in the specs' order.
    """
    from hada.baselines import untrained_baselines
    from hada.metrics import retrieval_metrics
    from hada.labels import backbone_labels
    from hada.metrics import metric_row, row_label

    plain_cfg, run_name = concat_run(dataset, backbones, data_root, config)  # embeddings only
    names = plain_cfg.data.backbones
    labels = backbone_labels(names)
    fp = features_fingerprint(plain_cfg)
    key = content_key({"dataset": dataset, "backbones": names, "split": split, "features": fp})  # store contents
    cache = runs_dir() / "baselines" / f"{dataset}-{split}-{key}.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
    else:
        data = shared_data(plain_cfg, split)
        rows = []
        for kind, label, m in untrained_baselines(data, labels):
            rows.append(metric_row(label, m, kind=kind))
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, rows)
    # labelled again on every read: a cache written before labels were models' names holds the specs
    backbone_rows = iter(range(len(labels)))
    rows = [{**r, "name": row_label(r["kind"], labels, next(backbone_rows) if r["kind"] == "backbone" else None)}
            for r in rows]
    if concat and len(names) > 1:
        run = run_experiment(plain_cfg, progress=progress)
        if split == plain_cfg.data.test_split:
            m = run.test_metrics
        else:
            m = retrieval_metrics(run.load_model(plain_cfg.device).similarity(shared_data(plain_cfg, split)),
                                  shared_data(plain_cfg, split).caption_image_index)
        rows = rows + [metric_row(row_label("concat", labels), m, kind="concat")]
    return rows


def concat_run(dataset: str, backbones, data_root=None, config: TrainConfig | None = None) -> tuple[TrainConfig, str]:
    """The configuration and run name of the concatenation + linear baseline ``baseline_table`` trains
    (``config``'s training settings on the given data and backbones, arch "concat"), resolved, on the exact device
    ``config`` names (``cuda:1``, where resolving alone keeps the type)."""
    from hada.devices import resolve_device

    base = config or recipe(DEFAULT_RECIPE)
    cfg = base.override({"data": {"dataset": dataset, "data_root": None if data_root is None else str(data_root),
                                  "backbones": backbones}, "model": {"arch": "concat"}}).resolved()
    cfg = replace(cfg, device=str(resolve_device(base.device)))
    return cfg, "concat-" + "+".join(_short(n) for n in cfg.data.backbones)


def _short(spec: str) -> str:
    """A backbone spec as a folder-name-safe token."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-40:]


# ------------------------------------------------------------------------------- a chapter's setting
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
    device: str = "auto"  # as the chapter gives it; each run's config resolves it to "cpu" or "cuda"
    counts: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def dataset_label(self) -> str:
        return "the embedded synthetic data" if self.dataset == "synthetic" else self.dataset

    def backbones_for(self, k: int) -> tuple[str, ...]:
        if k > len(self.backbones):
            raise HadaError(f"K={k} needs {k} backbones; this setting has {len(self.backbones)}: "
                            f"{', '.join(self.backbones)}")
        return self.backbones[:k]

    def __repr__(self) -> str:
        return (f"Setting(dataset={self.dataset!r}, root={str(self.data_root)!r}, "
                f"backbones={list(self.backbones)}, epochs={self.epochs}, seed={self.seed}, device={self.device!r})")


def _parse_backbones(backbones) -> tuple[str, ...]:
    from hada.backbones import EMBEDDED_BACKBONES

    if backbones in (None, "", "default"):
        return tuple(EMBEDDED_BACKBONES)
    backbones = backbone_list(backbones)
    if len(backbones) < 2:
        raise HadaError(f"HADA fuses at least two backbones; got {list(backbones)}")
    return tuple(backbones)


def _whole(name: str, value, least: int) -> int:
    """A chapter parameter that must be a whole number >= ``least`` (papermill's ``-p epochs abc`` passes a
    string): checked here, in the chapter's first cell, before any data loads, naming the parameter."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) or float(value).is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < least:
        raise HadaError(f"parameter {name} must be a whole number >= {least}, got {value!r} "
                        f"(papermill: -p {name} 10)")
    return number


def resolve(dataset: str = "synthetic", data_root=None, backbones="default", epochs: int = 10,
            pairs_per_epoch: int | None = 3000, seed: int = 0, device: str = "auto") -> Setting:
    """The chapter parameters as a ``Setting``, checking the data and the device (one clear error if either is
    missing).

    Generates the embedded synthetic set when it is the dataset and missing; trains and extracts nothing.
    The defaults are every chapter's parameters cell (a test keeps them equal), so ``hada prepare`` with
    no options makes exactly what the chapters read.
    """
    from hada.data import synthetic as synth
    from hada.data.datasets import default_root, load_dataset
    from hada.devices import resolve_device

    from hada.data.datasets import DATASETS

    epochs, seed = _whole("epochs", epochs, 1), _whole("seed", seed, 0)
    pairs_per_epoch = None if pairs_per_epoch in (None, "", "None", "none", 0) else \
        _whole("pairs_per_epoch", pairs_per_epoch, 1)
    if dataset not in DATASETS:
        raise HadaError(f"parameter dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    device = str(device or "auto")
    resolve_device(device)  # "cuda" on a machine without one: one line now, before any data is made
    root = Path(data_root).expanduser() if data_root else default_root(dataset)
    if dataset == "synthetic" and data_root is None:
        synth.generate(root)
    ds = load_dataset(dataset, root)
    names = _parse_backbones(backbones)
    pairs = None if pairs_per_epoch in (None, "", "None", 0) else int(pairs_per_epoch)
    return Setting(dataset, root, names, int(epochs), pairs, int(seed), device, counts=ds.counts())


#: The recipe every chapter trains (``hada.config.RECIPES``), with the chapter's data, budget and seed applied.
BOOK_RECIPE = "miniature"


def base_config(setting: Setting, k: int = 2, recipe_name: str = BOOK_RECIPE, backbones=None, **overrides):
    """The book's default HADA configuration for the first ``k`` backbones (or ``backbones``), chapter parameters
    (data, budget, seed, device) applied to the recipe ``recipe_name``; ``overrides`` by a setting's own name
    (``gnn="gcn"``) or dotted path (``**{"model.layers": 2}``)."""
    chapter = {"data": {"dataset": setting.dataset, "data_root": data_root_arg(setting),
                        "backbones": list(backbones or setting.backbones_for(k))},
               "optim": {"epochs": setting.epochs, "pairs_per_epoch": setting.pairs_per_epoch},
               "seed": setting.seed, "device": setting.device}
    return recipe(recipe_name, chapter, **overrides)


def data_root_arg(setting: Setting):
    from hada.data.datasets import default_root

    return None if setting.data_root == default_root(setting.dataset) else str(setting.data_root)


#: How many seeds the results chapter trains each fusion row with, per K: the chapter's seed and the next ones.
#: K=3 keeps one seed to save build time (the chapter says so).
RESULT_SEEDS: dict[int, int] = {2: 3, 3: 1}


def result_seeds(setting: Setting, k: int = 2) -> tuple[int, ...]:
    """The seeds of the results' fusion runs for K backbones: ``setting.seed``, ``setting.seed + 1``, ..."""
    return tuple(setting.seed + i for i in range(RESULT_SEEDS.get(k, 1)))


def _seeded(name: str, setting: Setting, seed: int) -> str:
    """The chapter seed's run keeps its plain name (the ablations' default is that run); others add the seed."""
    return name if seed == setting.seed else f"{name}-seed{seed}"


def result_runs(setting: Setting, k: int = 2) -> list[tuple[str, object]]:
    """``(run name, TrainConfig)`` of the runs ``results`` trains: concat + linear, and HADA, for each seed of
    :func:`result_seeds`."""
    runs = []
    for seed in result_seeds(setting, k):
        config = base_config(replace(setting, seed=seed), k)
        concat_config, concat_name = concat_run(setting.dataset, list(setting.backbones_for(k)),
                                                data_root_arg(setting), config)
        runs += [(_seeded(concat_name, setting, seed), concat_config), (_seeded(f"hada-k{k}", setting, seed), config)]
    return runs


#: HADA-LAVIS's departures from the published graph and loss (a backbone as ONE node, ITC 0.5 / 0.5), taken from
#: the ``lavis`` recipe; the results chapter trains them on top of the book's recipe, in HADA-LAVIS's two stages
#: (:func:`lavis_graph_runs`).
LAVIS_GRAPH_SETTINGS = ("model.single_node", "loss.i2t_weight", "loss.t2i_weight")
#: What sets HADA-LAVIS's stages apart, from the ``lavis-stage1`` recipe (stage 1: no mix, w = 0) and the ``lavis``
#: recipe (stage 2: the learned mix from w_init, warm-started from stage 1 with fresh tau, momentum encoders,
#: optimiser, schedule and queue).
LAVIS_STAGE_SETTINGS = {"lavis-stage1": ("loss.mix",), "lavis": ("loss.mix", "loss.w_init", "optim.warm_start")}


def lavis_graph_overrides(stage: str = "lavis") -> dict:
    """The value of each of :data:`LAVIS_GRAPH_SETTINGS` and of the stage's :data:`LAVIS_STAGE_SETTINGS` in the
    recipe ``stage`` (``lavis-stage1`` or ``lavis``)."""
    from hada.config import get_path

    values = recipe(stage).to_dict()
    return {path: get_path(values, path) for path in (*LAVIS_GRAPH_SETTINGS, *LAVIS_STAGE_SETTINGS[stage])}


@dataclass(frozen=True)
class TwoStages:
    """A run trained as two separate runs, as HADA-LAVIS is: ``first`` (name, TrainConfig) to early stopping, then
    ``second`` warm-started from the first's best weights. The second's ``optim.init_from`` is the first's run
    folder name, filled in once the first exists (its key needs the feature stores), so the second's own key
    follows every change of the first."""

    first: tuple[str, TrainConfig]
    second: tuple[str, TrainConfig]

    @property
    def name(self) -> str:
        return self.second[0]

    @property
    def seed(self) -> int:
        return self.second[1].seed

    def second_config(self, first_run) -> TrainConfig:
        """The second stage's configuration, warm-started from the finished first stage ``first_run``."""
        return self.second[1].override(**{"optim.init_from": first_run.run_dir.name})

    def run(self, progress: bool | None = None):
        """Train (or load) both stages; the second stage's RunResult."""
        name, config = self.first
        first = run_experiment(config, progress=progress)
        return run_experiment(self.second_config(first), progress=progress)


def lavis_stage_epochs(epochs: int) -> tuple[int, int]:
    """The book's budget of ``epochs`` split over HADA-LAVIS's two stages (at least one each): the first half
    without the mix, the rest with it, as one run switching at mid-budget spent it."""
    first = max(1, epochs // 2)
    return first, max(1, epochs - first)


def lavis_graph_runs(setting: Setting) -> list[TwoStages]:
    """The K=2 HADA-LAVIS-graph row, one :class:`TwoStages` per seed of :func:`result_seeds`: the book's recipe with
    the second backbone entering the graph as one node (:func:`lavis_graph_overrides`), trained in HADA-LAVIS's
    two stages within the book's budget (:func:`lavis_stage_epochs`): stage 1 without the mix, stage 2 warm-started
    from it with the learned mix."""
    epochs = lavis_stage_epochs(setting.epochs)
    runs = []
    for seed in result_seeds(setting, 2):
        configs = [base_config(replace(setting, seed=seed, epochs=e), 2, **lavis_graph_overrides(stage))
                   for e, stage in zip(epochs, ("lavis-stage1", "lavis"))]
        runs.append(TwoStages((_seeded("hada-k2-lavis-graph-stage1", setting, seed), configs[0]),
                              (_seeded("hada-k2-lavis-graph", setting, seed), configs[1])))
    return runs


#: Recipes the results chapter trains beside the book's own on the same data, budget and seed (one seed each).
OTHER_RECIPES: tuple[str, ...] = ("paper",)

#: Augmented views per training image extracted ahead for a recipe that uses them (the published recipe: 3).
AUGMENT_VIEWS = 3


def recipe_runs(setting: Setting, k: int = 2) -> list[tuple[str, str, object]]:
    """``(recipe, run name, TrainConfig)``: the book's recipe (its ``hada-k{k}`` run) and each of
    :data:`OTHER_RECIPES`, all with the chapter's data, budget and seed."""
    runs = [(BOOK_RECIPE, f"hada-k{k}", base_config(setting, k))]
    return runs + [(name, f"{name}-k{k}", base_config(setting, k, recipe_name=name)) for name in OTHER_RECIPES]


def hada_seed_rsums(setting: Setting, k: int = 2) -> list[float]:
    """Test Rsum of each run of :func:`hada_seed_runs` (trained or loaded): the seed noise other rows are read
    against."""
    return [run_experiment(config).test_metrics["rsum"] for _, config in hada_seed_runs(setting, k)]


def hada_seed_runs(setting: Setting, k: int = 2) -> list[tuple[str, object]]:
    """The HADA runs among :func:`result_runs`, one per seed (the first is the ablations' default)."""
    return [(name, config) for name, config in result_runs(setting, k) if config.model.arch == "hada"]


#: One change each against the default K=2 model, same budget and seed: the ablation chapter's rows.
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


# ------------------------------------------------------------------------------ when does fusion help?
def strength_pairs(setting: Setting) -> list[tuple[str, str]]:
    """The backbone pairs of "When does fusion help?": the setting's two main backbones with one of them (or
    both) replaced by a snapshot of its pretraining (``tiny-vit@1``, see ``hada/backbones/embedded.json``): the
    main one weaker, the second one much and somewhat weaker, and both weak. Empty unless both are embedded
    backbones (real backbones have no snapshots)."""
    from hada.backbones import EMBEDDED_BACKBONES

    a, b = setting.backbones_for(2)
    if a not in EMBEDDED_BACKBONES or b not in EMBEDDED_BACKBONES:
        return []
    return [(f"{a}@1", b), (a, f"{b}@1"), (a, f"{b}@2"), (f"{a}@1", f"{b}@1")]


def strength_runs(setting: Setting) -> list[tuple[str, object]]:
    """``(run name, TrainConfig)``: the book's HADA on each backbone of :func:`strength_pairs` alone (K=1: the
    graph of one backbone's tokens, the reference a second backbone has to beat) and on each pair (K=2)."""
    pairs = strength_pairs(setting)
    if not pairs:
        return []
    singles = dict.fromkeys(b for pair in [tuple(setting.backbones_for(2)), *pairs] for b in pair)
    runs = [(f"hada-k1-{_short(b)}", base_config(setting, 1, backbones=(b,))) for b in singles]
    return runs + [("hada-k2-" + "+".join(_short(n) for n in pair), base_config(setting, 2, backbones=pair))
                   for pair in pairs]


def book_runs(setting: Setting) -> list[tuple[str, object]]:
    """Every training run the chapters read (results for K=2 and K=3 with the other recipes, the first stage of the
    HADA-LAVIS graph and the strength pairs, the ablations), each once: what ``hada prepare`` trains ahead of a
    build, besides the second stages of :func:`book_second_stages` (each after its first)."""
    runs = [run for k in (2, 3) if k <= len(setting.backbones) for run in result_runs(setting, k)]
    runs += [(name, config) for _, name, config in recipe_runs(setting)[1:]]
    runs += [stages.first for stages in lavis_graph_runs(setting)] + strength_runs(setting)
    runs += [(name, config) for _, name, config in ablation_runs(setting)]
    unique: dict = {}
    for name, config in runs:
        unique.setdefault((name, json.dumps(config.resolved().to_dict(), sort_keys=True)), (name, config))
    return list(unique.values())



def book_second_stages(setting: Setting) -> list[TwoStages]:
    """The runs the chapters read that warm-start from another (the HADA-LAVIS graph's second stages): ``hada
    prepare`` trains each after its first stage, which :func:`book_runs` lists."""
    return lavis_graph_runs(setting)


# --------------------------------------------------------------------- every result row, with its seeds
@dataclass
class SystemResult:
    """One row of the results: its test metrics and per-query ranks, one entry per seed (one for an untrained
    row). The ranks are what :func:`hada.metrics.paired_bootstrap` resamples."""

    name: str
    kind: str  # backbone, fusion or hada
    metrics: list[dict]
    ranks: list[tuple]  # (image_to_text [n_img], text_to_image [n_cap]) per seed
    seeds: tuple[int, ...] = ()  # empty for an untrained row

    def mean(self) -> dict:
        """Every metric averaged over the seeds."""
        return {key: sum(m[key] for m in self.metrics) / len(self.metrics) for key in self.metrics[0]}

    def std(self, key: str = "rsum") -> float:
        """Sample standard deviation (n - 1) of a metric over the seeds; nan with one seed."""
        from hada.metrics import seed_std

        return seed_std([m[key] for m in self.metrics])


def _cached_ranks(path: Path, compute) -> tuple:
    """Test ranks kept as ``.npz`` under ``runs_dir()/ranks``; ``path``'s name carries the key of their inputs."""
    import numpy as np

    if not path.exists():
        i2t, t2i = compute()
        buffer = io.BytesIO()
        np.savez(buffer, i2t=i2t.numpy(), t2i=t2i.numpy())
        write_bytes(path, buffer.getbuffer())  # a unique temporary name: two chapters may compute the same ranks
    with np.load(path) as f:
        return f["i2t"], f["t2i"]


def run_test_ranks(run) -> tuple:
    """Per-query test ranks of a finished run (``hada.runs.RunResult``), computed once from its best model."""
    from hada.metrics import retrieval_ranks

    config = run.config.resolved()
    split = config.data.test_split

    def compute():
        data = shared_data(config, split)
        return retrieval_ranks(run.load_model(config.device).similarity(data), data.caption_image_index)

    return _cached_ranks(runs_dir() / "ranks" / f"{run.run_dir.name}-{split}.npz", compute)


def _untrained_systems(config, split: str) -> list[SystemResult]:
    """Each backbone alone and their similarity average on ``split`` (no training, no seed)."""
    from hada.baselines import averaging_similarity, backbone_similarity
    from hada.labels import backbone_labels
    from hada.metrics import metrics_from_ranks, retrieval_ranks, row_label

    names = config.data.backbones
    labels = backbone_labels(names)
    key = content_key({"dataset": config.data.dataset, "backbones": names, "split": split,
                       "features": features_fingerprint(config)})  # the stores' contents, not their folder
    sources = [(row_label("backbone", labels, k), "backbone", lambda data, k=k: backbone_similarity(data, k))
               for k in range(len(names))]
    sources.append((row_label("average", labels), "average", averaging_similarity))
    out = []
    for i, (name, kind, similarity) in enumerate(sources):
        def compute(similarity=similarity):
            data = shared_data(config, split)
            return retrieval_ranks(similarity(data), data.caption_image_index)

        ranks = _cached_ranks(runs_dir() / "ranks" / f"untrained-{key}-{i}-{split}.npz", compute)
        out.append(SystemResult(name, kind, [metrics_from_ranks(*map(_tensor, ranks))], [ranks]))
    return out


def _tensor(array):
    import torch

    return torch.from_numpy(array)


def result_systems(setting: Setting, k: int = 2, progress: bool | None = None) -> tuple[list[SystemResult], object]:
    """Every row of the results for K backbones on the test split (each backbone, their average, concat +
    linear, HADA; the trained rows once per seed of :func:`result_seeds`), and the split's caption -> image
    index. Trains (or loads) the runs of :func:`result_runs`."""
    import numpy as np

    runs = result_runs(setting, k)
    concat_config = runs[0][1].resolved()
    split = concat_config.data.test_split
    systems = _untrained_systems(concat_config, split)
    from hada.labels import backbone_labels
    from hada.metrics import row_label

    labels = backbone_labels(concat_config.data.backbones)
    for kind in ("concat", "hada"):  # each row's kind is its architecture
        systems.append(trained_system(row_label(kind, labels), kind,
                                      [(n, c) for n, c in runs if c.model.arch == kind], progress))
    if k == 2:
        one_node = labels[1]
        systems.append(trained_system(f"HADA-LAVIS graph (K=2, {one_node} as one node)", "variant",
                                      lavis_graph_runs(setting), progress))
    return systems, np.asarray(shared_data(concat_config, split).caption_image_index)


def trained_system(label: str, kind: str, runs: list, progress: bool | None = None) -> SystemResult:
    """A results row from ``(run name, TrainConfig)`` runs or :class:`TwoStages`, one per seed (each trained or
    loaded; of two stages, the second is the row's)."""
    row = SystemResult(label, kind, [], [])
    for item in runs:
        if isinstance(item, TwoStages):
            run, seed = item.run(progress), item.seed
        else:
            name, config = item
            run, seed = run_experiment(config, progress=progress), config.seed
        row.metrics.append(run.test_metrics)
        row.ranks.append(run_test_ranks(run))
        row.seeds += (seed,)
    return row


@dataclass
class RecipeResult:
    """One recipe trained on the chapter's data and budget: its test metrics, epochs run, training speed and size."""

    recipe: str
    run_name: str
    metrics: dict
    epochs: int
    pairs_per_second: float  # training pairs per second of training time (evaluation excluded), on this machine
    parameters: int  # trained parameters of the encoders and heads (momentum copies and queue excluded)


def recipe_results(setting: Setting, k: int = 2, progress: bool | None = None) -> list[RecipeResult]:
    """The runs of :func:`recipe_runs`, trained (or loaded)."""
    out = []
    for name, run_name, config in recipe_runs(setting, k):
        run = run_experiment(config, progress=progress)
        seconds = sum(e["train_time_s"] for e in run.history)
        pairs = sum(e.get("pairs", 0) for e in run.history)
        model = run.load_model("cpu")
        out.append(RecipeResult(name, run.run_dir.name, run.test_metrics, len(run.history),
                                pairs / seconds if seconds else float("nan"), trained_parameters(model)))
    return out


def trained_parameters(model) -> int:
    """Parameters a run trains: the objective's, less the momentum encoders' frozen copies."""
    from hada.model.encoder import count_parameters

    return count_parameters(getattr(model, "objective", model))


@dataclass
class StrengthPoint:
    """One pair of "When does fusion help?": HADA on each backbone alone and on the pair, each backbone's own
    zero-shot Rsum, and how differently the two single-backbone models fail."""

    pair: tuple[str, str]
    singles: tuple[float, float]  # test Rsum of HADA trained on each backbone alone (K=1)
    zero_shot: tuple[float, float]  # test Rsum of each backbone's own embeddings, untrained
    hada: float  # test Rsum of HADA (K=2) on the pair
    disagreement: float  # % of test captions whose image exactly one of the two K=1 models ranks in its top 5

    @property
    def best(self) -> float:
        return max(self.singles)

    @property
    def ratio(self) -> float:
        """The weaker single-backbone model's Rsum over the stronger's (1: equally strong)."""
        return min(self.singles) / max(self.singles)

    @property
    def gain(self) -> float:
        """What fusing adds: HADA on the pair minus HADA on the better backbone alone."""
        return self.hada - self.best


def strength_points(setting: Setting, progress: bool | None = None) -> list[StrengthPoint]:
    """The setting's own two backbones and the pairs of :func:`strength_pairs`, each backbone trained alone and
    the pair fused (:func:`strength_runs`); empty without pretraining snapshots."""
    runs = dict(strength_runs(setting))
    if not runs:
        return []
    runs["hada-k2"] = base_config(setting, 2)  # the results' own run on the setting's two backbones
    names = {tuple(c.data.backbones): name for name, c in runs.items()}
    done = {}

    def result(backbones):
        name = names[tuple(backbones)]
        if name not in done:
            done[name] = run_experiment(runs[name], progress=progress)
        return done[name]

    points = []
    for pair in [tuple(setting.backbones_for(2)), *strength_pairs(setting)]:
        singles = [result((b,)) for b in pair]
        config = runs[names[pair]].resolved()
        alone = _untrained_systems(config, config.data.test_split)[:2]
        hits = [run_test_ranks(run)[1] < 5 for run in singles]
        points.append(StrengthPoint(pair, tuple(run.test_metrics["rsum"] for run in singles),
                                    tuple(s.metrics[0]["rsum"] for s in alone), result(pair).test_metrics["rsum"],
                                    100.0 * float((hits[0] != hits[1]).mean())))
    return points
