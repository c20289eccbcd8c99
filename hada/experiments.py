"""The experiments as data: a chapter's resolved parameters (:class:`Setting`), every run the book trains resolved
once per setting (:func:`plan`: results for K = 2 and 3 with their seeds, the HADA-LAVIS graph, the recipes, the
strength pairs, the ablations), and the rows of the results. The chapters and ``hada prepare`` read their runs from
the one plan, so they cannot disagree; below it, :mod:`hada.runs` receives resolved configurations and names,
keys, trains or loads each run.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from hada.paths import runs_dir
from hada.runs import content_key, features_fingerprint, run_experiment, shared_data
from hada.config import DEFAULT_RECIPE, TrainConfig, backbone_list, recipe
from hada.data.datasets import EXPECTED_IMAGES
from hada.errors import HadaError
from hada.io import write_json


# -------------------------------------------------------------------------------------- baselines
def baseline_table(dataset: str, backbones, split: str = "test", data_root=None, concat: bool = True,
                   config: TrainConfig | None = None, progress: bool | None = None) -> list[dict]:
    """Rows ``{name, kind, six recalls, rsum}`` for each backbone alone, their similarity average and
    (``concat``) the trained concatenation + linear baseline, all scored on ``split``.

    ``config`` sets the concatenation run's training (epochs, seed, loss); its data and arch fields
    are overridden. Untrained rows are cached as json next to the runs, keyed like runs. Rows name a backbone
    by its label (:func:`hada.labels.backbone_labels`: its model, never a weights file's path), in the specs' order.
    """
    plain_cfg, _ = concat_run(dataset, backbones, data_root, config)  # embeddings only
    return baseline_rows(plain_cfg, split, concat, progress)


def baseline_rows(plain_cfg: TrainConfig, split: str = "test", concat: bool = True,
                  progress: bool | None = None) -> list[dict]:
    """:func:`baseline_table`'s rows for a resolved concat + linear configuration ``plain_cfg`` (a chapter's from
    its :func:`plan`): its backbones alone, their average and (``concat``) the trained run, on ``split``."""
    from hada.baselines import untrained_baselines
    from hada.metrics import retrieval_metrics
    from hada.labels import backbone_labels
    from hada.metrics import metric_row, row_label

    names = plain_cfg.data.backbones
    labels = backbone_labels(names)
    fp = features_fingerprint(plain_cfg)
    dataset = plain_cfg.data.dataset
    key = content_key({"dataset": dataset, "backbones": names, "split": split, "features": fp,  # store contents
                       **_scored_captions(plain_cfg, split)})
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
    """The book's HADA configuration for the first ``k`` backbones (or ``backbones``), unresolved: chapter parameters
    (data, budget, seed, device) applied to the recipe ``recipe_name``; ``overrides`` by a setting's own name
    (``gnn="gcn"``) or dotted path (``**{"model.layers": 2}``). Only :func:`plan` (and :func:`hada_run` beyond
    the plan) call it: a consumer reads the plan's resolved runs."""
    chapter = {"data": {"dataset": setting.dataset, "data_root": data_root_arg(setting),
                        "backbones": list(backbones or setting.backbones_for(k))},
               "optim": {"epochs": setting.epochs, "pairs_per_epoch": setting.pairs_per_epoch},
               "seed": setting.seed, "device": setting.device}
    return recipe(recipe_name, chapter, **overrides)


def data_root_arg(setting: Setting):
    from hada.data.datasets import default_root

    return None if setting.data_root == default_root(setting.dataset) else str(setting.data_root)


#: How many seeds the results chapter trains each fusion row with, per K: the chapter's seed and the next ones.
#: K=3 keeps one seed to save build time (the chapter says so). Its keys are the K the results are trained for.
RESULT_SEEDS: dict[int, int] = {2: 3, 3: 1}


