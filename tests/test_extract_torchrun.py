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


def test_two_processes_share_the_augmented_views_and_write_one_processs_bytes(tiny_synthetic, tmp_path,
                                                                             monkeypatch):
    """--augment under torchrun: every rank augments a share of the (view, batch) pairs (before, rank 0 made
    them all while the others waited in a collective that NCCL times out after 10 minutes), and the views are
    byte for byte those of one process. 40 train images in batches of 8, 2 views: 10 batches, 5 per rank."""
    from hada.cli import main
    from hada.features.store import AUGMENT_DIR, store_dir

    args = ["--backbones", SPEC, "--split", "train", "--device", "cpu", "--jobs", "0", "--image-batch", "8",
            "--text-batch", "16", "--augment", "2", "--augment-policy", "albef"]
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "one"))
    assert main(["features", "extract", "--data-root", str(tiny_synthetic), *args]) == 0
    # each rank logs the (view, image) pairs it augments, from a sitecustomize on its path
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"""import os
if os.environ.get("RANK") and os.environ.get("LOCAL_WORLD_SIZE"):
    import hada.features.store as st
    get = st._AugmentedFiles.__getitem__
    def logged(self, i):
        with open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"]), "a") as f:
            f.write(f"{{self.view}} {{i}}\\n")
        return get(self, i)
    st._AugmentedFiles.__getitem__ = logged
""")
    env = {**os.environ, "HADA_DATA": str(tmp_path / "two"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hada",
           "features", "extract", "--data-root", str(tiny_synthetic), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    done = [(tmp_path / f"rank{r}").read_text().split("\n")[:-1] for r in (0, 1)]
    assert len(done[0]) == len(done[1]) == 40  # 2 views x 40 images, half each
    assert sorted(done[0] + done[1]) == sorted(f"{v} {i}" for v in range(2) for i in range(40))

    def views(hada_data: Path) -> dict[str, bytes]:
        path = store_dir("synthetic", SPEC, "train", hada_data / "features") / AUGMENT_DIR
        return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix in (".npy", ".json")}

    one, two = views(tmp_path / "one"), views(tmp_path / "two")
    assert set(one) == {"image_tokens.npy", "image_embeds.npy", "manifest.json"}
    assert two == one
