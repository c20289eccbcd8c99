"""``hada train``: train HADA (or the no-graph concatenation baseline) on stored token features."""

from __future__ import annotations

import argparse

from hada.cli.flags import add_device_flag, add_jobs_flag

HELP = """\
Train a HADA model on the token features stored by `hada features extract` (the backbones stay frozen).

The loss is the paper's: image-text contrastive learning over the batch and a queue filled by momentum
encoders, multi-positive targets (captions of the same image), a learned temperature tau and a learned
weight w that mixes the main backbone's own similarity in (the first of --backbones is the main one),
plus image-text matching on hard negatives. AdamW, cosine annealing with warm restarts (per epoch or per
iteration), early
stopping on the validation Rsum; the best epoch is evaluated on the test split.

Output: data/runs/<name>-<key>/ (or $HADA_DATA/runs/...), both from the configuration alone: <name> is
<arch>-k<number of backbones>, <key> hashes every option below, the feature stores' contents and, on a CPU,
the thread count (--jobs), so any change trains a new run and the book's run of the same settings is found. The folder holds config.json, stats.json
(train feature statistics), history.json (per-epoch loss, val metrics, tau, w, lr, time), checkpoint.pt
(written atomically every epoch: model, optimiser, scheduler, queue, random states), best.pt and, when
finished, metrics.json. The key also hashes the code that computes the result (not its comments). A finished
run is not retrained; an interrupted one continues when the same command runs again and ends with exactly
the numbers an uninterrupted run gives. The same seed gives the same numbers."""



def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--recipe, --config and one option per setting of hada.config.TrainConfig, with the field's own help.

    The value of an option not given on the command line comes from the config file, else the recipe: its default
    is ``SUPPRESS`` so that only what the user typed overrides them."""
    from hada.config import DEFAULT_RECIPE, RECIPES, leaf_fields, recipe

    shown = recipe(DEFAULT_RECIPE).to_dict()
    parser.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                        help=f"named configuration to start from (default: {DEFAULT_RECIPE}, or the config file's "
                             "'recipe' key)")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of settings (sections data/model/loss/optim, or dotted keys, or a "
                             "setting's own name; an optional 'recipe' key); options typed here override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON (the run's identity) and exit")
    group = parser.add_argument_group("run configuration (each hashed into the run folder's name; defaults: "
                                      f"the {DEFAULT_RECIPE} recipe)")
    add_device_flag(group)  # TrainConfig.device, spelled as every command spells it
    for action in parser._actions:  # like every setting: only a typed --device overrides the file and the recipe
        if action.dest == "device":
            action.default = argparse.SUPPRESS
    for path, f in leaf_fields():
        if path == "device":
            continue
        default = _lookup(shown, path)
        name = path.rsplit(".", 1)[-1]
        flag = "--" + name.replace("_", "-")
        text = f.metadata.get("help", name)
        if isinstance(default, bool):
            group.add_argument(flag, dest=path, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{text} (default: {'on' if default else 'off'})")
            continue
        kind = _kind(f.type)
        choices = f.metadata.get("choices")
        if name == "dataset":
            from hada.data.datasets import DATASETS

            choices = tuple(DATASETS)
        shown_default = ",".join(default) if isinstance(default, list) else ("none" if default is None else default)
        group.add_argument(flag, dest=path, type=kind, default=argparse.SUPPRESS, choices=choices,
                           metavar=None if choices else f.metadata.get("metavar", kind.__name__.upper()),
                           help=f"{text} (default: {shown_default})")


def _lookup(tree: dict, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def _kind(annotation: str):
    """The parser of a field's type: 'none' reads as None where the field allows it."""
    text = str(annotation)
    base = {"int": int, "float": float, "str": str, "list[str]": str, "list[int]": str}[text.replace("| None", "").strip()]
    if "None" not in text:
        return base

    def parse(value: str):
        return None if value.lower() in ("none", "") else base(value)

    parse.__name__ = base.__name__
    return parse


def config_from_args(args: argparse.Namespace):
    """recipe <- config file <- options typed on the command line."""
    from hada.config import DEFAULT_RECIPE, leaf_fields, load_config_file, recipe

    from_file = load_config_file(args.config) if args.config else {}
    name = args.recipe or from_file.pop("recipe", None) or DEFAULT_RECIPE
    typed = {path: getattr(args, path) for path, _ in leaf_fields() if hasattr(args, path)}
    return recipe(name, from_file).override(**typed)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train HADA on stored features (cached, resumable)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restart", action="store_true",
                        help="delete an unfinished or finished run of this configuration and train it anew")
    add_jobs_flag(parser, "torch CPU threads for training (default: $HADA_THREADS, else 1: a second thread made "
                          "steps 2-10x slower on a busy 2-core machine; try 2 on an idle one)")
    add_config_options(parser)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    import json
    import sys

    from hada import distributed
    from hada.book.tables import metrics_table
    from hada.runs import run_experiment, run_folder
    from hada.devices import resolve_device
    from hada.train import join_process_group

    asked = config_from_args(args)
    config = asked.resolved()
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    device = resolve_device(asked.device)  # the exact device (cuda:1); the resolved config keeps its type
    if args.recipe == "lavis" and config.optim.init_from is None:
        print("hada: the lavis recipe is HADA-LAVIS's second stage: train --recipe lavis-stage1 first and pass its "
              "run folder as --init-from (without it, this run starts from a fresh init)", file=sys.stderr)
    join_process_group(config, device)  # under torchrun: before the run's key, which counts the ranks
    folder = run_folder(config, threads=args.jobs)  # named by hada.runs from the configuration alone
    trained = (folder / "metrics.json").exists() and not args.restart
    try:
        run = run_experiment(asked, threads=args.jobs, restart=args.restart)
    except KeyboardInterrupt:
        print(f"hada: interrupted; the last finished epoch is saved in {folder}; rerun the "
              "same command to continue", file=sys.stderr)
        return 130
    if not distributed.is_main():
        return 0
    if trained:
        print(f"{run.run_dir} is already trained (same configuration, features and code); --restart trains it anew")
    metrics = run.metrics
    print(f"run: {run.run_dir}")
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; tau {metrics['tau']:.4f}, "
          f"w {metrics['mix_weight']:.3f}")
    print(metrics_table([(f"{run.name} (val)", metrics["val"]), (f"{run.name} (test)", metrics["test"])]))
    return 0
