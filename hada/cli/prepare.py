"""``hada prepare``: make everything the book's chapters read before a build, several steps at once."""

from __future__ import annotations

import argparse
import inspect

from hada.cli.flags import add_backbones_flag, add_dataset_flags, add_device_flag, add_jobs_flag

HELP = """\
Make everything the book's chapters read, before `jupyter-book build book/`: the synthetic dataset (if it
is the dataset and missing), the embedded backbones, every backbone's token features for train/val/test,
and every training run of the results and ablation chapters (concat + linear and HADA for K=2 and K=3, and
each ablation). The chapters would make the same themselves, one step after another on one core; this runs
the steps as a dependency graph (features wait for their backbone, a run for its features) on --jobs
processes, sharing the cores (each training run is single-threaded). Each step is the pipeline's own cached call, so the build then finds everything
done, with the numbers it would have computed, and a rerun skips what is finished (an interrupted run
resumes from its last epoch). The options are the chapters' parameters: give the same values as to
papermill (-p ...) to prepare a rerun with other parameters."""


def register(subparsers) -> None:
    from hada.pipeline import default_jobs

    defaults = {k: v.default for k, v in inspect.signature(_resolve()).parameters.items()}
    p = subparsers.add_parser("prepare", help="make the book's backbones, features and runs ahead, in parallel",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_flags(p, "the chapters' `data_root`: the dataset folder (default: the embedded data under data/)",
                      dataset_help="the chapters' `dataset`")
    add_backbones_flag(p, "the chapters' `backbones`: comma-separated specs, the first is the main one "
                          "(default: the embedded ones)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"], help="the chapters' `epochs` (default: %(default)s)")
    p.add_argument("--pairs-per-epoch", type=int, default=defaults["pairs_per_epoch"],
                   help="the chapters' `pairs_per_epoch`; 0 = the whole train split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="the chapters' `seed` (default: %(default)s)")
    add_jobs_flag(p, "steps at once, one process each, sharing the cores (default: the CPU cores, %(default)s)",
                  default=default_jobs())
    p.add_argument("--no-runs", action="store_true",
                   help="only the data, backbones and features (what `make data` makes), no training runs")
    add_device_flag(p)  # the chapters' `device`
    p.set_defaults(handler=_prepare)


def _resolve():
    from hada.experiments import resolve

    return resolve


def _prepare(args: argparse.Namespace) -> int:
    from hada.pipeline import prepare

    setting = _resolve()(dataset=args.dataset, data_root=args.data_root, backbones=args.backbones or "default",
                         epochs=args.epochs, pairs_per_epoch=args.pairs_per_epoch, seed=args.seed, device=args.device)
    log = prepare(setting, jobs=args.jobs, runs=not args.no_runs)
    print(f"prepared in {log.wall:.0f} s wall ({sum(log.seconds.values()):.0f} s of steps)")
    return 0
