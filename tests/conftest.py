"""Shared fixtures. Not autouse: the book tests run subprocesses that must see the real ``data/``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def hada_data(tmp_path, monkeypatch) -> Path:
    """An empty ``HADA_DATA`` folder for one test (so nothing touches the repo's ``data/``), no progress bars."""
    root = tmp_path / "hada-data"
    monkeypatch.setenv("HADA_DATA", str(root))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny workloads: on a shared 2-core machine two threads on small tensors
    spend their time waiting on each other. Use as ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """Root of a tiny synthetic dataset (40/40/20/20 images, seed 0), made once per session. Read only."""
    from hada.data.synthetic import generate

    root = tmp_path_factory.mktemp("tiny-synthetic") / "synthetic"
    generate(root, size="tiny", seed=0, progress=False)
    return root


#: Folders under data/runs that hold derived caches a chapter may write (untrained baseline rows, each run's
#: per-query test ranks for the bootstrap), not training runs.
CACHES_NOT_RUNS = {"baselines", "ranks"}


def _run_dirs() -> set[str]:
    from hada.paths import runs_dir

    runs = runs_dir()
    return {p.name for p in runs.iterdir() if p.is_dir()} if runs.is_dir() else set()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def built_html() -> Path:
    """Builds the whole book exactly as `make book` does: `hada prepare` (data, backbones, features and
    every run, in parallel), then `jupyter-book build -W --keep-going` with the chapters on several processes
    (cached execution, raise_on_error, and a warning fails the build). The build must train nothing itself: if it
    did, `hada prepare` and the chapters disagree about what the book reads.
    Here, not in tests/test_book.py, so that every test module that reads the site shares one build."""
    res = _run([str(BIN / "hada"), "prepare"], cwd=ROOT, env={**os.environ, "HADA_NO_PROGRESS": "1"})
    assert res.returncode == 0, f"hada prepare failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    prepared = _run_dirs()
    res = _run([str(BIN / "python"), str(ROOT / "book" / "_ext" / "hada_parallel.py"), "build", "-W", "--keep-going",
                str(ROOT / "book")], cwd=ROOT)
    assert res.returncode == 0, f"book build failed:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
    trained_by_build = _run_dirs() - prepared - CACHES_NOT_RUNS
    assert not trained_by_build, f"the chapters trained runs `hada prepare` did not: {sorted(trained_by_build)}"
    return ROOT / "_build" / "html"  # the build folder sits beside _config.yml
