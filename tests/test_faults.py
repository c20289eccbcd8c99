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
