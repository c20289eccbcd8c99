"""The page "Every run's results" (book/results_all.md): the CLIP_benchmark record each finished run wrote beside
its metrics.json (``hada.evaluate.RUN_RESULTS_FILE``), gathered into the package's one table. It reads, it
trains nothing.

Only runs of the current code are shown: a folder whose name no longer matches the key of its own configuration
and feature manifests was trained by other code (a restored cache can hold such folders), and its numbers would
be stale. The runs the book trains are single-process; a folder trained under torchrun with several ranks is
keyed with the rank count too and is counted as from other code here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hada.book.tables import METRIC_COLUMNS, Table
from hada.errors import HadaError

COLUMNS = (("name", "model"), ("run", "run folder"), ("dataset", "dataset")) + METRIC_COLUMNS


@dataclass
class GatheredResults:
    """The records of the current runs (``(run folder, record)``) and the folders left out as from other code."""

    records: list[tuple[Path, dict]]
    other_code: list[Path]


def is_current(run_dir: Path) -> bool:
    """Whether ``run_dir``'s name carries the key its configuration and feature manifests have under this code."""
    from hada.config import TrainConfig
    from hada.runs import run_key

    try:
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        fingerprint = json.loads((run_dir / "features.json").read_text())
        return run_dir.name.endswith("-" + run_key(config, fingerprint))
    except (OSError, ValueError, KeyError, HadaError):
        return False


def gather(runs_root: Path | None = None) -> GatheredResults:
    """Every finished run's record under ``runs_root`` (default: the book's data/runs), split by currency."""
    from hada.evaluate import RUN_RESULTS_FILE, read_record
    from hada.paths import runs_dir

    root = Path(runs_root) if runs_root is not None else runs_dir()
    records, other = [], []
    for path in sorted(root.glob(f"*/{RUN_RESULTS_FILE}")):
        if is_current(path.parent):
            records.append((path.parent, read_record(path)))
        else:
            other.append(path.parent)
    return GatheredResults(records, other)


def model_label(run_dir: Path, record: dict) -> str:
    """The record's model (``hada(a + b)``, from the run's backbone specs) with each spec given as its label
    (:func:`hada.labels.backbone_labels`): a run on ``ViT-B-16:/weights/vit_b_16.bin`` is ``hada(ViT-B-16 + ...)``,
    never the weights' path. The record itself keeps the specs, as CLIP_benchmark's file names them."""
    from hada.labels import backbone_labels

    try:
        specs = json.loads((Path(run_dir) / "config.json").read_text())["data"]["backbones"]
    except (OSError, ValueError, KeyError, TypeError):
        return record["model"]
    name = record["model"]
    for spec, label in sorted(zip(specs, backbone_labels(specs)), key=lambda pair: -len(pair[0])):
        name = name.replace(spec, label)
    return name


def results_table(gathered: GatheredResults) -> Table:
    """One row per run: its model, folder and dataset, the six recalls and Rsum in percent; best Rsum first
    within each dataset."""
    from hada.evaluate import percent_metrics

    rows = [{"name": model_label(run_dir, record), "run": run_dir.name, "dataset": record["dataset"],
             **percent_metrics(record)} for run_dir, record in gathered.records]
    rows.sort(key=lambda row: (row["dataset"], -row["rsum"], row["run"]))
    return Table(rows, columns=COLUMNS, caption="Test results of every finished run, from its CLIP_benchmark file")
