"""The fault catalogue: each failure found by reading the code, reproduced on the CPU, and kept fixed by a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# ---- at scale (issue 20)
# What the first GPU and torchrun runs would hit, reproduced on the CPU: gloo ranks, the tiled attention path,
# a mocked torch.cuda. Each test failed before its fix.

def _scale_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scale_one_backbone_model(gnn: str = "gatv2"):
    """A small HADA encoder over one backbone (K=1) and a ragged batch for it (sample 1 keeps only its CLS)."""
    import torch

    from hada.config import ModelConfig
    from hada.model.encoder import FeatureDims, HadaEncoder, ModalityBatch

    torch.manual_seed(0)
    model = HadaEncoder(ModelConfig(width=16, out_dim=8, heads=2, dropout=0.0, gnn=gnn),
                        FeatureDims.same((12,), (6,)))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 1, 3, 5, 2])
    valid = torch.arange(6)[None, :, None] < lengths[:, None, None]
    batch = ModalityBatch([torch.randn(5, 6, 12, generator=g) * valid], [lengths], [torch.randn(5, 6, generator=g)])
    return model, batch


@pytest.mark.parametrize("chunk", [24, 1 << 18])
def test_scale_one_backbone_on_the_tiled_path_equals_pyg_forward_and_backward(monkeypatch, chunk):
    """K=1 on the tiled GATv2 scores (every CUDA run, and CPU attention dropout): the backward summed the K
    targets' gradients from ga[:, 1], which K=1 lacks (IndexError)."""
    import torch

    import hada.model.fast.dense as dense

    monkeypatch.setattr(dense, "FUSED_CPU_ATTENTION", False)
    monkeypatch.setattr(dense, "GATV2_CHUNK_ELEMENTS", chunk)
    model, batch = _scale_one_backbone_model()
    out, grads = {}, {}
    for backend in ("dense", "pyg"):
        model.zero_grad()
        out[backend] = model(batch, backend=backend)
        out[backend].pow(3).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out["dense"], out["pyg"], atol=1e-5, rtol=1e-5)
    for name, g in grads["dense"].items():
        torch.testing.assert_close(g, grads["pyg"][name], atol=1e-5, rtol=1e-4, msg=name)


