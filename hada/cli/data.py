"""``hada data synth`` and ``hada data check``: make the embedded dataset, validate any dataset folder."""

from __future__ import annotations

import argparse

from hada.cli.flags import add_backbones_flag, add_data_root_flag, add_dataset_flags, add_jobs_flag

SYNTH_HELP = """\
Write the embedded synthetic image-caption dataset in Flickr30k's Karpathy layout:
<data-root>/dataset_flickr30k.json and <data-root>/flickr30k-images/*.png, with splits pretrain (coarse,
alt-text-like captions, for pretraining the embedded backbones), train, val and test (detailed
captions; near-duplicate groups that differ in one attribute). The same seed gives byte-identical
files. If <data-root> already holds the same dataset (same size, seed, image size, generator version)
nothing is done; a different one is only replaced with --force. Files are written to a temporary
folder beside <data-root> and renamed at the end."""

CHECK_HELP = """\
Validate a dataset folder (Karpathy json + images) and print its images and captions per split.
Flickr30k: <data-root>/dataset_flickr30k.json + <data-root>/flickr30k-images/; COCO:
<data-root>/dataset_coco.json + <data-root>/train2014/ and <data-root>/val2014/ (restval counts as
train); synthetic: the folder written by `hada data synth`. Any problem (missing files, malformed json,
duplicate ids, ...) is one line and exit code 2. --decode also opens every image and names the ones that
cannot be decoded (truncated, not an image), as `hada features extract` would before extracting. Empty
captions are counted, and with --backbones A,B the captions longer than each backbone's context length
(they are cut when extracted); both are reported, not errors."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="make the synthetic dataset or check a dataset folder",
                                   description="Datasets: make the embedded synthetic one, or check one on disk.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: _usage(parser))

    synth = sub.add_parser("synth", help="write the embedded synthetic dataset (Flickr30k layout)",
                           description=SYNTH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_flag(synth, "output folder (default: data/synthetic, or $HADA_DATA/synthetic)")
    synth.add_argument("--size", choices=("default", "tiny"), default="default",
                       help="default: 6000 pretrain / 3000 train / 500 val / 1000 test images; "
                            "tiny: 40/40/20/20 for tests (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels, 64..96 (default: %(default)s)")
    add_jobs_flag(synth, "image rendering processes; the output does not depend on it (default: up to 2)")
    synth.add_argument("--force", action="store_true", help="regenerate even if the folder holds a dataset")
    synth.set_defaults(handler=_synth)

    check = sub.add_parser("check", help="validate a dataset folder and count its splits",
                           description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_flags(check)
    files = check.add_mutually_exclusive_group()
    files.add_argument("--no-images", action="store_true", help="skip checking that every image file exists")
    files.add_argument("--decode", action="store_true",
                       help="decode every image (with a progress bar) and name the ones that cannot be decoded")
    add_jobs_flag(check, "image decoding threads for --decode (default: 4)", default=4)
    add_backbones_flag(check, "count captions longer than each backbone's context length (reads tokenizers only)")
    check.set_defaults(handler=_check)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    from hada.data.synthetic import generate

    result = generate(args.data_root, size=args.size, seed=args.seed, image_size=args.image_size,
                      force=args.force, workers=args.jobs)
    counts = ", ".join(f"{s} {n:,}" for s, n in result.counts.items())
    if result.created:
        print(f"wrote {sum(result.counts.values()):,} images ({counts}) to {result.root} "
              f"in {result.seconds:.1f} s")
    else:
        print(f"{result.root} already holds this synthetic dataset (size={args.size}, seed={args.seed}); "
              "nothing to do (--force regenerates it)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from hada.book.tables import split_count_table
    from hada.data.datasets import EXPECTED_IMAGES, load_dataset

    dataset = load_dataset(args.dataset, args.data_root, check_images=not args.no_images)
    if args.decode:
        from hada.data.images import undecodable, undecodable_error

        bad = undecodable([r.path for r in dataset.images], jobs=args.jobs, desc=f"{dataset.name} decode")
        if bad:
            raise undecodable_error(bad, len(dataset.images), f"{dataset.name} at {dataset.root}")
    print(split_count_table(dataset.counts(), EXPECTED_IMAGES.get(dataset.name)))
    images = "not checked" if args.no_images else "all decoded" if args.decode else "all present"
    print(f"{dataset.name} at {dataset.root}: json sha256 {dataset.json_sha256[:12]}, image files {images}")
    print(f"empty captions: {_per_split(dataset.empty_captions())}")
    for spec in args.backbones or []:
        print(_long_captions(dataset, spec))
    return 0


def _per_split(counts: dict[str, int]) -> str:
    """``none`` or ``5 (train 3, test 2)``."""
    total = sum(counts.values())
    parts = ", ".join(f"{s} {n:,}" for s, n in counts.items() if n)
    return f"{total:,} ({parts})" if total else "none"


def _long_captions(dataset, spec: str) -> str:
    from hada.backbones.backbone import caption_token_counts

    captions = {s: [c for r in dataset.split(s) for c in r.captions] for s in dataset.splits_allowed}
    needed, context = caption_token_counts(spec, [c for texts in captions.values() for c in texts])
    counts, at = {}, 0
    for split, texts in captions.items():
        counts[split] = sum(n > context for n in needed[at:at + len(texts)])
        at += len(texts)
    found = _per_split(counts)
    cut = ", cut to the context when extracted" if found != "none" else ""
    return f"captions longer than {spec}'s context of {context} tokens: {found}{cut}"
