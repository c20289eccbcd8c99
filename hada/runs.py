"""A run's identity and folder, and train-or-load: the one place that names a run.

A run lives in ``runs_dir()/<name>-<key>/``, both derived from its configuration alone (:func:`run_name`,
:func:`run_key`): whoever trains a configuration (a chapter, ``hada prepare``, ``hada train``) finds the same
folder. ``key`` is 12 hex digits of a sha256 over the resolved :class:`~hada.train.TrainConfig` (less the
dataset's folder), the content ids of every feature store the run reads (their arrays' sha256 and the weights'
sha256, never a path: moving a data folder retrains nothing), training's CPU thread count (on a CPU), and a digest
of the source of the code that computes a result (:func:`code_digest`: the import closure of
:data:`RESULT_ENTRY_POINTS`, so the book's figures and tables count for nothing). Changing a parameter,
re-extracting features or changing how a number is computed gives a new key, so nothing stale is reused; a comment
or docstring change keeps the key. The same key loads the finished run; an unfinished one resumes from its
last checkpoint, exactly (same numbers as an uninterrupted run).

Within one process, train statistics and loaded feature arrays are shared between runs (ten ablations on
the same backbones read the stores once).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hada import distributed
from hada.errors import HadaError
from hada.paths import runs_dir
from hada import train as _train
from hada.config import TrainConfig
from hada.io import main_lock, read_json, write_json
from hada.train import TrainedModel, load_trained

#: The code that computes a run's result, as entry points: training and loading a run (this module, which calls
#: ``hada.train``), embedding and ranking a split (``hada.evaluate``), the fusion baselines' rows
#: (``hada.baselines``) and the recalls (``hada.metrics``). The digest covers these and every module they import,
#: at module level or inside a function (:func:`hada.codegraph.import_closure`), found from the imports: a module
#: none of them reaches (``hada.book``, ``hada.cli``, ``hada.experiments``, ``hada.pipeline``, the drawing in
#: ``hada.book.views``) changes no key. ``tests/test_boundary.py`` keeps presentation out of that closure.
RESULT_ENTRY_POINTS = ("hada.runs", "hada.evaluate", "hada.baselines", "hada.metrics")

_PACKAGE = Path(__file__).resolve().parent
_STATS: dict = {}  # (dataset, root, backbone, split, manifest hash) -> (image, text TokenStats); global: FeatureStats
_DATA: dict = {}  # (dataset, root, backbones, split, with_tokens, stats key, device) -> FeatureData
_DIGESTS: dict = {}  # (root, skip, file stamps) -> digest: a digest is computed once per process per code state


# ------------------------------------------------------------------------------------------ code digest
def normalised_source(text: str) -> str:
    """The code of one module without comments, docstrings or layout (``ast.dump`` of the docstring-free tree)."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def result_code_files(root: str | Path | None = None, entry_points=RESULT_ENTRY_POINTS) -> list[Path]:
    """The files :func:`code_digest` hashes: the import closure of ``entry_points`` in the package at ``root``."""
    from hada.codegraph import import_closure, import_graph, package_modules

    root = _PACKAGE if root is None else Path(root).resolve()
    modules = package_modules(root)
    closure = import_closure(entry_points, import_graph(root))
    return sorted(modules[m] for m in closure if m in modules)


