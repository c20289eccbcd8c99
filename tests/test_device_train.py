"""``--device`` on CPU: the flags exist, a missing CUDA is one line, a CPU run is the default run, and the choices
that differ by device (dense attention kernels, where features live) are made by device type."""

import importlib.util

import pytest
import torch

from hada.cli import main
from hada.config import TrainConfig

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")

COMMANDS = (["train"], ["evaluate"], ["prepare"], ["backbones", "pretrain"])


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_device_flag_is_in_help(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "--device DEVICE" in capsys.readouterr().out


@NO_CUDA
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_device_cuda_without_cuda_is_one_line(command, hada_data, capsys):
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err, err


@NO_CUDA
def test_auto_resolves_to_the_cpu_and_cpu_is_the_default_run():
    assert TrainConfig().resolved().device == "cpu"
    assert TrainConfig(device="cpu").resolved().to_dict() == TrainConfig().resolved().to_dict()


def test_train_print_config_takes_device_from_file_then_flag(tmp_path, capsys):
    import json

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"device": "cpu"}))
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert main(["train", "--config", str(path), "--print-config", "--device", "auto"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_dense_attention_uses_numba_kernels_on_cpu_only():
    from hada.model.fast.dense import use_fused_kernels

    assert use_fused_kernels("cpu") and use_fused_kernels(torch.device("cpu"))
    for other in ("cuda", "cuda:1", torch.device("meta")):
        assert not use_fused_kernels(other)  # the tiled torch path


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba is not installed")
def test_cpu_falls_back_to_the_tiled_path_without_numba(monkeypatch):
    """The GPU kit carries no numba (llvmlite alone is 60 MB): without it the CPU takes the tiled PyTorch ops,
    and nothing imports numba on the way (its import in hada.model.fast.kernels is reached only by the fused
    path)."""
    import importlib.util

    from hada.model.fast import dense

    dense.numba_available.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    try:
        assert not dense.use_fused_kernels("cpu")
    finally:
        monkeypatch.undo()
        dense.numba_available.cache_clear()
    assert dense.use_fused_kernels("cpu")


def test_feature_placement_by_device_and_budget(monkeypatch):
    from hada.features.batching import _placement

    cuda = torch.device("cuda", 0)  # only the decision: no tensor is made on it
    monkeypatch.setenv("HADA_DEVICE_RESIDENT_MB", "1")
    monkeypatch.setenv("HADA_RESIDENT_MB", "2")
    assert _placement(2**20, cuda, None) == "device"
    assert _placement(2**20 + 1, cuda, None) == "memory"  # streamed from pinned host memory
    assert _placement(3 * 2**20, cuda, None) == "memmap"
    assert _placement(2**20, torch.device("cpu"), None) == "memory"  # the CPU never asks a device budget
    assert _placement(2**20, cuda, False) == "memmap"  # an explicit choice wins


def test_checkpoint_rng_state_has_cuda_only_on_cuda():
    import numpy as np

    from hada.train import rng_state

    assert "cuda" not in rng_state(np.random.default_rng(0), torch.device("cpu"))
    assert "cuda" not in rng_state(np.random.default_rng(0))