def result_seeds(setting: Setting, k: int = 2) -> tuple[int, ...]:
    """The seeds of the results' fusion runs for K backbones: ``setting.seed``, ``setting.seed + 1``, ..."""
    return tuple(setting.seed + i for i in range(RESULT_SEEDS.get(k, 1)))


def _seeded(name: str, setting: Setting, seed: int) -> str:
    """The chapter seed's run keeps its plain name (the ablations' default is that run); others add the seed."""
    return name if seed == setting.seed else f"{name}-seed{seed}"


#: HADA-LAVIS's departures from the published graph and loss (a backbone as ONE node, ITC 0.5 / 0.5), taken from
#: the ``lavis`` recipe; the results chapter trains them on top of the book's recipe, in HADA-LAVIS's two stages
#: (:attr:`BookPlan.lavis_graph`).
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


class Run(NamedTuple):
    """One training run a chapter reads: its name in the book and its configuration, resolved by :func:`plan` on the
    setting's exact device (``cuda:1`` stays ``cuda:1``, where :meth:`TrainConfig.resolved` alone keeps the type).
    It unpacks as ``name, config``."""

    name: str
    config: TrainConfig


@dataclass(frozen=True)
class TwoStages:
    """A run trained as two separate runs, as HADA-LAVIS is: ``first`` to early stopping, then ``second``
    warm-started from the first's best weights. The second's ``optim.init_from`` is the first's run folder name,
    filled in once the first exists (its key needs the feature stores), so the second's own key follows every
    change of the first."""

    first: Run
    second: Run

    def __post_init__(self) -> None:  # a plain (name, config) pair is a Run
        for stage in ("first", "second"):
            object.__setattr__(self, stage, Run(*getattr(self, stage)))

    @property
    def name(self) -> str:
        return self.second.name

    @property
    def seed(self) -> int:
        return self.second.config.seed

    def second_config(self, first_run) -> TrainConfig:
        """The second stage's configuration, warm-started from the finished first stage ``first_run``."""
        return self.second.config.override(**{"optim.init_from": first_run.run_dir.name})

    def run(self, progress: bool | None = None):
        """Train (or load) both stages; the second stage's RunResult."""
        first = run_experiment(self.first.config, progress=progress)
        return run_experiment(self.second_config(first), progress=progress)


