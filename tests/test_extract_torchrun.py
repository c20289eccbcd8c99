"""Extraction shared among processes by torchrun (gloo on the CPU): the same bytes as one process, resumable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = "tiny-vit:random"
ARGS = ["--backbones", SPEC, "--split", "val", "--split", "test", "--device", "cpu", "--jobs", "0",
        "--image-batch", "8", "--text-batch", "16"]


def _store_bytes(hada_data: Path, split: str) -> dict[str, bytes]:
    from hada.features.store import store_dir

    path = store_dir("synthetic", SPEC, split, hada_data / "features")
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.npy"))}


def test_two_processes_write_the_same_store_as_one_and_resume_one_processs_work(tiny_synthetic, tmp_path,
                                                                               monkeypatch):
    """val: two processes from scratch; test: one process stopped after 3 image and 2 caption batches, two
    processes finish it. One torchrun call for both (starting the processes is most of the time)."""
    from hada.backbones import load_backbone
    from hada.cli import main
    from hada.data.datasets import load_dataset
    from hada.features.store import _Stop, extract_split

    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "one"))
    assert main(["features", "extract", "--data-root", str(tiny_synthetic), *ARGS]) == 0

    with pytest.raises(_Stop):
        extract_split(load_backbone(SPEC), load_dataset("synthetic", tiny_synthetic), "test", SPEC,
                      tmp_path / "two" / "features", image_batch=8, text_batch=16, progress=False,
                      checkpoint_seconds=0, _stop_after_batches=5)
    env = {**os.environ, "HADA_DATA": str(tmp_path / "two"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hada",
           "features", "extract", "--data-root", str(tiny_synthetic), *ARGS]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("20 images") == 2  # rank 0 prints, once per split
    for split in ("val", "test"):
        assert _store_bytes(tmp_path / "two", split) == _store_bytes(tmp_path / "one", split)
