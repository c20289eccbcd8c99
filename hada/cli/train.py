"""``hada train``: train HADA (or the no-graph concatenation baseline) on stored token features."""

from __future__ import annotations

import argparse
import dataclasses

HELP = """\
Train a HADA model on the token features stored by `hada features extract` (the backbones stay frozen).

The loss is the paper's: image-text contrastive learning over the batch and a queue filled by momentum
encoders, multi-positive targets (captions of the same image), a learned temperature tau and a learned
weight w that mixes the main backbone's own similarity in (the first of --backbones is the main one),
plus image-text matching on hard negatives. AdamW, cosine annealing with warm restarts (per epoch), early
stopping on the validation Rsum; the best epoch is evaluated on the test split.

Output: data/runs/<name>-<key>/ (or $HADA_DATA/runs/...), where <key> hashes every option below and the
feature stores' manifests, so any change trains a new run. The folder holds config.json, stats.json
(train feature statistics), history.json (per-epoch loss, val metrics, tau, w, lr, time), checkpoint.pt
(written atomically every epoch: model, optimiser, scheduler, queue, random states), best.pt and, when
finished, metrics.json. The key also hashes the code that computes the result (not its comments). A finished
run is not retrained; an interrupted one continues when the same command runs again and ends with exactly
the numbers an uninterrupted run gives. The same seed gives the same numbers."""

# (field, help); defaults are read from TrainConfig so the help cannot drift from the code.
OPTIONS = (
    ("dataset", "dataset of the feature stores: synthetic, flickr30k or coco"),
    ("data_root", "dataset folder the features were extracted from (default: the embedded data)"),
    ("backbones", "comma-separated backbone specs, the first is the main one (default: the first two "
                  "embedded backbones)"),
    ("arch", "hada (graph fusion) or concat (baseline: linear map of the concatenated embeddings)"),
    ("width", "node width after each backbone's linear map (paper: 512)"),
    ("out_dim", "width of the final (L2-normalised) embedding (paper: 512)"),
    ("gnn", "graph convolution: gatv2, gcn or transformer"),
    ("heads", "attention heads"),
    ("head_dim", "channels per attention head ('none': --width, the paper's setting: heads x width concatenated)"),
    ("layers", "graph layers"),
    ("dropout", "dropout before the readout layer"),
    ("w_fc", "edge weight feature -> own CLS"),
    ("w_fcx", "edge weight feature -> other backbone's CLS"),
    ("w_cc", "edge weight CLS <-> CLS"),
    ("w_ffx", "edge weight feature <-> feature across backbones ('none': no such edges)"),
    ("w_self", "self-loop weight"),
    ("directed", "directed feature -> CLS edges (the published graph)"),
    ("backend", "auto, dense (CLS-only, fast) or pyg (torch-geometric on the full graph)"),
    ("precision", "fp32, bf16 (the encoders' matrix products under bfloat16 autocast; the loss stays fp32) or "
                  "auto: bf16 on CPUs with AMX or AVX512-BF16, else fp32"),
    ("epochs", "maximum epochs"),
    ("batch_size", "caption-image pairs per batch"),
    ("lr", "AdamW learning rate"),
    ("weight_decay", "AdamW weight decay"),
    ("fused_optimizer", "torch's fused AdamW kernel (the same update as the per-tensor loop, faster)"),
    ("t0", "epochs per cosine cycle (CosineAnnealingWarmRestarts T_0; paper: 30 to 50; 'none': one cycle "
           "over --epochs)"),
    ("eta_min", "lowest learning rate of the cosine schedule"),
    ("patience", "stop after this many epochs without a better validation Rsum"),
    ("seed", "random seed (model init, data order, dropout, hard negatives)"),
    ("itm", "add the image-text matching loss with hard negatives"),
    ("mix", "mix the main backbone's similarity in with a learned weight w (off: w = 0)"),
    ("queue_size", "negatives kept in the queue (0: in-batch only)"),
    ("momentum", "EMA momentum of the momentum encoders"),
    ("use_momentum", "fill the queue from momentum encoders (off: from the trained encoders)"),
    ("distill", "momentum distillation of the contrastive targets"),
    ("alpha", "distillation weight"),
    ("tau_init", "initial temperature (learned, clamped to [0.001, 0.5])"),
    ("w_init", "initial mix weight (learned, clamped to [0.1, 0.9])"),
    ("i2t_weight", "weight of the image->text contrastive loss"),
    ("t2i_weight", "weight of the text->image contrastive loss"),
    ("itm_weight", "weight of the matching loss"),
    ("train_split", "split to train on"),
    ("val_split", "split for early stopping"),
    ("test_split", "split for the final metrics"),
    ("pairs_per_epoch", "train on a fresh random subset of this many caption-image pairs each epoch (drawn "
                        "from the seeded, checkpointed data-order generator; 'none': every pair)"),
    ("eval_batch_size", "batch size when embedding a split for evaluation"),
)