def lavis_stage_epochs(epochs: int) -> tuple[int, int]:
    """The book's budget of ``epochs`` split over HADA-LAVIS's two stages (at least one each): the first half
    without the mix, the rest with it, as one run switching at mid-budget spent it."""
    first = max(1, epochs // 2)
    return first, max(1, epochs - first)


#: Recipes the results chapter trains beside the book's own on the same data, budget and seed (one seed each).
OTHER_RECIPES: tuple[str, ...] = ("paper",)

#: Augmented views per training image extracted ahead for a recipe that uses them (the published recipe: 3).
AUGMENT_VIEWS = 3


class RecipeRun(NamedTuple):
    """A recipe trained on the chapter's data, budget and seed; unpacks as ``recipe, name, config``."""

    recipe: str
    name: str
    config: TrainConfig


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


class Ablation(NamedTuple):
    """One row of the ablations; unpacks as ``label, name, config``."""

    label: str
    name: str
    config: TrainConfig


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


# ------------------------------------------------------------------------ the book's runs, resolved once
@dataclass(frozen=True)
class BookPlan:
    """Every run the chapters read for one :class:`Setting`, each configuration resolved once by :func:`plan` and
    grouped by what reads it. Consumers (the results, recipes, strength and ablation rows, ``hada prepare``'s steps)
    take their configurations from here and never build their own, so they cannot disagree."""

    setting: Setting
    concat: dict[int, tuple[Run, ...]]  # the concat + linear row per K, one run per seed of result_seeds
    hada: dict[int, tuple[Run, ...]]  # HADA per K, one run per seed; the first (the chapter's seed) is the default
    lavis_graph: tuple[TwoStages, ...]  # the K=2 HADA-LAVIS-graph row, per seed
    recipes: dict[int, tuple[RecipeRun, ...]]  # K=2: the book's recipe (its HADA run), then each OTHER_RECIPES
    strength: tuple[Run, ...]  # "When does fusion help?": each backbone alone (K=1), then each pair (K=2)
    ablations: tuple[Ablation, ...]  # each of ABLATIONS the setting has the backbones for
    baselines: Run  # concat + linear on all the setting's backbones: the data each backbone alone is scored on
    published_queues: dict = field(default_factory=dict)  # each recipe's own queue size, before queue_at_scale

    def for_k(self, runs: dict, k: int):
        """``runs[k]``, or one line saying which K the book trains."""
        if k not in runs:
            self.setting.backbones_for(k)  # too few backbones: the setting's own line
            raise HadaError(f"the book's runs are for K = {', '.join(map(str, runs))}, not K={k}")
        return runs[k]

    def results(self, k: int = 2) -> list[Run]:
        """The results' trained runs for K backbones: concat + linear, then HADA, for each seed."""
        return [run for pair in zip(self.for_k(self.concat, k), self.for_k(self.hada, k)) for run in pair]

    def training(self) -> list[Run]:
        """Every run ``hada prepare`` trains ahead of a build, each once (the ablations' default is the results'
        HADA run), besides the second stages of :attr:`lavis_graph` (each after its first)."""
        runs = [run for k in self.hada for run in self.results(k)]
        runs += [Run(name, config) for k in self.recipes for _, name, config in self.recipes[k][1:]]
        runs += [stages.first for stages in self.lavis_graph] + list(self.strength)
        runs += [Run(name, config) for _, name, config in self.ablations]
        unique: dict = {}
        for run in runs:
            unique.setdefault((run.name, json.dumps(run.config.to_dict(), sort_keys=True)), run)
        return list(unique.values())


def plan(setting: Setting) -> BookPlan:
    """Every run the chapters read for ``setting``, resolved once per setting on this machine (memoised by the
    setting and what resolving reads from the machine: the exact device, bfloat16 units, the default data folder)."""
    from hada.config import has_bf16

    device = _device(setting)
    return _plan(setting, device, has_bf16(device.split(":")[0]), data_root_arg(setting))


def _device(setting: Setting) -> str:
    """The setting's exact device (``auto`` made ``cpu`` or ``cuda:N``), as every run of the plan keeps it."""
    from hada.devices import resolve_device

    return str(resolve_device(setting.device))


@functools.lru_cache(maxsize=32)
def _plan(setting: Setting, device: str, bf16: bool, root) -> BookPlan:
    """:func:`plan` for a setting on the exact ``device`` (``bf16`` and ``root`` only key the memo)."""
    ks = [k for k in RESULT_SEEDS if k <= len(setting.backbones)]
    results = {k: [_result_pair(setting, k, seed, device) for seed in result_seeds(setting, k)] for k in ks}
    concat = {k: tuple(c for c, _ in pairs) for k, pairs in results.items()}
    hada = {k: tuple(h for _, h in pairs) for k, pairs in results.items()}
    recipes, published_queues = _recipes(setting, 2, hada[2][0], device)  # the chapter compares them at K=2
    everything, name = concat_run(setting.dataset, list(setting.backbones), data_root_arg(setting),
                                  base_config(setting, len(setting.backbones)))
    return BookPlan(setting, concat, hada, _lavis_graph(setting, device), {2: recipes}, _strength(setting, device),
                    _ablations(setting, device, hada), Run(name, everything), published_queues)


def _resolved(config: TrainConfig, device: str) -> TrainConfig:
    """``config`` resolved (:meth:`TrainConfig.resolved`), on the exact ``device``."""
    return replace(config.resolved(), device=device)


def _result_pair(setting: Setting, k: int, seed: int, device: str) -> tuple[Run, Run]:
    """The results' concat + linear and HADA runs for K backbones and one seed."""
    config = base_config(replace(setting, seed=seed), k)
    concat, name = concat_run(setting.dataset, list(setting.backbones_for(k)), data_root_arg(setting), config)
    return (Run(_seeded(name, setting, seed), concat),
            Run(_seeded(f"hada-k{k}", setting, seed), _resolved(config, device)))


#: Flickr30k's training captions (Karpathy's split): the data the published queue was sized for.
FLICKR30K_TRAIN_CAPTIONS = 5 * EXPECTED_IMAGES["flickr30k"]["train"]


def queue_at_scale(queue_size: int, train_captions: int) -> int:
    """A recipe's queue at the share of ``train_captions`` that it has of Flickr30k's 145,000, never larger: the
    published 64,000 on Flickr30k or COCO, 6,621 on the embedded 15,000. A queue larger than the data holds the same
    keys many times over (or, started random, random vectors for a whole short run), and scoring each step against it
    dominates a step on a CPU."""
    if queue_size <= 0:
        return queue_size
    return min(queue_size, max(1, round(queue_size * train_captions / FLICKR30K_TRAIN_CAPTIONS)))


def _train_captions(setting: Setting) -> int:
    """The setting's training captions (0 where its counts are unknown)."""
    return (setting.counts or {}).get("train", {}).get("captions", 0)


def recipe_at_scale(setting: Setting, config: TrainConfig) -> TrainConfig:
    """A recipe's configuration on the setting's data: its queue at :func:`queue_at_scale` of the train split."""
    captions = _train_captions(setting)
    if not captions:
        return config
    return config.override(**{"loss.queue_size": queue_at_scale(config.loss.queue_size, captions)})


def _recipes(setting: Setting, k: int, book_run: Run, device: str) -> tuple[tuple[RecipeRun, ...], dict[str, int]]:
    """The book's recipe (its HADA run ``book_run``, trained once) and each of :data:`OTHER_RECIPES`, K backbones,
    each on the setting's budget and with its queue at the data's scale (:func:`recipe_at_scale`); and each
    recipe's own queue size, before that scaling."""
    runs, published = [RecipeRun(BOOK_RECIPE, *book_run)], {BOOK_RECIPE: book_run.config.loss.queue_size}
    for name in OTHER_RECIPES:
        config = base_config(setting, k, recipe_name=name)
        published[name] = config.loss.queue_size
        runs.append(RecipeRun(name, f"{name}-k{k}", _resolved(recipe_at_scale(setting, config), device)))
    return tuple(runs), published


def _lavis_graph(setting: Setting, device: str) -> tuple[TwoStages, ...]:
    """The K=2 HADA-LAVIS-graph row, one :class:`TwoStages` per seed of :func:`result_seeds`: the book's recipe with
    the second backbone entering the graph as one node (:func:`lavis_graph_overrides`), trained in HADA-LAVIS's
    two stages within the book's budget (:func:`lavis_stage_epochs`): stage 1 without the mix, stage 2 warm-started
    from it with the learned mix."""
    epochs = lavis_stage_epochs(setting.epochs)
    runs = []
    for seed in result_seeds(setting, 2):
        first, second = [_resolved(base_config(replace(setting, seed=seed, epochs=e), 2,
                                               **lavis_graph_overrides(stage)), device)
                         for e, stage in zip(epochs, ("lavis-stage1", "lavis"))]
        runs.append(TwoStages(Run(_seeded("hada-k2-lavis-graph-stage1", setting, seed), first),
                              Run(_seeded("hada-k2-lavis-graph", setting, seed), second)))
    return tuple(runs)


def _strength(setting: Setting, device: str) -> tuple[Run, ...]:
    """The book's HADA on each backbone of :func:`strength_pairs` alone (K=1: the graph of one backbone's tokens,
    the reference a second backbone has to beat) and on each pair (K=2)."""
    pairs = strength_pairs(setting)
    if not pairs:
        return ()
    singles = dict.fromkeys(b for pair in [tuple(setting.backbones_for(2)), *pairs] for b in pair)
    runs = [Run(f"hada-k1-{_short(b)}", _resolved(base_config(setting, 1, backbones=(b,)), device)) for b in singles]
    return tuple(runs + [Run("hada-k2-" + "+".join(_short(n) for n in pair),
                             _resolved(base_config(setting, 2, backbones=pair), device)) for pair in pairs])


def _ablations(setting: Setting, device: str, hada: dict[int, tuple[Run, ...]]) -> tuple[Ablation, ...]:
    """Each of :data:`ABLATIONS` this setting has the backbones for; a row without overrides is the results' HADA
    run at the chapter's seed (``hada``), trained once."""
    runs = []
    for label, k, overrides in ABLATIONS:
        if k > len(setting.backbones):
            continue
        if not overrides and k in hada:
            runs.append(Ablation(label, *hada[k][0]))
            continue
        name = f"hada-k{k}" if not overrides else "ablation-" + "-".join(f"{a}{b}" for a, b in overrides.items())
        runs.append(Ablation(label, name, _resolved(base_config(setting, k, **overrides), device)))
    return tuple(runs)


def hada_run(setting: Setting, k: int = 2, **overrides) -> Run:
    """The book's HADA run for K backbones at the chapter's seed (the plan's); with ``overrides``, or a K the book
    does not train, one run beyond the plan, resolved the plan's way (a test's smaller model, a reader's try)."""
    book = plan(setting)
    if not overrides and k in book.hada:
        return book.hada[k][0]
    return Run(f"hada-k{k}", _resolved(base_config(setting, k, **overrides), _device(setting)))


# ------------------------------------------------------------------------------- what each chapter reads
def hada_seed_rsums(setting: Setting, k: int = 2) -> list[float]:
    """Test Rsum of the plan's HADA run for K backbones at each seed (trained or loaded): the seed noise other rows
    are read against."""
    book = plan(setting)
    return [run_experiment(config).test_metrics["rsum"] for _, config in book.for_k(book.hada, k)]


def ablation_runs(setting: Setting, variants=ABLATIONS) -> list[Ablation]:
    """The plan's ablations among ``variants`` (rows of :data:`ABLATIONS`), in their order."""
    unknown = [label for label, *rest in variants if (label, *rest) not in ABLATIONS]
    if unknown:
        raise HadaError(f"not among the book's ablations (hada.experiments.ABLATIONS): {', '.join(unknown)}")
    book = {a.label: a for a in plan(setting).ablations}
    return [book[label] for label, _, _ in variants if label in book]


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
    from hada.metrics import load_ranks, save_ranks

    if not path.exists():
        save_ranks(path, compute())
    return load_ranks(path)


def run_test_ranks(run, device: str | None = None) -> tuple:
    """Per-query test ranks of a finished run (``hada.runs.RunResult``, its config as training wrote it: resolved):
    the ones training scored its test metrics with, else computed once from its best model on ``device`` (the plan's
    exact device; by default the config's)."""
    from hada.metrics import load_ranks, retrieval_ranks
    from hada.train import TEST_RANKS_FILE

    config = run.config if device is None else replace(run.config, device=device)
    split = config.data.test_split
    saved = run.run_dir / TEST_RANKS_FILE
    if saved.exists() and config.device.split(":")[0] == run.config.device.split(":")[0]:  # training's device type
        return load_ranks(saved)

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
                       "features": features_fingerprint(config),  # the stores' contents, not their folder
                       **_scored_captions(config, split)})
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


