"""The book's cache layer: train-or-load a run by configuration, and the baseline rows of the results table.

A run lives in ``runs_dir()/<name>-<key>/`` where ``key`` is 12 hex digits of a sha256 over the resolved
:class:`~hada.config.TrainConfig` *and* the manifests of every feature store it reads. Changing any
parameter, or re-extracting features (new backbone weights, new data), gives a new key, so nothing stale
is ever reused; the same configuration on the same features loads the finished run instantly, and an
unfinished one resumes from its last checkpoint.

Within one process, feature statistics and loaded feature arrays are shared between runs (ten ablations
on the same backbones read the stores once).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hada.errors import HadaError
from hada.paths import runs_dir
from hada import train as _train
from hada.config import DEFAULT_RECIPE, TrainConfig, recipe
from hada.io import write_json
from hada.train import TrainedModel, load_trained

SPLITS = ("train", "val", "test")
_STATS: dict = {}  # (dataset, root, backbone, split, manifest hash) -> (image TokenStats, text TokenStats)
_DATA: dict = {}  # (dataset, root, backbones, split, with_tokens, stats key) -> FeatureData


# ----------------------------------------------------------------------------------- fingerprints
def _manifest_hash(split) -> str:
    manifest = getattr(split, "manifest", None) or {}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()


def features_fingerprint(config: TrainConfig) -> dict:
    """``{backbone: {split: manifest sha256}}`` of every store the run reads."""
    config = config.resolved()
    out: dict = {b: {} for b in config.data.backbones}
    for split in (config.data.train_split, config.data.val_split, config.data.test_split):
        for b, fs in zip(config.data.backbones, _train.open_splits(config, split)):
            out[b][split] = _manifest_hash(fs)
    return out


def run_key(config: TrainConfig, fingerprint: dict | None = None) -> str:
    config = config.resolved()
    fingerprint = features_fingerprint(config) if fingerprint is None else fingerprint
    text = json.dumps({"config": config.to_dict(), "features": fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ shared data
def _stats(config: TrainConfig):
    """Train statistics of the run's backbones, computed once per process per store."""
    from hada.features.batching import FeatureStats, compute_stats

    splits = _train.open_splits(config, config.data.train_split)
    image, text = [], []
    for b, fs in zip(config.data.backbones, splits):
        key = (config.data.dataset, str(config.data.data_root), b, config.data.train_split, _manifest_hash(fs))
        if key not in _STATS:
            st = compute_stats([fs])
            _STATS[key] = (st.image[0], st.text[0])
        image.append(_STATS[key][0])
        text.append(_STATS[key][1])
    return FeatureStats(image, text)


def shared_data(config: TrainConfig, split: str, stats=None):
    """FeatureData of one split for this config, normalised with the train statistics; cached in-process."""
    from hada.features.batching import FeatureData

    config = config.resolved()
    stats = stats if stats is not None else _stats(config)
    tokens = config.model.arch == "hada"
    key = (config.data.dataset, str(config.data.data_root), tuple(config.data.backbones), split, tokens,
           json.dumps(stats.to_dict(), sort_keys=True))
    if key not in _DATA:
        _DATA[key] = FeatureData(_train.open_splits(config, split), stats, with_tokens=tokens)
    return _DATA[key]


def clear_cache() -> None:
    """Forget the in-process feature arrays and statistics (they are reloaded on the next call)."""
    _STATS.clear()
    _DATA.clear()


# ------------------------------------------------------------------------------------------- runs
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

    def load_model(self) -> TrainedModel:
        """The best epoch's model (objective with tau and w) and its train statistics."""
        return load_trained(self.run_dir, "best")

    def summary(self) -> dict:
        t = self.test_metrics
        return {"run": self.run_dir.name, "epochs": len(self.history), "best_epoch": self.best_epoch,
                "val_rsum": round(self.best_val_rsum, 2), "test_rsum": round(t["rsum"], 2),
                "tau": round(self.metrics["tau"], 4), "mix_weight": round(self.metrics["mix_weight"], 3),
                "seconds_per_epoch": round(self.seconds_per_epoch, 2)}


