"""What the book's chapters call: one function per paragraph of the paper, each computing its numbers and
handing them to a table (``hada.book.tables``) or a figure (``hada.book.figures``). Every heavy step goes through the cached ``hada`` pipeline (data -> backbones -> features ->
runs under ``data/``), so chapters can run in any order, alone (papermill), or all together.
"""

from __future__ import annotations

import warnings

from hada.experiments import ABLATIONS, Setting, ablation_runs, hada_run, plan, resolve

# Libraries import tqdm.auto, which warns in a kernel without ipywidgets; our own bars are plain text.
warnings.filterwarnings("ignore", message="IProgress not found")


def _figures_as_svg() -> None:
    """In a notebook kernel (a chapter), figures are shown as SVG: sharp at any zoom, their text at its own size
    (``hada.book.figures.displayed_text_px``). Nothing happens outside IPython, so the CLI never loads matplotlib."""
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    if get_ipython() is None:
        return
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("svg")


_figures_as_svg()


def setup(dataset: str = "synthetic", data_root=None, backbones="default", epochs: int = 10,
          pairs_per_epoch: int | None = 3000, seed: int = 0, device: str = "auto") -> Setting:
    """Check the data first (one clear error if it is missing), then make whatever the chapter needs.

    For the embedded default this generates the synthetic set and pretrains the embedded backbones when
    they are missing; for real data it only reads. Token features for train/val/test are extracted once.
    It runs ``hada prepare``'s step graph without the training runs, one step at a time in this process.
    ``device`` (auto: CUDA when present) is where the backbones pretrain and extract and the runs train.
    """
    from hada.pipeline import book_steps, run_steps

    setting = resolve(dataset, data_root, backbones, epochs, pairs_per_epoch, seed, device)
    run_steps(book_steps(setting, runs=False), jobs=1, progress=False, log=lambda msg: None)
    return setting


def setting_table(setting: Setting):
    """The chapter's parameters as resolved: data, backbones, budget and split sizes."""
    from hada.book.tables import setting_table as table

    return table(setting)


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


def train_hada(setting: Setting, k: int = 2, **overrides):
    """Train (or load the cached) default HADA run for K backbones (``overrides``: one beyond the book's plan);
    returns a ``RunResult``."""
    from hada.runs import run_experiment

    return run_experiment(hada_run(setting, k, **overrides).config)


def run_summary(run):
    """A finished run (``hada.runs.RunResult``) in one table: its folder, epochs, best epoch, validation and test
    Rsum, final temperature and mix weight, and time per epoch."""
    from hada.book.tables import Table

    summary = run.summary()
    labels = {"run": "run folder (under data/runs)", "epochs": "epochs run", "best_epoch": "best epoch (the one kept)",
              "val_rsum": "best validation Rsum", "test_rsum": "test Rsum", "tau": "final temperature τ",
              "mix_weight": "final mix weight w", "seconds_per_epoch": "seconds per epoch on this machine"}
    rows = [{"name": labels.get(key, key), "value": value if isinstance(value, str) else f"{value:,}"}
            for key, value in summary.items()]
    return Table(rows, columns=(("name", "run"), ("value", "value")))


def results(setting: Setting, k: int = 2):
    """Every backbone alone, similarity averaging, concat + linear and HADA, on the test split; the trained rows
    as the mean (and std) over the seeds of ``hada.experiments.result_seeds``."""
    from hada.experiments import result_seeds, result_systems
    from hada.book.tables import ResultsTable, system_row

    systems, caption_image_index = result_systems(setting, k)
    seeds = result_seeds(setting, k)
    trained = f"trained rows: mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else \
        f"trained rows: seed {seeds[0]} only"
    return ResultsTable([system_row(s) for s in systems], systems=systems, caption_image_index=caption_image_index,
                        caption=f"Test split of {setting.dataset}, K={k} backbones (Rsum max 600; {trained})")


def three_backbones_sentence(table, setting: Setting) -> str:
    """The results page's sentence on HADA with three backbones (``table`` from ``results(setting, k=3)``), or, for a
    setting with fewer backbones (``table`` None), that those rows need a third."""
    if table is None:
        return (f"This setting names {len(setting.backbones)} backbones, so the rows with three are left out: they "
                "need a third backbone in `backbones`.")
    return (f"With three backbones (one seed): {table.hada['rsum']:.1f}, {table.gain_over_best_backbone:+.1f}% over "
            f"{table.best_backbone['name']}, {table.gain_over('average'):+.1f}% over averaging and "
            f"{table.gain_over('concat'):+.1f}% over concatenation.")