def _scored_captions(config, split: str) -> dict:
    """What an untrained row's cache key adds for a run keeping the first N captions of each test image (nothing
    when every caption is scored, so the keys of those rows stay what they were)."""
    from hada.train import split_options

    n = split_options(config, split)["captions_per_image"]
    return {} if n is None else {"captions_per_image": n}


def _tensor(array):
    import torch

    return torch.from_numpy(array)


def result_systems(setting: Setting, k: int = 2, progress: bool | None = None) -> tuple[list[SystemResult], object]:
    """Every row of the results for K backbones on the test split (each backbone, their average, concat +
    linear, HADA; the trained rows once per seed of :func:`result_seeds`), and the split's caption -> image
    index. Trains (or loads) the runs of the setting's :func:`plan`."""
    import numpy as np

    from hada.labels import backbone_labels
    from hada.metrics import row_label

    book = plan(setting)
    rows = {"concat": book.for_k(book.concat, k), "hada": book.for_k(book.hada, k)}  # each row's kind: its arch
    concat_config = rows["concat"][0].config
    split = concat_config.data.test_split
    systems = _untrained_systems(concat_config, split)
    labels = backbone_labels(concat_config.data.backbones)
    for kind, runs in rows.items():
        systems.append(trained_system(row_label(kind, labels), kind, runs, progress))
    if k == 2:
        one_node = labels[1]
        systems.append(trained_system(f"HADA-LAVIS graph (K=2, {one_node} as one node)", "variant",
                                      book.lavis_graph, progress))
    return systems, np.asarray(shared_data(concat_config, split).caption_image_index)


