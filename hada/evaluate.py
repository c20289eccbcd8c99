"""Scoring trained encoders: embed a split, and record results the way CLIP_benchmark does.

The recalls themselves (and the similarity sources they read) live in :mod:`hada.metrics`, the one recall
function every caller uses.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from hada.errors import HadaError
from hada.io import write_bytes, write_json
from hada.metrics import KS, METRIC_KEYS, scoring_threads


# ------------------------------------------------------------------------------- embedding a split
@torch.no_grad()
def embed_split(pair, data, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """L2-normalised (image [n_img, d], text [n_cap, d]) embeddings of a whole split, in split order.

    ``pair`` has ``.image``/``.text`` encoders; ``data`` is a :class:`hada.features.batching.FeatureData`.
    The encoders are put in eval mode for the call and restored afterwards. Batches go to the encoders' device
    (a no-op when the data is already there), so the embeddings stay on it for the ranking. This is the one way a
    split is embedded (training's validation and test, ``hada evaluate``, ``hada search``, the book): every
    caller passes the run's ``eval_batch_size``, and it runs on :data:`hada.metrics.SCORING_THREADS` threads,
    since under bfloat16 the embeddings follow both the batching and the thread count.
    """
    device = next(pair.parameters()).device
    modes = [(m, m.training) for m in (pair.image, pair.text)]
    for m, _ in modes:
        m.eval()
    try:
        with scoring_threads():
            img = torch.cat([pair.image(b.to(device, non_blocking=True)) for b in data.iter_images(batch_size)])
            txt = torch.cat([pair.text(b.to(device, non_blocking=True)) for b in data.iter_texts(batch_size)])
    finally:
        for m, mode in modes:
            m.train(mode)
    return img, txt


# -------------------------------------------------------------------------------- CLIP_benchmark IO
# The record is the json that `clip_benchmark eval` dumps (clip_benchmark/cli.py, main_eval) and that
# `clip_benchmark build` reads: exactly these keys, recalls as fractions under its own metric names.
RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
TASK = "zeroshot_retrieval"
LANGUAGE = "en"
#: hada's dataset names as CLIP_benchmark spells them; the synthetic set has no counterpart there.
CLIP_BENCHMARK_DATASETS = {"flickr30k": "flickr30k", "coco": "mscoco_captions", "synthetic": "synthetic"}
#: A finished run's record, beside its metrics.json (test split).
RUN_RESULTS_FILE = "clip_benchmark.json"


def clip_benchmark_dataset(dataset: str, split: str = "test") -> str:
    """CLIP_benchmark's name of ``dataset``; a split other than test (its default) is appended as ``/split``."""
    name = CLIP_BENCHMARK_DATASETS.get(dataset, dataset)
    return name if split == "test" else f"{name}/{split}"


def clip_benchmark_metrics(metrics: dict) -> dict:
    """hada's recalls (percent) as CLIP_benchmark writes them: fractions (rounded to 15 decimals, so a hit
    rate such as 0.372 reads as such), image then text for each k."""
    try:
        return {key: round(float(metrics[key]) / 100.0, 15)
                for key in (f"{way}_retrieval_recall@{k}" for k in KS for way in ("image", "text"))}
    except KeyError as exc:
        raise HadaError(f"metrics lack {exc.args[0]}; expected the six recalls of hada.metrics") from None


def clip_benchmark_record(metrics: dict, dataset: str, model: str, pretrained: str, split: str = "test") -> dict:
    """One result as CLIP_benchmark writes it. ``pretrained`` names the weights (a tag, a file, a run folder)."""
    if not pretrained or not isinstance(pretrained, str):
        raise HadaError(f"{model}: a CLIP_benchmark record needs the weights it scored, got {pretrained!r}")
    return {"dataset": clip_benchmark_dataset(dataset, split), "model": model, "pretrained": pretrained,
            "task": TASK, "metrics": clip_benchmark_metrics(metrics), "language": LANGUAGE}


def percent_metrics(record: dict) -> dict:
    """A record's recalls back in hada's form (percent, with Rsum), for :mod:`hada.book.tables`."""
    out = {key: 100.0 * record["metrics"][key] for key in METRIC_KEYS}
    out["rsum"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------ what was scored
def backbone_identity(spec: str) -> tuple[str, str]:
    """``(model, pretrained)`` of a backbone spec: the open_clip model and its tag or weights file, which is
    what ``clip_benchmark eval --model --pretrained`` would be given. A spec that no longer resolves (its
    weights moved after its features were extracted) is recorded as it was given."""
    from hada.backbones.spec import resolve_spec

    try:
        resolved = resolve_spec(spec)
    except HadaError:
        return spec.split(":", 1)[0], spec
    if resolved.kind == "tag":
        return resolved.model_name, spec.split(":", 1)[1]
    if resolved.weights is None:
        return resolved.model_name, "random-init"
    return resolved.model_name, str(resolved.weights)


def fusion_identity(model: str, specs) -> tuple[str, str]:
    """``(model, pretrained)`` of an untrained fusion (similarity averaging): the weights of its backbones."""
    return model, " + ".join(backbone_identity(spec)[1] for spec in specs)


def run_model_name(config) -> str:
    """What a trained run is, by its architecture and backbones: ``hada(a + b)`` or ``concat(a + b) + linear``."""
    inner = "(" + " + ".join(config.data.backbones) + ")"
    return f"concat{inner} + linear" if config.model.arch == "concat" else f"{config.model.arch}{inner}"


def run_identity(run_dir, config) -> tuple[str, str]:
    """``(model, pretrained)`` of a trained run: its weights are its folder."""
    return run_model_name(config), str(Path(run_dir).resolve())


# ------------------------------------------------------------------------------------ files
def result_filename(record: dict) -> str:
    """CLIP_benchmark's default file name, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``, with a
    path in ``pretrained`` reduced to its last part (as it does) and anything odd replaced by ``-``."""
    pretrained = " + ".join(Path(p).name for p in record["pretrained"].split(" + "))
    parts = (record["dataset"], pretrained, record["model"], record["language"], record["task"])
    name = "_".join(re.sub(r"[^A-Za-z0-9._@+-]+", "-", part).strip("-") for part in parts)
    return name + ".json"


def write_records(records, folder) -> list[Path]:
    """One json file per record in ``folder`` (CLIP_benchmark writes one per evaluation)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HadaError(f"{folder} is a file; results go to a folder, one json per row")
    paths = [folder / result_filename(r) for r in records]
    if len(set(paths)) != len(paths):
        raise HadaError(f"two rows would share one results file in {folder}; give distinct models")
    return [write_json(path, record) for path, record in zip(paths, records)]


def write_run_results(run_dir, config, test_metrics: dict) -> Path:
    """A finished run's test record, ``RUN_RESULTS_FILE`` beside its metrics.json."""
    model, pretrained = run_identity(run_dir, config)
    record = clip_benchmark_record(test_metrics, config.data.dataset, model, pretrained, config.data.test_split)
    return write_json(Path(run_dir) / RUN_RESULTS_FILE, record)


def read_record(path) -> dict:
    """A CLIP_benchmark record from ``path``, checked: exactly its keys, a retrieval task, the six recalls."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HadaError(f"cannot read results file {path}: {exc}") from None
    if not isinstance(record, dict) or tuple(sorted(record)) != tuple(sorted(RECORD_KEYS)):
        raise HadaError(f"{path} is not one CLIP_benchmark record (keys {', '.join(RECORD_KEYS)})")
    if record["task"] != TASK or not set(METRIC_KEYS) <= set(record["metrics"]):
        raise HadaError(f"{path} is not a {TASK} result with the six recalls")
    return record


def benchmark_rows(paths) -> list[dict]:
    """The rows ``clip_benchmark build`` makes of result files (a folder stands for its ``.json`` files): the
    record's metrics, then its other keys, then ``model_fullname`` = ``model + " " + pretrained``."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows = []
    for path in files:
        record = read_record(path)
        row = {**record["metrics"], **{k: v for k, v in record.items() if k != "metrics"}}
        row["model_fullname"] = f"{row['model']} {row['pretrained']}"
        rows.append(row)
    return rows


#: The CSV's first columns; the metrics follow in their order of the records.
CSV_LEAD = ("model_fullname", "model", "pretrained", "dataset", "task", "language")


def write_benchmark_csv(paths, output) -> Path:
    """The CSV ``clip_benchmark build PATHS --output OUTPUT`` writes, without importing clip_benchmark (whose
    command line imports its evaluation dependencies, pycocoevalcap among them): the same rows and values (the
    csv module's own formatting), its columns in a fixed order where clip_benchmark's follow a set's."""
    import csv
    import io

    rows = benchmark_rows(paths)
    if not rows:
        raise HadaError(f"no result files in {', '.join(map(str, paths))}")
    columns = list(CSV_LEAD) + [k for k in dict.fromkeys(k for row in rows for k in row) if k not in CSV_LEAD]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_bytes(output, text.getvalue())