def _scale_toy_stores(monkeypatch, tmp_path):
    """Every run's stores replaced by toy splits (backbones toy0, toy1), HADA_DATA in tmp_path, caches emptied."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.toy_features import use_toy_stores

    return use_toy_stores(monkeypatch, tmp_path)


def _scale_tiny(recipe_name: str = "paper", **kw):
    from hada.config import recipe

    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=8, epochs=1, batch_size=16,
                queue_size=32, eval_batch_size=64, augment_p=0.0, lr=1e-3, device="cpu")
    return recipe(recipe_name).override(**{**base, **kw})


def test_scale_the_paper_recipe_holds_one_copy_of_each_split(monkeypatch, tmp_path):
    """Global token statistics: run_experiment built every split with per-backbone statistics and cached it, and
    the trainer built a second copy with the global ones (6 copies alive during training, against 3)."""
    import gc
    import weakref

    import hada.train as ht
    from hada.features.batching import FeatureData
    from hada.runs import run_experiment

    _scale_toy_stores(monkeypatch, tmp_path)
    made = []
    init = FeatureData.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    alive = []
    epoch = ht._train_epoch

    def counting(run, *a, **k):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        return epoch(run, *a, **k)

    monkeypatch.setattr(FeatureData, "__init__", tracked)
    monkeypatch.setattr(ht, "_train_epoch", counting)
    run_experiment(_scale_tiny(), "copies", progress=False, log=lambda line: None)
    assert alive == [3]


class _ScaleReached(Exception):
    """Raised where a test has seen what it came for (the training loop's device)."""


def test_scale_device_cuda_1_reaches_the_training_loop(monkeypatch, tmp_path):
    """``--device cuda:1``: the run's configuration keeps only the device's type, and training resolved "cuda"
    again, to cuda:0. CUDA is mocked (two devices); the test stops where the training loop receives its data."""
    import torch

    import hada.runs as hr
    import hada.train as ht
    from hada.cli import main

    _scale_toy_stores(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    seen = {}

    class Shared:  # what run_experiment hands the trainer, without touching a GPU
        def __init__(self, device):
            self.device = device

    monkeypatch.setattr(hr, "shared_data", lambda config, split, stats=None, device=None:
                        seen.setdefault("shared", []).append(device) or Shared(device))

    def load_data(config, run_dir, data, device):
        seen["train"] = device
        raise _ScaleReached

    monkeypatch.setattr(ht, "_load_data", load_data)
    with pytest.raises(_ScaleReached):
        main(["train", "--backbones", "toy0,toy1", "--epochs", "1", "--device", "cuda:1"])
    assert seen["train"] == torch.device("cuda", 1)
    assert set(seen["shared"]) == {torch.device("cuda", 1)}


def _scale_toy_open(config, split):
    """The same toy stores in every process (deterministic by split)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.toy_features import toy_splits

    seeds = {"train": 0, "val": 1, "test": 2}
    return toy_splits(n_images=24 if split == "train" else 20, seed=seeds[split])[: len(config.data.backbones)]


def _scale_lavis_worker(rank: int, world: int, port: int, root: str) -> None:
    """One gloo rank training the tiny lavis recipe: one epoch before mixing, one after."""
    import hada.train as ht

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HADA_DATA=str(Path(root) / "data"), HADA_NO_PROGRESS="1")
    ht.open_splits = _scale_toy_open
    config = _scale_tiny("lavis", mix_from_epoch=1, epochs=2, batch_size=8)
    result = ht.train(config, Path(root) / "lavis")
    assert result is not None and len(result.history) == 2


def test_scale_lavis_trains_through_its_pre_mix_epochs_under_ddp(tmp_path):
    """Before ``mix_from_epoch`` the mix weight gets no gradient; DDP (find_unused_parameters=False) died at the
    second step ("Expected to have finished reduction in the prior iteration")."""
    import json

    import torch

    torch.multiprocessing.spawn(_scale_lavis_worker, args=(2, _scale_free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    history = json.loads((tmp_path / "lavis" / "history.json").read_text())
    assert [h["mix_weight"] for h in history][0] == 0.0 and history[1]["mix_weight"] > 0.0


_SCALE_HELD_BACK = """
import os, sys, time
import hada.features.store as store

images = store._extract_images


def held_back(*args, **kwargs):  # rank 1 finishes its images 3 s after rank 0
    out = images(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        time.sleep(3)
    return out


store._extract_images = held_back
from hada.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_scale_sharded_extraction_with_a_rank_held_back_equals_one_process(tiny_synthetic, tmp_path, monkeypatch):
    """Each rank derived its share of the captions from the others' live progress files: with rank 1 three
    seconds behind, caption rows stayed zero and the manifest said complete."""
    import json

    from hada.cli import main
    from hada.features.store import store_dir

    spec = "tiny-vit:random"
    args = ["features", "extract", "--data-root", str(tiny_synthetic), "--backbones", spec, "--split", "val",
            "--device", "cpu", "--jobs", "0", "--image-batch", "8", "--text-batch", "16"]
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "one"))
    assert main(args) == 0
    script = tmp_path / "held_back.py"
    script.write_text(_SCALE_HELD_BACK)
    env = {**os.environ, "HADA_DATA": str(tmp_path / "two"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if "error" in line.lower())[-3000:]
    stores = {n: store_dir("synthetic", spec, "val", tmp_path / n / "features") for n in ("one", "two")}
    assert json.loads((stores["two"] / "manifest.json").read_text())["complete"]
    for f in sorted(stores["one"].glob("*.npy")):
        assert (stores["two"] / f.name).read_bytes() == f.read_bytes(), f.name


def test_scale_finish_refuses_a_store_with_rows_never_written(tmp_path):
    """The last line of defence: rows that no progress file records are a HadaError, not a complete store."""
    from hada.errors import HadaError
    from hada.features import progress as rowlog
    from hada.features.store import _finish

    request = {"n_images": 20, "n_captions": 100, "batch": {"images": 8, "captions": 16}}
    first = rowlog.RankProgress(tmp_path, 0)
    first.add("images", 0, 20)
    first.add("captions", 0, 48)
    first.save()
    second = rowlog.RankProgress(tmp_path, 1)
    second.add("captions", 72, 100)
    second.save()
    with pytest.raises(HadaError, match="captions rows 48-71"):
        _finish(tmp_path, request)
    assert not (tmp_path / "manifest.json").exists()


def _scale_seeds_worker(rank: int, world: int, port: int, root: str) -> None:
    """One gloo rank: notes its torch RNG state at its first hard-negative draw, trains the tiny paper recipe two
    epochs in one call, then the same run again stopped after one epoch and resumed."""
    import hashlib

    import torch

    import hada.losses as hl
    import hada.train as ht

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HADA_DATA=str(Path(root) / "data"), HADA_NO_PROGRESS="1")
    ht.open_splits = _scale_toy_open
    draw = hl.sample_hard_negatives

    def noted(*args):
        state = Path(root) / f"rng-{rank}"
        if not state.exists():
            state.write_text(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        return draw(*args)

    hl.sample_hard_negatives = noted
    config = _scale_tiny("paper", epochs=2, batch_size=8, dropout=0.3)
    ht.train(config, Path(root) / "whole")
    assert ht.train(config, Path(root) / "resumed", max_epochs_this_call=1) is None
    ht.train(config, Path(root) / "resumed")


def test_scale_ranks_draw_their_own_dropout_and_negatives_and_resume_to_the_bit(tmp_path):
    """Every rank had one torch stream from the same seed: the ranks repeated each other's dropout masks and
    hard-negative draws. Now each step's seed is a function of (seed, rank, step)."""
    import json

    import torch

    torch.multiprocessing.spawn(_scale_seeds_worker, args=(2, _scale_free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    assert (tmp_path / "rng-0").read_text() != (tmp_path / "rng-1").read_text()
    whole, resumed = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("whole", "resumed"))
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    histories = [json.loads((tmp_path / n / "history.json").read_text()) for n in ("whole", "resumed")]
    assert [h["loss"] for h in histories[0]] == [h["loss"] for h in histories[1]]


def test_scale_an_unfinished_store_resumes_only_on_its_device_and_precision(tiny_synthetic, tmp_path, monkeypatch):
    """A store started on the CPU (float32) and resumed on CUDA (bfloat16 autocast) mixed the two kinds of rows;
    the manifest now records both, and resuming under others is one line."""
    import json

    import hada.features.store as store
    from hada.backbones import load_backbone
    from hada.data.datasets import load_dataset
    from hada.errors import HadaError

    spec, root = "tiny-vit:random", tmp_path / "features"
    backbone, dataset = load_backbone(spec), load_dataset("synthetic", tiny_synthetic)
    options = dict(image_batch=8, text_batch=16, progress=False, checkpoint_seconds=0)
    with pytest.raises(store._Stop):
        store.extract_split(backbone, dataset, "val", spec, root, _stop_after_batches=2, **options)
    manifest = json.loads((store.store_dir("synthetic", spec, "val", root) / "manifest.json").read_text())
    assert manifest["compute"] == {"device": "cpu", "dtype": "float32"}
    monkeypatch.setattr(store, "compute_record", lambda b: {"device": "cuda", "dtype": "bfloat16"})
    with pytest.raises(HadaError, match="started on cpu in float32") as err:
        store.extract_split(backbone, dataset, "val", spec, root, **options)
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.undo()
    assert store.extract_split(backbone, dataset, "val", spec, root, **options).manifest["complete"]


def test_scale_features_placed_by_free_memory_in_three_tiers(monkeypatch):
    """Placement compared a split with half the card's *total* memory, and anything above 4 GB went to the
    memmap rather than to pinned host memory. Now: free GPU memory, then available host memory, then the memmap;
    free memory mocked (no GPU is touched)."""
    from types import SimpleNamespace

    import torch

    import hada.features.batching as batching

    monkeypatch.delenv("HADA_DEVICE_RESIDENT_MB", raising=False)
    monkeypatch.delenv("HADA_RESIDENT_MB", raising=False)
    cuda = torch.device("cuda", 1)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (8 * 10**9, 80 * 10**9))
    monkeypatch.setattr(batching, "_host_available", lambda: 100 * 10**9)
    tiers = {size: batching._placement(size, cuda, None) for size in (3 * 10**9, 30 * 10**9, 74 * 10**9)}
    assert tiers == {3 * 10**9: "device", 30 * 10**9: "memory", 74 * 10**9: "memmap"}
    assert asked and all(d == cuda for d in asked)  # the run's own card
    data = {split: SimpleNamespace(where=lambda p=p, s=s: batching.where(p, cuda, s))
            for split, p, s in (("train", "device", 3 * 10**9), ("val", "memory", 30 * 10**9),
                                ("test", "memmap", 74 * 10**9))}
    assert batching.placement_line(data) == ("token features: train on cuda:1 (3.0 GB), val in pinned host memory "
                                              "(30.0 GB), test memory-mapped from the store (74.0 GB)")


#: Tensor methods that wait for the device when the tensor lives on a GPU (each call a host synchronisation).
_SCALE_SYNCS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy", "nonzero")


def _scale_count_syncs(monkeypatch, counts: list) -> None:
    """Count, per training step, the calls that synchronise with a GPU: the methods above, boolean-mask indexing
    (a hidden nonzero) and torch.cuda.synchronize. ``counts`` receives one {name: calls} per step."""
    import torch

    import hada.train as ht

    live = {"on": None}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            if live["on"] is not None:
                live["on"][name] = live["on"].get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def masked(name, fn):
        def wrapper(self, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if live["on"] is not None and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                live["on"][name] = live["on"].get(name, 0) + 1
            return fn(self, index, *rest)
        return wrapper

    for name in _SCALE_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, masked(f"mask {name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    step = ht._train_step

    def counting_step(*args, **kwargs):
        live["on"] = {}
        try:
            return step(*args, **kwargs)
        finally:
            counts.append(live["on"])
            live["on"] = None

    monkeypatch.setattr(ht, "_train_step", counting_step)


def test_scale_at_most_two_host_syncs_per_training_step(monkeypatch, tmp_path):
    """The published recipe's step on the path a GPU takes (tiled attention, not the CPU's numba kernels), with
    every call that would wait for the GPU counted: 25 per step before (16 of them the encoders' length checks)."""
    import hada.model.fast.dense as dense
    import hada.train as ht

    _scale_toy_stores(monkeypatch, tmp_path)
    monkeypatch.setattr(dense, "FUSED_CPU_ATTENTION", False)
    counts: list = []
    _scale_count_syncs(monkeypatch, counts)
    config = _scale_tiny("paper", epochs=2, batch_size=8, dropout=0.3)
    ht.train(config, tmp_path / "syncs", max_epochs_this_call=1)
    ht.train(config, tmp_path / "syncs")  # resumed: the queue's place is read back once, in the first step
    totals = [sum(c.values()) for c in counts]
    print("host syncs per step:", totals, "first step:", counts[0])
    assert len(counts) >= 6 and max(totals) <= 2, counts