def trained_system(label: str, kind: str, runs: list, progress: bool | None = None) -> SystemResult:
    """A results row from a plan's :class:`Run` or :class:`TwoStages` runs, one per seed (each trained or
    loaded; of two stages, the second is the row's)."""
    row = SystemResult(label, kind, [], [])
    for item in runs:
        if isinstance(item, TwoStages):
            run, seed, device = item.run(progress), item.seed, item.second.config.device
        else:
            run, seed, device = run_experiment(item.config, progress=progress), item.config.seed, item.config.device
        row.metrics.append(run.test_metrics)
        row.ranks.append(run_test_ranks(run, device))
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
    queue: int  # slots of the run's queue of negatives (0: in-batch only), at the data's scale (queue_at_scale)
    published_queue: int  # the recipe's own queue, which queue_at_scale scales to the data
    train_captions: int  # the setting's training captions, which size ``queue``

    @property
    def flickr_train_captions(self) -> int:
        """Flickr30k's training captions, which the published queue was sized for."""
        return FLICKR30K_TRAIN_CAPTIONS


def recipe_results(setting: Setting, k: int = 2, progress: bool | None = None) -> list[RecipeResult]:
    """The plan's recipe rows for K backbones (the book's recipe, then each of :data:`OTHER_RECIPES`), trained (or
    loaded)."""
    book = plan(setting)
    out = []
    for name, run_name, config in book.for_k(book.recipes, k):
        run = run_experiment(config, progress=progress)
        seconds = sum(e["train_time_s"] for e in run.history)
        pairs = sum(e.get("pairs", 0) for e in run.history)
        model = run.load_model("cpu")
        out.append(RecipeResult(name, run.run_dir.name, run.test_metrics, len(run.history),
                                pairs / seconds if seconds else float("nan"), trained_parameters(model),
                                config.loss.queue_size, book.published_queues[name], _train_captions(setting)))
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
    the pair fused (:attr:`BookPlan.strength`); empty without pretraining snapshots."""
    book = plan(setting)
    runs = dict(book.strength)
    if not runs:
        return []
    runs["hada-k2"] = book.for_k(book.hada, 2)[0].config  # the results' own run on the setting's two backbones
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
        config = runs[names[pair]]
        alone = _untrained_systems(config, config.data.test_split)[:2]
        hits = [run_test_ranks(run, config.device)[1] < 5 for run in singles]
        points.append(StrengthPoint(pair, tuple(run.test_metrics["rsum"] for run in singles),
                                    tuple(s.metrics[0]["rsum"] for s in alone), result(pair).test_metrics["rsum"],
                                    100.0 * float((hits[0] != hits[1]).mean())))
    return points
