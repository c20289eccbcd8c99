"""``hada evaluate``: score backbones, fusion baselines and trained runs on one split, the same way."""

from __future__ import annotations

import argparse
from pathlib import Path

from hada.cli.flags import add_backbones_flag, add_dataset_flags, add_device_flag, add_jobs_flag

HELP = """\
Score image-text retrieval on one split with one function for every row: R@1/5/10 image->text
(a hit if any of the image's captions is in the top k), R@1/5/10 text->image, and Rsum, in percent.

Rows: each backbone alone (cosine of its own projected embeddings), the average of the backbones'
similarities, optionally the concatenation + linear baseline (--concat; trained with HADA's loss and
cached like any run, so the first call trains it), and every trained run given with --run (HADA's
inference score: (1 - w) * its cosine + w * the main backbone's cosine). Runs are scored with their own
train feature statistics and backbones, with the same embedding code, batch size and thread count as
`hada train`'s own test scores, so the two agree to the last digit. Ties count for the positive (rank =
number of strictly higher scores). Needs the features of the split (`hada features extract`).

Output: a table on stdout (percent) and one json file per row in CLIP_benchmark's exact format
({"dataset", "model", "pretrained", "task": "zeroshot_retrieval", "metrics": {...}, "language"}, recalls as
fractions under its names; `pretrained` is the backbone's tag or weights file, or the run's folder), by default
in data/runs/eval/<dataset>-<split>/. --csv FILE also writes them into one CSV: the one that
`clip_benchmark build FOLDER/*.json` makes of the same files (same rows and values). clip_benchmark's own
command line needs its evaluation dependencies (pycocoevalcap among them), which this project's environment
does not install."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score backbones, baselines and trained runs on a split",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_flags(parser, "dataset folder the features were extracted from (default: the embedded data)",
                      dataset_help="dataset of the feature stores")
    add_backbones_flag(parser, "backbones to score alone and averaged, comma-separated, the first is the main "
                               "one (default: the first two embedded backbones)")
    parser.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    parser.add_argument("--run", action="append", default=[], metavar="RUN",
                        help="a trained run to score: its folder, or its folder name or name prefix under "
                             "data/runs/ (repeatable)")
    parser.add_argument("--concat", action="store_true",
                        help="add the concatenation + linear baseline (trains it once if not cached)")
    parser.add_argument("--no-baselines", action="store_true", help="score only the --run models")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the result files, one per row (default: data/runs/eval/<dataset>-<split>/)")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE",
                        help="also write the rows as one CSV, as `clip_benchmark build` makes of the result files")
    add_jobs_flag(parser, "torch CPU threads for reading and normalising features (default: torch's choice); "
                          "embedding and ranking always run on one thread, so a run gets the same numbers "
                          "here as in `hada train`")
    add_device_flag(parser)
    parser.set_defaults(handler=_evaluate)


def resolve_run(spec: str) -> Path:
    from hada.errors import HadaError
    from hada.paths import runs_dir

    path = Path(spec).expanduser()
    if (path / "config.json").exists():
        return path
    if (runs_dir() / spec / "config.json").exists():
        return runs_dir() / spec
    matches = sorted(p for p in runs_dir().glob(f"{spec}-*") if (p / "config.json").exists())
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise HadaError(f"no run {spec!r}: neither a run folder nor a run name under {runs_dir()}")
    raise HadaError(f"{spec!r} matches {len(matches)} runs ({', '.join(p.name for p in matches)}); "
                    "give the full folder name")


def _baseline_rows(args: argparse.Namespace) -> list[tuple[str, dict, tuple[str, str]]]:
    """``(name, metrics, (model, pretrained))`` of each backbone, their average and (--concat) the concat run."""
    from hada.config import DEFAULT_RECIPE, TrainConfig, recipe
    from hada.evaluate import backbone_identity, fusion_identity, run_identity
    from hada.experiments import baseline_table, concat_run
    from hada.book.tables import METRIC_COLUMNS
    from hada.runs import run_folder

    cfg = TrainConfig.from_dict({"data": {"dataset": args.dataset, "data_root": args.data_root,
                                          "backbones": args.backbones or []}, "device": args.device}).resolved()
    train_cfg = recipe(DEFAULT_RECIPE, device=args.device)
    names = cfg.data.backbones
    rows = []
    for row in baseline_table(args.dataset, names, split=args.split, data_root=args.data_root,
                              concat=args.concat, config=train_cfg):
        if row["kind"] == "backbone":
            identity = backbone_identity(row["name"])
        elif row["kind"] == "concat":
            concat_cfg, _ = concat_run(args.dataset, names, args.data_root, train_cfg)
            identity = run_identity(run_folder(concat_cfg), concat_cfg)
        else:
            identity = fusion_identity(row["name"], names)
        rows.append((row["name"], {key: row[key] for key, _ in METRIC_COLUMNS}, identity))
    return rows


def _run_rows(args: argparse.Namespace, device) -> list[tuple[str, dict, tuple[str, str]]]:
    """``(name, metrics, (model, pretrained))`` of each --run, scored on the split."""
    from hada.errors import HadaError
    from hada.evaluate import run_identity
    from hada.metrics import retrieval_metrics
    from hada.train import load_trained

    rows = []
    for spec in args.run:
        run_dir = resolve_run(spec)
        model = load_trained(run_dir, device=device)
        if model.config.data.dataset != args.dataset:
            raise HadaError(f"run {run_dir.name} was trained on {model.config.data.dataset}, not {args.dataset}")
        data = model.load_data(args.split)
        rows.append((run_dir.name, retrieval_metrics(model.similarity(data), data.caption_image_index),
                     run_identity(run_dir, model.config)))
    return rows


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from hada.book.tables import metrics_table
    from hada.devices import resolve_device
    from hada.errors import HadaError
    from hada.evaluate import clip_benchmark_record, write_benchmark_csv, write_records
    from hada.paths import runs_dir

    device = resolve_device(args.device)
    if args.jobs:
        torch.set_num_threads(args.jobs)
    rows = ([] if args.no_baselines else _baseline_rows(args)) + _run_rows(args, device)
    if not rows:
        raise HadaError("nothing to score: give --run or drop --no-baselines")
    print(metrics_table([(name, m) for name, m, _ in rows]))
    out = args.out or runs_dir() / "eval" / f"{args.dataset}-{args.split}"
    records = [clip_benchmark_record(m, args.dataset, model, pretrained, args.split)
               for _, m, (model, pretrained) in rows]
    paths = write_records(records, out)
    print(f"wrote {len(paths)} CLIP_benchmark result file(s) to {out}/")
    if args.csv:
        print(f"wrote their CSV (as clip_benchmark build makes it) to {write_benchmark_csv(sorted(paths), args.csv)}")
    return 0
