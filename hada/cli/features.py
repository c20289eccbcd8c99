"""``hada features extract|verify``: the memory-mapped token feature store."""

from __future__ import annotations

import argparse

from hada.cli.flags import add_backbones_flag, add_dataset_flags, add_device_flag, add_jobs_flag, at_least_one
from hada.config import AUGMENT_POLICIES

EXTRACT_HELP = """\
Store every backbone's token features for a dataset split: image tokens (CLS/pooled first), text tokens
(pooled EOT token first, padded to the split's longest caption), lengths and the backbone's own projected
embeddings, as one contiguous fp16 array per (backbone, split, modality), read back memory-mapped. Output:
data/features/<dataset>/<backbone>/<split>/ ($HADA_DATA/features) with manifest.json (model, weights sha256,
open_clip version, preprocessing, dataset json sha256, shapes, per-array sha256).

Extraction is resumable: interrupt it and run the same command again to continue (the result is
byte-identical to an uninterrupted run; a store keeps the batch sizes it was started with, whatever
--image-batch / --text-batch a resuming call gives). The backbone runs on --device (under autocast on
CUDA; stored tokens are fp16 everywhere), fed by --jobs image decoding processes. Every image of a split
is decoded first: files that cannot be decoded are named in one error line before anything is written.

Several GPUs (or CPU processes): torchrun --standalone --nproc_per_node N -m hada features extract ...
shares the images and captions among N processes writing the same store; the result is byte-identical
to one process (with the same batch sizes) and still resumable. An existing store built for a different request (other weights,
dataset, preprocessing, ...) is an error that names the difference; --force rebuilds it. A complete store
that matches is reused.

Backbones are specs: an embedded name (tiny-vit, ...), MODEL:TAG (open_clip tag, local cache only),
MODEL:/path/to/weights, local-dir:/path, or NAME@EPOCH (an embedded backbone's pretraining snapshot,
e.g. tiny-vit@1). Nothing is downloaded."""

VERIFY_HELP = """\
Check stores against their manifests: every array's size and sha256 (a full read). Prints one line per
store; exits 2 at the first damaged or unfinished one."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("features", help="extract and check the token feature store",
                                   description="The token feature store (fp16, memory-mapped).")
    sub = parser.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])

    ex = sub.add_parser("extract", help="extract token features of backbones for dataset splits",
                        description=EXTRACT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ex)
    ex.add_argument("--all", action="store_true",
                    help="every embedded backbone and the dataset's train, val and test splits (pretrain is only "
                         "for pretraining backbones; overrides --backbones/--split)")
    ex.add_argument("--force", action="store_true", help="rebuild stores even if they exist")
    ex.add_argument("--image-batch", type=at_least_one, default=None,
                    help="images per forward pass of a new store (default: 128 on the CPU, 256 on CUDA)")
    ex.add_argument("--text-batch", type=at_least_one, default=None,
                    help="captions per forward pass of a new store (default: 512)")
    ex.add_argument("--augment", type=int, default=0, metavar="N",
                    help="also store N augmented views (made with --augment-policy) of every train image beside the "
                         "plain view (the published recipe trains 75%% of its samples on one: --augment-p); default 0")
    ex.add_argument("--augment-policy", choices=AUGMENT_POLICIES, default="randaugment",
                    help="how the augmented views are made: randaugment (torchvision's default RandAugment), "
                         "albef (the published: random resized crop, flip, 2 of ALBEF's operations at magnitude "
                         "7), blip (the same at magnitude 5: BLIP's training transform) or lavis (blip for the "
                         "first of --backbones, albef for the others: HADA-LAVIS's); default randaugment")
    add_device_flag(ex)
    add_jobs_flag(ex, "image decoding worker processes, 0 = in this process (default: 0 on the CPU, up to 8 "
                      "per process on CUDA)", minimum=0)
    ex.set_defaults(handler=_extract)

    ve = sub.add_parser("verify", help="check stores against their manifests (full sha256)",
                        description=VERIFY_HELP)
    _common(ve)
    ve.add_argument("--all", action="store_true", help="every embedded backbone and every split")
    ve.set_defaults(handler=_verify)


def _common(p: argparse.ArgumentParser) -> None:
    add_dataset_flags(p)
    add_backbones_flag(p, "backbone specs, comma-separated (default: every embedded backbone)")
    p.add_argument("--split", action="append", default=None,
                   help="split; repeat for several (default: train, val and test)")


def _targets(args, dataset) -> tuple[list[str], list[str]]:
    from hada.backbones import EMBEDDED_BACKBONES

    if args.all:
        splits = [s for s in dataset.splits_allowed if s != "pretrain" and dataset.split(s)]
        return list(EMBEDDED_BACKBONES), splits
    return (args.backbones or list(EMBEDDED_BACKBONES)), (args.split or ["train", "val", "test"])


def _extract(args: argparse.Namespace) -> int:
    from hada import distributed
    from hada.data.datasets import load_dataset
    from hada.devices import resolve_device
    from hada.features.store import ensure_features

    from hada.errors import HadaError

    if args.augment < 0:
        raise HadaError(f"--augment must be >= 0, got {args.augment}")
    dataset = load_dataset(args.dataset, args.data_root)
    backbones, splits = _targets(args, dataset)
    device = resolve_device(args.device)
    with distributed.session(device):
        stores = ensure_features(dataset, backbones, splits, force=args.force, device=str(device), jobs=args.jobs,
                                 image_batch=args.image_batch, text_batch=args.text_batch, augment=args.augment,
                                 augment_policy=args.augment_policy)
        if not distributed.is_main():
            return 0
    for spec, by_split in stores.items():
        for split, fs in by_split.items():
            size = sum(fs.nbytes().values()) / 2**20
            print(f"{spec} {split}: {fs.n_images} images x {fs.image_tokens.shape[1]} tokens, "
                  f"{fs.n_captions} captions x {fs.text_tokens.shape[1]} tokens, {size:.1f} MiB -> {fs.path}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from hada.features import store as features
    from hada.data.datasets import load_dataset

    dataset = load_dataset(args.dataset, args.data_root, check_images=False)
    backbones, splits = _targets(args, dataset)
    for spec in backbones:
        for split in splits:
            fs = features.open_features(dataset.name, spec, split, verify="full")
            print(f"ok {fs.path}")
    return 0
