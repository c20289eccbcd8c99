"""``hada search``: a caption against a trained run's images, or an image against its captions."""

from __future__ import annotations

import argparse

from hada.cli.flags import add_device_flag, at_least_one

HELP = """\
Search a trained run's split: text -> image with a caption (`hada search --run RUN "a red star at the top"`),
image -> text with --image PATH. The query is encoded as a stored sample is: each of the run's backbones
(from the specs in its configuration) makes its tokens and embedding, normalised with the run's train
statistics, then the run's encoder. The gallery is the split's stored features (`hada features extract`),
embedded as evaluation embeds them, and every item is scored with the run's inference similarity,
(1 - w) * its cosine + w * the main backbone's cosine. Prints the top --k with scores and image paths or
captions; where the query is itself a caption or an image of the split, a column says which results are its own."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("search", help="search a trained run's images by caption, or captions by image",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", default=None, help="the caption to search images for")
    parser.add_argument("--image", default=None, metavar="PATH", help="search captions for this image instead")
    parser.add_argument("--run", required=True, metavar="RUN",
                        help="a trained run: its folder, or its folder name or name prefix under data/runs/")
    parser.add_argument("--split", default="test", help="split searched (default: %(default)s)")
    parser.add_argument("--k", type=at_least_one, default=5, metavar="N", help="results shown (default: 5)")
    add_device_flag(parser)
    parser.set_defaults(handler=_search)


#: Characters of a query echoed in the table's caption: a 100 KB query is searched whole but not printed whole.
ECHO_CHARS = 120


def echo(query: str) -> str:
    """The query as the caption shows it: one line, at most ``ECHO_CHARS`` characters, with its length if cut."""
    text = " ".join(query.split())
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS - 1]}… ({len(text):,} characters)"


def _search(args: argparse.Namespace) -> int:
    from hada.cli.evaluate import resolve_run
    from hada.devices import resolve_device
    from hada.errors import HadaError
    from hada.book.views import hits_table
    from hada.search import RunSearch, read_image

    if (args.query is None) == (args.image is None):
        raise HadaError("give either a caption to search images for, or --image PATH to search captions")
    if args.query is not None and not args.query.strip():
        raise HadaError("empty query: give a caption to search for, or --image PATH")
    image = read_image(args.image) if args.image is not None else None  # a bad file fails before any loading
    run_dir = resolve_run(args.run)
    search = RunSearch.open(run_dir, args.split, device=resolve_device(args.device))
    w_fused, w_main = search.weights
    how = f"run {run_dir.name}, score = {w_fused:.3f} cos_run + {w_main:.3f} cos_main"
    if image is not None:
        hits = search.image_to_text(args.image, args.k)
        caption = f"top {len(hits)} captions of the {args.split} split for {args.image} ({how})"
    else:
        hits = search.text_to_image(args.query, args.k)
        caption = f"top {len(hits)} images of the {args.split} split for “{echo(args.query)}” ({how})"
    print(hits_table(hits, caption))
    return 0
