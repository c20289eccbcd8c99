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
processes, sharing the cores (each training run is single-threaded; by default one per core, fewer where the
free memory holds fewer). Each step is the pipeline's own cached call, so the build then finds everything
done, with the numbers it would have computed, and a rerun skips what is finished (an interrupted run
resumes from its last epoch). The options are the chapters' parameters: give the same values as to
papermill (-p ...) to prepare a rerun with other parameters."""


def register(subparsers) -> None:
    from hada.pipeline import WORKER_MEMORY, default_jobs

    defaults = {k: v.default for k, v in inspect.signature(_resolve()).parameters.items()}
    p = subparsers.add_parser("prepare", help="make the book's backbones, features and runs ahead, in parallel",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_flags(p, "the chapters' `data_root`: the dataset folder (default: the embedded data under data/)",
                      dataset_help="the chapters' `dataset`")
    add_backbones_flag(p, "the chapters' `backbones`: comma-separated specs, the first is the main one "
                          "(default: the embedded ones)")
    p.add_argument("--epochs", type=int, help=f"the chapters' `epochs` (default: {defaults['epochs']})")
    p.add_argument("--pairs-per-epoch", type=int,
                   help=f"the chapters' `pairs_per_epoch`; 0 = the whole train split (default: "
                        f"{defaults['pairs_per_epoch']})")
    p.add_argument("--seed", type=int, help=f"the chapters' `seed` (default: {defaults['seed']})")
    p.add_argument("--params", metavar="FILE",
                   help="a papermill parameters file (YAML, e.g. book/params/flickr30k.yaml): the chapters' "
                        "parameters for a rerun with `papermill -f FILE`; options typed here override it")
    add_jobs_flag(p, "steps at once, one process each, sharing the cores (default: one per CPU core, at most as "
                     f"many as the available memory holds at {WORKER_MEMORY / 10**9:.0f} GB each: "
                     f"{default_jobs()} here)")
    p.add_argument("--no-runs", action="store_true",
                   help="only the data, backbones and features (what `make data` makes), no training runs")
    add_device_flag(p)  # the chapters' `device`
    # None = not typed: the value then comes from --params, else the chapters' default
    p.set_defaults(handler=_prepare, dataset=None, device=None)


def _resolve():
    from hada.experiments import resolve

    return resolve


def _params_file(path: str | None) -> dict:
    """The chapters' parameters from a papermill parameters file; an unknown name is one clear error."""
    if not path:
        return {}
    from hada.config import load_config_file
    from hada.errors import HadaError

    values = load_config_file(path)
    known = set(inspect.signature(_resolve()).parameters)
    unknown = sorted(set(values) - known)
    if unknown:
        raise HadaError(f"{path}: unknown chapter parameters {', '.join(unknown)}; the chapters take "
                        f"{', '.join(sorted(known))}")
    if isinstance(values.get("backbones"), list):
        values["backbones"] = ",".join(values["backbones"])
    return values


def _prepare(args: argparse.Namespace) -> int:
    from hada.pipeline import prepare

    typed = {"dataset": args.dataset, "data_root": args.data_root, "backbones": args.backbones,
             "epochs": args.epochs, "pairs_per_epoch": args.pairs_per_epoch, "seed": args.seed, "device": args.device}
    values = {**_params_file(args.params), **{k: v for k, v in typed.items() if v is not None}}
    setting = _resolve()(**values)
    log = prepare(setting, jobs=args.jobs, runs=not args.no_runs)
    print(f"prepared in {log.wall:.0f} s wall ({sum(log.seconds.values()):.0f} s of steps)")
    return 0