def _digest(root: Path, files: list[Path]) -> str:
    stamp = (str(root), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for path in files:
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(normalised_source(path.read_text(encoding="utf-8")).encode() + b"\0")
        _DIGESTS[stamp] = h.hexdigest()
    return _DIGESTS[stamp]


def code_digest(root: str | Path | None = None) -> str:
    """sha256 over the normalised source of the code that computes a run's result (:func:`result_code_files`) in
    the package at ``root`` (default: ``hada``'s own folder). Cached per process and per files' state."""
    root = _PACKAGE if root is None else Path(root).resolve()
    files = result_code_files(root)
    return _digest(root, files)


def package_digest(root: str | Path | None = None) -> str:
    """sha256 over the normalised source of every module of the package, presentation included: what the book's
    notebook cache is kept against (``hada.pipeline.refresh_notebook_cache``), never a run's key."""
    root = _PACKAGE if root is None else Path(root).resolve()
    return _digest(root, sorted(root.rglob("*.py")))


# ------------------------------------------------------------------------------------------ run identity
def run_splits(config: TrainConfig) -> tuple[str, str, str]:
    """The splits a run reads: train, val (early stopping) and test (final metrics)."""
    return config.data.splits


def _data_id(config: TrainConfig) -> tuple:
    """What the in-process caches key a run's data on: dataset, its folder and the backbones."""
    return config.data.dataset, str(config.data.data_root), tuple(config.data.backbones)


def _manifest_hash(split) -> str:
    """A store's content id (:func:`hada.features.store.content_id`: its arrays' sha256 and what made them, not
    where it lies); stores held in memory without checksums (the tests' toy features) by their whole manifest."""
    from hada.features.store import content_id

    manifest = getattr(split, "manifest", None) or {}
    if manifest.get("checksums"):
        return content_id(manifest)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def features_fingerprint(config: TrainConfig) -> dict:
    """``{backbone: {split: manifest sha256}}`` of every store the run reads (and of the augmented views of the
    train split, for a run that uses them)."""
    from hada.features.store import AUGMENT_DIR, MANIFEST

    config = config.resolved()
    out: dict = {b: {} for b in config.data.backbones}
    for split in run_splits(config):
        for b, fs in zip(config.data.backbones, _train.open_splits(config, split)):
            out[b][split] = _manifest_hash(fs)
            if b in config.data.augmented_backbones and split == config.data.train_split and getattr(fs, "path", None):
                augmented = Path(fs.path) / AUGMENT_DIR / MANIFEST
                if augmented.is_file():
                    out[b]["augmented"] = hashlib.sha256(augmented.read_bytes()).hexdigest()
    return out


def content_key(payload: dict) -> str:
    """12 hex digits of the sha256 of ``payload`` plus the result code's digest: the key of anything cached."""
    text = json.dumps({**payload, "code": code_digest()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_key(config: TrainConfig, fingerprint: dict | None = None, threads: int | None = None) -> str:
    """The run's key: configuration + feature manifests + result code digest, + the rank count under DDP (the
    global batch is the per-rank batch times the ranks) and, on a CPU, training's torch thread count
    (:func:`hada.train.train_threads` of ``threads``: CPU matrix products round differently with it, so it changes
    the numbers; scoring always runs on one thread, ``hada.metrics.SCORING_THREADS``)."""
    config = config.resolved()
    fingerprint = features_fingerprint(config) if fingerprint is None else fingerprint
    payload = {"config": config.identity(), "features": fingerprint}
    if distributed.world_size() > 1:
        payload["ranks"] = distributed.world_size()
    if config.device == "cpu":
        payload["threads"] = _train.train_threads(threads)
    return content_key(payload)


def run_name(config: TrainConfig) -> str:
    """A run's readable name, from its configuration alone: the architecture and the backbone count (``hada-k2``,
    ``concat-k3``). Whoever trains the same configuration names it the same, so finds the same folder."""
    return f"{config.model.arch}-k{len(config.data.backbones)}"


def run_folder(config: TrainConfig, fingerprint: dict | None = None, threads: int | None = None) -> Path:
    """``runs_dir()/<name>-<key>`` (:func:`run_name`, :func:`run_key`): where the run of ``config`` lives. The one
    place a run folder is named; nothing a caller says changes it."""
    config = config.resolved()
    return runs_dir() / f"{run_name(config)}-{run_key(config, fingerprint, threads)}"


# ------------------------------------------------------------------------------------------ shared data
def _stats(config: TrainConfig):
    """Train statistics of the run's backbones, computed once per process per store."""
    from hada.features.batching import FeatureStats, compute_stats, raw_stats

    train_split = run_splits(config)[0]
    if config.data.token_stats == "raw":  # no statistics: the tokens enter as stored
        return raw_stats(len(config.data.backbones))
    dataset, root, backbones = _data_id(config)
    image, text = [], []
    for b, fs in zip(backbones, _train.open_splits(config, train_split)):
        key = (dataset, root, b, train_split, _manifest_hash(fs))
        if key not in _STATS:
            st = compute_stats([fs])
            _STATS[key] = (st.image[0], st.text[0])
        image.append(_STATS[key][0])
        text.append(_STATS[key][1])
    return FeatureStats(image, text)


def _pooled_stats(config: TrainConfig):
    """One global mean/std over every backbone and modality of the train split (the published standardisation),
    computed once per process per set of stores."""
    from hada.features.batching import compute_stats

    train_split = run_splits(config)[0]
    splits = _train.open_splits(config, train_split)
    key = (*_data_id(config), train_split, "global", tuple(_manifest_hash(fs) for fs in splits))
    if key not in _STATS:
        _STATS[key] = compute_stats(splits, pooled=True)
    return _STATS[key]


def run_stats(config: TrainConfig, run_dir: Path | None = None):
    """The train statistics the trainer will normalise with: the run's saved ``stats.json``, else the global ones
    (``token_stats="global"``) or each backbone's own. Data built with them is the trainer's only copy."""
    from hada.features.batching import FeatureStats

    saved = run_dir / "stats.json" if run_dir is not None else None
    if saved is not None and saved.exists():
        return FeatureStats.from_dict(json.loads(saved.read_text()))
    return _pooled_stats(config) if config.data.token_stats == "global" else _stats(config)


def _shared_splits(config: TrainConfig) -> tuple[str, ...]:
    """The splits whose shared data the trainer uses as it is: all but the train split when that one carries
    augmented views (the trainer builds it with them)."""
    train_split = run_splits(config)[0]
    return tuple(s for s in run_splits(config) if not (s == train_split and config.data.augment_p > 0))


def shared_data(config: TrainConfig, split: str, stats=None, device=None):
    """FeatureData of one split for this config on its device (``device``: the exact one, e.g. cuda:1; default
    the config's), normalised with the train statistics; cached in-process."""
    from hada.devices import resolve_device
    from hada.features.batching import FeatureData

    device = resolve_device(config.device) if device is None else device
    config = config.resolved()
    stats = stats if stats is not None else _stats(config)
    tokens = config.model.arch == "hada"
    options = _train.split_options(config, split)
    key = (*_data_id(config), split, tokens, json.dumps(stats.to_dict(), sort_keys=True), str(device),
           json.dumps(options, sort_keys=True))
    if key not in _DATA:
        _DATA[key] = FeatureData(_train.open_splits(config, split), stats, with_tokens=tokens, device=device,
                                 **options)
    return _DATA[key]


def clear_cache() -> None:
    """Forget the in-process feature arrays and statistics (they are reloaded on the next call)."""
    _STATS.clear()
    _DATA.clear()


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RunResult:
    """A finished run: its configuration, per-epoch history and best-epoch val/test metrics."""

    name: str
    run_dir: Path
    config: TrainConfig
    history: list[dict]
    metrics: dict  # metrics.json: val, test, best_epoch, epochs_run, stopped_early, tau, mix_weight

    @property
    def test_metrics(self) -> dict:
        return self.metrics["test"]

    @property
    def val_metrics(self) -> dict:
        return self.metrics["val"]

    @property
    def best_epoch(self) -> int:
        return int(self.metrics["best_epoch"])

    @property
    def best_val_rsum(self) -> float:
        return float(self.metrics["val"]["rsum"])

    @property
    def seconds_per_epoch(self) -> float:
        """Mean wall time of an epoch (training + validation) as recorded in the history."""
        times = [h["time_s"] for h in self.history]
        return sum(times) / len(times) if times else float("nan")

    def load_model(self, device="cpu") -> TrainedModel:
        """The best epoch's model (objective with tau and w) and its train statistics, on ``device``."""
        return load_trained(self.run_dir, "best", device=device)

    def summary(self) -> dict:
        t = self.test_metrics
        return {"run": self.run_dir.name, "epochs": len(self.history), "best_epoch": self.best_epoch,
                "val_rsum": round(self.best_val_rsum, 2), "test_rsum": round(t["rsum"], 2),
                "tau": round(self.metrics["tau"], 4), "mix_weight": round(self.metrics["mix_weight"], 3),
                "seconds_per_epoch": round(self.seconds_per_epoch, 2)}


def load_result(run_dir: Path) -> RunResult:
    """The finished run in ``run_dir`` (its ``metrics.json`` exists)."""
    hint = f"delete {run_dir} (or rerun `hada train` with --restart) to train the run again"
    config = TrainConfig.from_dict(read_json(run_dir / "config.json", hint))
    history = read_json(run_dir / "history.json", hint)
    metrics = read_json(run_dir / "metrics.json", hint)
    if not isinstance(metrics, dict) or not {"val", "test", "best_epoch"} <= metrics.keys():
        raise HadaError(f"{run_dir / 'metrics.json'} is damaged (not a run's metrics); {hint}")
    return RunResult(run_name(config), run_dir, config, history, metrics)


# --------------------------------------------------------------------------------------- train or load
def run_experiment(config: TrainConfig, progress: bool | None = None, threads: int | None = None,
                   restart: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train the configuration, or load it if this exact run finished before, or resume it from its last
    checkpoint if it did not. ``restart`` deletes the run's folder first and trains it anew.

    The one set of rules for every caller (chapters, ``hada prepare``, ``hada train``). A Ctrl-C leaves the
    last finished epoch in the folder; the next call resumes from there.
    """
    from hada.devices import resolve_device

    device = resolve_device(config.device)  # before resolving: the config keeps only the type (cuda, not cuda:1)
    config = config.resolved()
    fingerprint = features_fingerprint(config)
    run_dir = run_folder(config, fingerprint, threads)
    with main_lock(run_dir, "this run", log):  # a second identical command waits, then loads the first one's run
        return _run_locked(config, fingerprint, run_dir, device, progress, threads, restart, log)


def _run_locked(config, fingerprint, run_dir, device, progress, threads, restart, log) -> RunResult:
    """:func:`run_experiment` while holding the run folder's lock."""
    if restart and run_dir.exists() and distributed.is_main():
        shutil.rmtree(run_dir)
    distributed.barrier()  # under torchrun: rank 0 alone writes the folder
    if (run_dir / "metrics.json").exists():
        return _finished(run_dir)
    if (run_dir / "checkpoint.pt").exists() and distributed.is_main():
        history = run_dir / "history.json"
        done = len(json.loads(history.read_text())) if history.exists() else "?"
        log(f"resuming {run_dir.name} after epoch {done} from its checkpoint (exact: the same numbers as an "
            "uninterrupted run)")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "features.json", fingerprint)
    stats = run_stats(config, run_dir)  # the statistics the trainer uses, so it keeps this one copy of each split
    data = {split: shared_data(config, split, stats, device) for split in _shared_splits(config)}
    _train.train(config, run_dir, resume=True, progress=progress, data=data, threads=threads, log=log,
                 device=device)
    return _finished(run_dir)


def _finished(run_dir: Path) -> RunResult:
    """The finished run, with its test result in CLIP_benchmark's format beside metrics.json (written by rank 0
    when missing, so a run finished before the file existed gets one too)."""
    from hada.evaluate import RUN_RESULTS_FILE, write_run_results

    result = load_result(run_dir)
    if distributed.is_main() and not (run_dir / RUN_RESULTS_FILE).exists():
        write_run_results(run_dir, result.config, result.test_metrics)
    return result
