"""Where the embedded default lives on disk; every heavy step caches under ``data/``."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository root (the folder holding ``hada/``)."""
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Root of all cached artefacts; ``HADA_DATA`` overrides it (tests point it at a temp dir)."""
    return Path(os.environ.get("HADA_DATA", project_root() / "data"))


def synthetic_root() -> Path:
    return data_dir() / "synthetic"


def backbones_dir() -> Path:
    return data_dir() / "backbones"


def features_dir() -> Path:
    return data_dir() / "features"


def runs_dir() -> Path:
    return data_dir() / "runs"
