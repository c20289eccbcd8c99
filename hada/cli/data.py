"""``hada data synth`` and ``hada data check``: make the embedded dataset, validate any dataset folder."""

from __future__ import annotations

import argparse
from pathlib import Path

SYNTH_HELP = """\
Write the embedded synthetic image-caption dataset in Flickr30k's Karpathy layout:
<root>/dataset_flickr30k.json and <root>/flickr30k-images/*.png, with splits pretrain (coarse,
alt-text-like captions, for pretraining the embedded backbones), train, val and test (detailed
captions; near-duplicate groups that differ in one attribute). The same seed gives byte-identical
files. If <root> already holds the same dataset (same size, seed, image size, generator version)
nothing is done; a different one is only replaced with --force. Files are written to a temporary
folder beside <root> and renamed at the end."""

CHECK_HELP = """\
Validate a dataset folder (Karpathy json + images) and print its images and captions per split.
Flickr30k: <root>/dataset_flickr30k.json + <root>/flickr30k-images/; COCO: <root>/dataset_coco.json
+ <root>/train2014/ and <root>/val2014/ (restval counts as train); synthetic: the folder written by
`hada data synth`. Any problem (missing files, malformed json, duplicate ids, ...) is one line and
exit code 2."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="make the synthetic dataset or check a dataset folder",
                                   description="Datasets: make the embedded synthetic one, or check one on disk.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: _usage(parser))

    synth = sub.add_parser("synth", help="write the embedded synthetic dataset (Flickr30k layout)",
                           description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--root", type=Path, default=None,
                       help="output folder (default: data/synthetic, or $HADA_DATA/synthetic)")
    synth.add_argument("--size", choices=("default", "tiny"), default="default",
                       help="default: 6000 pretrain / 3000 train / 500 val / 1000 test images; "
                            "tiny: 40/40/20/20 for tests (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels, 64..96 (default: %(default)s)")
    synth.add_argument("--workers", type=int, default=None,
                       help="rendering processes; the output does not depend on it (default: up to 2)")
    synth.add_argument("--force", action="store_true", help="regenerate even if the folder holds a dataset")
    synth.set_defaults(handler=_synth)

    check = sub.add_parser("check", help="validate a dataset folder and count its splits",
                           description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_argument("--dataset", choices=("flickr30k", "coco", "synthetic"), default="synthetic",
                       help="dataset layout (default: %(default)s)")
    check.add_argument("--root", type=Path, default=None,
                       help="dataset folder (default: data/synthetic, data/flickr30k or data/coco)")
    check.add_argument("--no-images", action="store_true", help="skip checking that every image file exists")
    check.set_defaults(handler=_check)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    from hada.data.synthetic import generate

    result = generate(args.root, size=args.size, seed=args.seed, image_size=args.image_size, force=args.force,
                      workers=args.workers)
    counts = ", ".join(f"{s} {n:,}" for s, n in result.counts.items())
    if result.created:
        print(f"wrote {sum(result.counts.values()):,} images ({counts}) to {result.root} "
              f"in {result.seconds:.1f} s")
    else:
        print(f"{result.root} already holds this synthetic dataset (size={args.size}, seed={args.seed}); "
              "nothing to do (--force regenerates it)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from hada.data.datasets import EXPECTED_IMAGES, load_dataset

    dataset = load_dataset(args.dataset, args.root, check_images=not args.no_images)
    print(format_counts(dataset.counts(), EXPECTED_IMAGES.get(dataset.name)))
    images = "not checked" if args.no_images else "all present"
    print(f"{dataset.name} at {dataset.root}: json sha256 {dataset.json_sha256[:12]}, image files {images}")
    return 0


def format_counts(counts: dict[str, dict[str, int]], expected: dict[str, int] | None = None) -> str:
    """A small fixed-width table of images and captions per split, with the Karpathy sizes if known."""
    header = ["split", "images", "captions"] + (["expected images"] if expected else [])
    rows = []
    for split, c in counts.items():
        row = [split, f"{c['images']:,}", f"{c['captions']:,}"]
        if expected:
            want = expected.get(split)
            row.append("" if want is None else f"{want:,}" + ("" if want == c["images"] else "  (differs)"))
        rows.append(row)
    total = ["total", f"{sum(c['images'] for c in counts.values()):,}",
             f"{sum(c['captions'] for c in counts.values()):,}"] + ([""] if expected else [])
    rows.append(total)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    return "\n".join(line.rstrip() for line in lines)
