"""Shared fixtures. Not autouse: the book tests run subprocesses that must see the real ``data/``."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def hada_data(tmp_path, monkeypatch) -> Path:
    """An empty ``HADA_DATA`` folder for one test (so nothing touches the repo's ``data/``), no progress bars."""
    root = tmp_path / "hada-data"
    monkeypatch.setenv("HADA_DATA", str(root))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    return root


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """Root of a tiny synthetic dataset (40/40/20/20 images, seed 0), made once per session. Read only."""
    from hada.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny-synthetic") / "synthetic"
    generate(root, size="tiny", seed=0, progress=False)
    return root
