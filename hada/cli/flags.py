"""The flags every ``hada`` command spells the same way: one name per concept.

``--dataset`` and ``--data-root`` name the data, ``--backbones A,B`` the backbones (comma-separated, the first
is the main one), ``--jobs`` whatever a command runs in parallel (its help says what). The dataset choices come
from the dataset registry, so a new dataset is added in one place.
"""

from __future__ import annotations

import argparse



def add_dataset_flags(parser, root_help: str | None = None, dataset_help: str = "dataset layout") -> None:
    """``--dataset`` (one of the registry's datasets) and ``--data-root`` (its folder)."""
    from hada.data.datasets import DATASETS

    parser.add_argument("--dataset", choices=DATASETS, default="synthetic",
                        help=f"{dataset_help} (default: %(default)s)")
    add_data_root_flag(parser, root_help or "dataset folder (default: data/<dataset>, or $HADA_DATA/<dataset>)")


def add_data_root_flag(parser, help: str) -> None:
    """``--data-root FOLDER``; ``None`` when not given (each command knows its default folder)."""
    parser.add_argument("--data-root", default=None, metavar="FOLDER", help=help)


def backbone_list(text: str) -> list[str]:
    """``A,B,...`` as a list of backbone specs (:func:`hada.config.backbone_list`), at least one."""
    from hada.config import backbone_list as parse

    names = parse(text)
    if not names:
        raise argparse.ArgumentTypeError("give at least one backbone, comma-separated")
    return names


def add_backbones_flag(parser, help: str) -> None:
    """``--backbones A,B,...`` parsed to a list; ``None`` when not given."""
    parser.add_argument("--backbones", type=backbone_list, default=None, metavar="A,B,...", help=help)


def at_least(minimum: int):
    """A parser for whole numbers >= ``minimum``, checked while parsing (before any data is made or read)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


at_least_one = at_least(1)


def add_jobs_flag(parser, help: str, default: int | None = None, minimum: int = 1) -> None:
    """``--jobs N`` / ``-j N``: how much the command does at once; ``help`` says what a job is here."""
    parser.add_argument("--jobs", "-j", type=at_least(minimum), default=default, metavar="N", help=help)


def add_device_flag(parser) -> None:
    """``--device``: where the command computes (resolved by ``hada.devices.resolve_device``)."""
    from hada.devices import DEVICE_CHOICES_HELP

    parser.add_argument("--device", default="auto", metavar="DEVICE", help=f"{DEVICE_CHOICES_HELP} (default: auto)")