def gains(table, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """HADA's Rsum gain over the best backbone, similarity averaging and concat + linear (``table`` from
    ``results``), each with a paired bootstrap interval over test images (``hada.metrics.paired_bootstrap``)."""
    from hada.book.tables import GainTable, gain_row
    from hada.metrics import paired_bootstrap

    by_name = {s.name: s for s in table.systems}
    hada = by_name[table.hada["name"]]
    references = [("best", f"the best backbone ({table.best_backbone['name']})", table.best_backbone["name"]),
                  ("average", "similarity averaging", table.of_kind("average")[0]["name"]),
                  ("concat", "concatenation + linear", table.of_kind("concat")[0]["name"])]
    rows = []
    for key, label, name in references:
        boot = paired_bootstrap(hada.ranks, by_name[name].ranks, table.caption_image_index, n_boot=n_boot,
                                level=level, seed=seed)
        rows.append(gain_row(key, label, table.row(name)["rsum"], table.hada["rsum"], boot))
    return GainTable(rows, caption=f"HADA's Rsum gain, {100 * level:.0f}% paired bootstrap interval over "
                                   f"{len(hada.ranks[0][0]):,} test images ({n_boot:,} resamples, seed {seed})")


def variant_gain(table, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """The HADA-LAVIS-graph row of ``table`` (from ``results`` with K=2) against HADA: its Rsum difference with a
    paired bootstrap interval over test images."""
    from hada.book.tables import GainTable, gain_row
    from hada.metrics import paired_bootstrap

    by_kind = {s.kind: s for s in table.systems}
    variant, hada = by_kind["variant"], by_kind["hada"]
    boot = paired_bootstrap(variant.ranks, hada.ranks, table.caption_image_index, n_boot=n_boot, level=level,
                            seed=seed)
    row = gain_row("lavis", hada.name, table.row(hada.name)["rsum"], table.row(variant.name)["rsum"], boot)
    return GainTable([row], columns=(("name", f"{variant.name} against"), ("reference", "its Rsum"),
                                     ("hada", "variant Rsum"), ("difference_text", "Δ Rsum [95% interval]"),
                                     ("verdict", "difference")),
                     caption=f"{100 * level:.0f}% paired bootstrap interval over test images, seed means")


def recipe_departures(setting: Setting):
    """Every setting where the book's recipe departs from the published one, generated from the two recipe
    objects, with the reason (``hada.book.departures``)."""
    from hada.book.departures import departure_table

    return departure_table(setting.counts["train"]["captions"])


def recipes(setting: Setting, k: int = 2):
    """The book's recipe and the published one trained on the chapter's data, budget and seed: test recalls,
    epochs run, training speed on this machine and trained parameters (a :class:`hada.book.tables.RecipeTable`)."""
    from hada.book.tables import RecipeTable
    from hada.experiments import recipe_results

    return RecipeTable.of(recipe_results(setting, k),
                          caption=f"Two recipes, K={k}, test split of {setting.dataset}: same data, budget "
                                  f"({setting.epochs} epochs of {setting.pairs_per_epoch or 'all'} pairs) and seed "
                                  f"{setting.seed}")


def fusion_strength(setting: Setting):
    """HADA (K=2) on the setting's two backbones and on pairs where one or both are snapshots of their own
    pretraining (weaker versions), against each backbone alone; with the seed band of the default HADA run.
    Returns a :class:`hada.book.tables.StrengthTable` (``.figure()`` draws it)."""
    from hada.book.tables import StrengthTable
    from hada.experiments import hada_seed_rsums, strength_points
    from hada.metrics import seed_band

    return StrengthTable.of(strength_points(setting), seed_band(hada_seed_rsums(setting, 2)))


def claim_table(table, setting: Setting):
    """The paper's +3.6% beside this build's gain of HADA over the best single backbone (``table`` from
    ``results``)."""
    from hada.book.tables import ClaimTable

    return ClaimTable.of(table, setting.dataset)


def backbone_table(setting: Setting):
    """Each backbone alone (its own embeddings' cosine) on the test split."""
    from hada.experiments import baseline_rows
    from hada.book.tables import ResultsTable

    rows = baseline_rows(plan(setting).baselines.config, "test", concat=False)
    return ResultsTable([r for r in rows if r["kind"] == "backbone"],
                        caption=f"Each backbone alone, test split of {setting.dataset}")


# ------------------------------------------------------------------------------------------ ablations


def ablations(setting: Setting, variants=ABLATIONS):
    """Train (or load) every variant with the same budget; test Rsum and its change from the default."""
    from hada.book.tables import AblationTable
    from hada.metrics import metric_row
    from hada.experiments import hada_seed_rsums
    from hada.runs import run_experiment

    rows = []
    for label, name, config in ablation_runs(setting, variants):
        run = run_experiment(config)
        rows.append(metric_row(label, run.test_metrics, epochs=len(run.history)))
    for row in rows:
        row["delta"] = row["rsum"] - rows[0]["rsum"]
    return AblationTable(rows, seed_rsums=hada_seed_rsums(setting, 2)).mark_spread()


# --------------------------------------------------------------------------------------- node graphs
def graph_sample(setting: Setting, k: int = 2, split: str = "test", index: int = 0):
    """The graphs of image ``index`` of ``split`` and of its first caption, from the stored token counts."""
    import numpy as np

    from hada.book.views import GraphSample
    from hada.labels import backbone_labels
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
    return GraphSample(tuple(backbone_labels(names)), image_counts, text_counts, record.captions[0],
                       to_networkx(image_counts, weights), to_networkx(text_counts, weights))


# ----------------------------------------------------------------------------------------- attention
def attention_examples(setting: Setting, k: int = 2, n_correct: int = 2, n_failures: int = 1):
    """Attention of the trained default model's CLS nodes for a few test images (hits and a failure)."""
    from hada.attention import attention_examples as examples
    from hada.book.views import AttentionView
    from hada.data.datasets import load_dataset

    run = train_hada(setting, k)
    dataset = load_dataset(setting.dataset, setting.data_root, check_images=False)
    return AttentionView(examples(run.load_model(), dataset, split="test", n_correct=n_correct,
                                  n_failures=n_failures, seed=setting.seed))


# ----------------------------------------------------------------------------------------- retrieval, seen
def retrieval_seen(setting: Setting, k: int = 2, n_random: int = 3, n_wins: int = 2, n_losses: int = 2,
                   top: int = 5):
    """Test captions and their top images under the best single backbone and under HADA, from the runs the results
    chapter trains: ``n_random`` captions drawn with the setting's seed, then ``n_wins`` that HADA ranks better and
    ``n_losses`` that it ranks worse (the right image in the top ``top`` of one of the two, so the figure shows it).
    Returns a :class:`hada.book.views.RetrievalView` of a :class:`hada.search.TextToImageComparison` (figure, table,
    win/loss counts)."""
    from hada.baselines import backbone_similarity
    from hada.book.views import RetrievalView
    from hada.experiments import baseline_rows
    from hada.search import compare_text_to_image

    search = _run_search(setting, k)
    book = plan(setting)
    rows = baseline_rows(book.for_k(book.concat, k)[0].config, "test", concat=False)
    singles = [r for r in rows if r["kind"] == "backbone"]  # in the order of the run's backbones
    best = max(singles, key=lambda r: r["rsum"])
    similarities = {best["name"]: backbone_similarity(search.data, singles.index(best)),
                    f"HADA (K={k})": search.similarity()}
    return RetrievalView(compare_text_to_image(search, similarities, n_random, n_wins, n_losses, top,
                                               seed=setting.seed))


def projected_store_size(dataset: str = "flickr30k", backbones=("ViT-B-16",), **kwargs):
    """The disk size of a dataset's feature store (:func:`hada.features.store.projected_store_size`), as a table."""
    from hada.book.views import store_size_table
    from hada.features.store import projected_store_size as size

    return store_size_table(size(dataset, backbones, **kwargs))


def search(setting: Setting, query: str, k: int = 2, top: int = 5):
    """``hada search`` on the default HADA run for K backbones: the test split's ``top`` images for a caption."""
    from hada.book.views import hits_table

    hits = _run_search(setting, k).text_to_image(query, top)
    return hits_table(hits, caption=f"top {len(hits)} test images for “{query}”, HADA (K={k})")


_SEARCHES: dict = {}  # run folder -> RunSearch of its test split: a chapter embeds the gallery once


def _run_search(setting: Setting, k: int):
    from hada.search import RunSearch

    run = train_hada(setting, k)
    if run.run_dir not in _SEARCHES:
        _SEARCHES[run.run_dir] = RunSearch(run.load_model(), "test")
    return _SEARCHES[run.run_dir]