def _load_result(name: str, run_dir: Path) -> RunResult:
    config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    history = json.loads((run_dir / "history.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return RunResult(name, run_dir, config, history, metrics)


def run_dir_for(config: TrainConfig, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise HadaError(f"a run name must be a plain folder name, got {name!r}")
    return runs_dir() / f"{name}-{run_key(config)}"


def run_experiment(config: TrainConfig, name: str, progress: bool | None = None) -> RunResult:
    """Train the configuration (or load it if this exact run finished before; resume it if it did not)."""
    config = config.resolved()
    fingerprint = features_fingerprint(config)
    run_dir = runs_dir() / f"{name}-{run_key(config, fingerprint)}"
    if (run_dir / "metrics.json").exists():
        return _load_result(name, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "features.json", fingerprint)
    stats = _stats(config)
    data = {split: shared_data(config, split, stats)
            for split in (config.data.train_split, config.data.val_split, config.data.test_split)}
    _train.train(config, run_dir, resume=True, progress=progress, data=data)
    return _load_result(name, run_dir)


# -------------------------------------------------------------------------------------- baselines
def baseline_table(dataset: str, backbones, split: str = "test", data_root=None, concat: bool = True,
                   config: TrainConfig | None = None, progress: bool | None = None) -> list[dict]:
    """Rows ``{name, kind, six recalls, rsum}`` for each backbone alone, their similarity average and
    (``concat``) the trained concatenation + linear baseline, all scored on ``split``.

    ``config`` sets the concatenation run's training (epochs, seed, loss); its data and arch fields
    are overridden. Untrained rows are cached as json next to the runs, keyed like runs.
    """
    from hada.baselines import untrained_baselines
    from hada.evaluate import retrieval_metrics
    from hada.book.tables import metric_row

    plain_cfg, run_name = concat_run(dataset, backbones, data_root, config)  # embeddings only
    names = plain_cfg.data.backbones
    fp = features_fingerprint(plain_cfg)
    key = hashlib.sha256(json.dumps({"dataset": dataset, "root": plain_cfg.data.data_root, "backbones": names, "split": split,
                                     "features": fp}, sort_keys=True).encode()).hexdigest()[:12]
    cache = runs_dir() / "baselines" / f"{dataset}-{split}-{key}.json"
    if cache.exists():
        rows = json.loads(cache.read_text())
    else:
        data = shared_data(plain_cfg, split)
        rows = []
        for row_name, m in untrained_baselines(data, names):
            rows.append(metric_row(row_name, m, kind="backbone" if row_name in names else "fusion"))
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, rows)
    if concat and len(names) > 1:
        run = run_experiment(plain_cfg, run_name, progress=progress)
        if split == plain_cfg.data.test_split:
            m = run.test_metrics
        else:
            m = retrieval_metrics(run.load_model().similarity(shared_data(plain_cfg, split)),
                                  shared_data(plain_cfg, split).caption_image_index)
        rows = rows + [metric_row("concat(" + " + ".join(names) + ") + linear", m, kind="fusion")]
    return rows


def concat_run(dataset: str, backbones, data_root=None, config: TrainConfig | None = None) -> tuple[TrainConfig, str]:
    """The configuration and run name of the concatenation + linear baseline ``baseline_table`` trains
    (``config``'s training settings on the given data and backbones, arch "concat")."""
    base = config or recipe(DEFAULT_RECIPE)
    cfg = base.override({"data": {"dataset": dataset, "data_root": None if data_root is None else str(data_root),
                                  "backbones": backbones}, "model": {"arch": "concat"}}).resolved()
    return cfg, "concat-" + "+".join(_short(n) for n in cfg.data.backbones)


def _short(spec: str) -> str:
    """A backbone spec as a folder-name-safe token."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-40:]
