"""``hada backbones pretrain|list|zeroshot``: the embedded open_clip backbones (pretrain, inspect, score)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hada.cli.flags import add_backbones_flag, add_data_root_flag, add_dataset_flags, add_device_flag, add_jobs_flag

PRETRAIN_HELP = """\
Pretrain the small embedded open_clip backbones contrastively (open_clip's ClipLoss) on the `pretrain`
split of the synthetic dataset ONLY (coarse alt-text-like captions); train/val/test are never seen.
Each is then frozen and written atomically as an open_clip local-dir folder under
data/backbones/<name>/ ($HADA_DATA/backbones): open_clip_config.json, open_clip_model.safetensors and
hada_backbone.json (recipe, seed, dataset hash, loss curve, time). A backbone whose folder already has the
same model config + recipe + seed + dataset json sha256 is skipped (--force retrains). Deterministic for a
seed on one machine. Model configs: hada/backbones/model_configs/*.json; recipes: hada/backbones/embedded.json."""

LIST_HELP = """\
List the embedded backbones: open_clip model, input, whether weights exist under data/backbones/ and
their pretraining time and final loss."""

ZEROSHOT_HELP = """\
Zero-shot retrieval of backbones' own embeddings on a split: R@1/5/10 both ways and Rsum (image->text
counts a hit if any of the image's captions is in the top k), and on the synthetic data the share of
near-duplicate pairs (one edit apart: colour, shape, size, ...) each backbone tells apart (chance 50%).
Backbones are specs: embedded names, NAME@EPOCH (a pretraining snapshot), MODEL:TAG (local cache only),
MODEL:/path/to/weights, local-dir:/path."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("backbones", help="pretrain, list or score the embedded open_clip backbones",
                                   description="Frozen open_clip backbones: the embedded tiny ones and any other.")
    sub = parser.add_subparsers(dest="backbones_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])

    p = sub.add_parser("pretrain", help="pretrain the embedded backbones on the synthetic pretrain split",
                       description=PRETRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbones_flag(p, "embedded backbones to pretrain, comma-separated (default: all of them)")
    add_data_root_flag(p, "synthetic dataset folder (default: data/synthetic, or $HADA_DATA/synthetic)")
    p.add_argument("--size", choices=("default", "tiny"), default="default",
                   help="tiny: a few steps of small batches, for tests on the tiny dataset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--force", action="store_true", help="retrain even if an up-to-date copy exists")
    add_jobs_flag(p, "backbones trained at once, one process each, single-threaded; the weights do not "
                     "depend on it (default: %(default)s)", default=2)
    p.add_argument("--eval", action="store_true",
                   help="after pretraining, print zero-shot test recalls (needs the test split)")
    add_device_flag(p)
    p.set_defaults(handler=_pretrain)

    ls = sub.add_parser("list", help="list the embedded backbones and their state", description=LIST_HELP)
    ls.set_defaults(handler=_list)

    z = sub.add_parser("zeroshot", help="zero-shot recalls and per-attribute accuracy of backbones",
                       description=ZEROSHOT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbones_flag(z, "backbone specs, comma-separated (default: every embedded backbone)")
    add_dataset_flags(z)
    z.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    z.add_argument("--json", type=Path, default=None, help="also write the results to this json file")
    z.set_defaults(handler=_zeroshot)


TINY = {"max_steps": 3, "batch_size": 16}


def _pretrain(args: argparse.Namespace) -> int:
    from hada.backbones.pretrain import pretrain
    from hada.backbones.spec import EMBEDDED_BACKBONES
    from hada.errors import HadaError

    names = args.backbones or list(EMBEDDED_BACKBONES)
    for n in names:
        if n not in EMBEDDED_BACKBONES:
            raise HadaError(f"unknown embedded backbone '{n}' (known: {', '.join(EMBEDDED_BACKBONES)})")
    extra = dict(TINY) if args.size == "tiny" else {}
    pretrain(names, args.data_root, epochs=args.epochs, **extra, force=args.force, workers=args.jobs,
             device=args.device)
    if args.eval:
        _print_zeroshot(names, "synthetic", args.data_root, "test")
    return 0


def _list(args: argparse.Namespace) -> int:
    from hada.backbones.pretrain import existing_record
    from hada.backbones.spec import load_recipes
    from hada.paths import backbones_dir

    print(f"embedded backbones (weights under {backbones_dir()}):")
    for name, recipe in load_recipes().items():
        rec = existing_record(name)
        state = "not pretrained" if rec is None else (
            f"pretrained: {rec['train_seconds']:.0f}s, {rec['steps']} steps, final loss {rec['final_loss']:.3f}")
        gray = ", grayscale input" if recipe.get("grayscale") else ""
        print(f"  {name:<14} open_clip model {recipe['model']}{gray}; {state}")
    return 0


def _zeroshot(args: argparse.Namespace) -> int:
    from hada.backbones.spec import EMBEDDED_BACKBONES
    from hada.io import write_json

    results = _print_zeroshot(args.backbones or list(EMBEDDED_BACKBONES), args.dataset, args.data_root,
                              args.split)
    if args.json:
        write_json(args.json, results, indent=1)
    return 0


def _print_zeroshot(specs, dataset_name, root, split) -> dict:
    from hada.backbones import load_backbone
    from hada.backbones.zeroshot import zero_shot
    from hada.book.tables import zeroshot_table
    from hada.data.datasets import load_dataset

    dataset = load_dataset(dataset_name, root)
    results = {s: zero_shot(load_backbone(s), dataset, split) for s in specs}
    print(zeroshot_table(results, f"zero-shot {dataset_name} {split}"))
    return results