CHOICES = {"dataset": ("synthetic", "flickr30k", "coco"), "arch": ("hada", "concat"),
           "gnn": ("gatv2", "gcn", "transformer"), "backend": ("auto", "dense", "pyg"),
           "precision": ("auto", "fp32", "bf16")}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    from hada.train import TrainConfig  # light: hada.train imports torch, but only numpy/torch at module level

    defaults = TrainConfig()
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group("run configuration (hashed into the run folder's name)")
    for name, text in OPTIONS:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        t = str(types[name])
        shown = ",".join(default) if isinstance(default, list) else default
        if t == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{text} (default: {'on' if default else 'off'})")
        elif name == "backbones":
            group.add_argument(flag, default="", metavar="A,B,...", help=f"{text}")
        else:
            kind = {"int": int, "float": float, "str": str}[t.split(" ")[0].replace("|", "").strip()]
            parse = _optional(kind) if "None" in t else kind
            suffix = "" if "default:" in text else f" (default: {'none' if shown is None else shown})"
            group.add_argument(flag, type=parse, default=default, choices=CHOICES.get(name),
                               metavar=kind.__name__.upper() if name not in CHOICES else None,
                               help=text + suffix)


def config_from_args(args: argparse.Namespace):
    from hada.train import TrainConfig

    values = {name: getattr(args, name) for name, _ in OPTIONS}
    values["data_root"] = None if values["data_root"] is None else str(values["data_root"])
    return TrainConfig(**values)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train HADA on stored features (cached, resumable)",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=None,
                        help="run name, the folder prefix under data/runs/ (default: the --arch value)")
    parser.add_argument("--restart", action="store_true",
                        help="delete an unfinished or finished run of this configuration and train it anew")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for training (default: $HADA_THREADS, else 1: a second thread "
                             "made steps 2-10x slower on a busy 2-core machine; try 2 on an idle one)")
    add_config_options(parser)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    import sys

    from hada.evaluate import format_table
    from hada.runs import run_experiment, run_folder

    config = config_from_args(args).resolved()
    name = args.name or config.arch
    trained = (run_folder(config, name) / "metrics.json").exists() and not args.restart
    try:
        run = run_experiment(config, name, threads=args.threads, restart=args.restart)
    except KeyboardInterrupt:
        print(f"hada: interrupted; the last finished epoch is saved in {run_folder(config, name)}; rerun the "
              "same command to continue", file=sys.stderr)
        return 130
    if trained:
        print(f"{run.run_dir} is already trained (same configuration, features and code); --restart trains it anew")
    metrics = run.metrics
    print(f"run: {run.run_dir}")
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; tau {metrics['tau']:.4f}, "
          f"w {metrics['mix_weight']:.3f}")
    print(format_table([(f"{name} (val)", metrics["val"]), (f"{name} (test)", metrics["test"])]))
    return 0
