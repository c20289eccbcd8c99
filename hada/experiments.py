"""Experiments the book runs beside HADA: the baseline rows of the results table and the concatenation +
linear run they include. A run's identity, folder and train-or-load live in :mod:`hada.runs`.
"""

from __future__ import annotations

import json

from hada.paths import runs_dir
from hada.runs import content_key, features_fingerprint, run_experiment, shared_data
from hada.config import DEFAULT_RECIPE, TrainConfig, recipe
from hada.io import write_json


# -------------------------------------------------------------------------------------- baselines
def baseline_table(dataset: str, backbones, split: str = "test", data_root=None, concat: bool = True,
                   config: TrainConfig | None = None, progress: bool | None = None) -> list[dict]:
    """Rows ``{name, kind, six recalls, rsum}`` for each backbone alone, their similarity average and
    (``concat``) the trained concatenation + linear baseline, all scored on ``split``.

    ``config`` sets the concatenation run's training (epochs, seed, loss); its data and arch fields
    are overridden. Untrained rows are cached as json next to the runs, keyed like runs.
    """
    from hada.baselines import untrained_baselines
    from hada.metrics import retrieval_metrics
    from hada.book.tables import metric_row

    plain_cfg, run_name = concat_run(dataset, backbones, data_root, config)  # embeddings only
    names = plain_cfg.data.backbones
    fp = features_fingerprint(plain_cfg)
    key = content_key({"dataset": dataset, "root": plain_cfg.data.data_root, "backbones": names, "split": split,
                       "features": fp})
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
