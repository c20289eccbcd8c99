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
