"""The ``hada`` command line: one sub-command group per pipeline stage.

Each group lives in ``hada/cli/<group>.py`` and exposes ``register(subparsers)``; handlers
import torch lazily so that ``hada --help`` answers instantly. Any :class:`HadaError` (bad input a
user can fix) is printed as one line and exits with code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hada.errors import HadaError

GROUPS = ("data", "backbones", "features", "train", "evaluate", "search", "prepare")

DESCRIPTION = """\
HADA: fuse frozen image-text backbones with a graph attention network (Nguyen et al., ECIR 2023).

The pipeline, in order:
  hada data synth             write the embedded synthetic dataset (Flickr30k layout)
  hada data check             validate a Flickr30k / COCO / synthetic folder and count its splits
  hada backbones pretrain     pretrain the small embedded open_clip backbones
  hada features extract       store every backbone's token features (fp16, memory-mapped)
  hada train                  train a HADA model on stored features
  hada evaluate               score backbones, baselines and HADA on a split
  hada search                 a trained run's top images for a caption, or top captions for an image
  hada prepare                all of the above that the book reads, several steps at once
Run `hada <command> --help` for the options of each step."""


def build_parser() -> argparse.ArgumentParser:
    from hada.paths import data_dir

    parser = argparse.ArgumentParser(
        prog="hada", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Everything is made and cached under the data folder, here {data_dir()} ($HADA_DATA overrides it;\n"
               "a checkout uses its data/, an installed hada the working directory's data/ if it exists, else a\n"
               "per-user folder).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        try:
            module = importlib.import_module(f"hada.cli.{group}")
        except ModuleNotFoundError as exc:  # a stage not built yet must not break the others
            if exc.name != f"hada.cli.{group}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        result = args.handler(args)
    except HadaError as exc:
        print(f"hada: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hada: interrupted; finished work is kept and a rerun continues from it", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
