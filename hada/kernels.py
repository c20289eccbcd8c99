"""Fused CPU kernels (numba) for the GATv2 scores of the K CLS targets (see ``hada.dense.GatV2ClsScores``).

``score[b, k, n, h] = sum_c att[h, c] * leaky_relu(q[b, k, m(n), h*C + c] + xl[b, n, h*C + c])``, with
``q_cls`` in place of ``q`` when node n is its backbone's CLS token. Eager PyTorch needs about ten passes
over a [B, K, N, H*C] pre-activation (or, tiled, a few dozen small ops per tile); here the forward is one
pass over ``xl`` and the backward another, every intermediate in registers. On a 2-core CPU this is what
makes the dense backend's training step several times cheaper than torch_geometric's per-edge GATv2.

Single-threaded by design (hada.train runs one torch thread); compiled on first use and cached on disk
(numba's ``cache=True``), so only the very first call of a fresh install pays the compilation.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np
import torch
from torch import Tensor


@numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False)
def gatv2_scores_forward(q, q_cls, xl, att, node_block, node_is_cls, consts, out):  # pragma: no cover - jit
    """Fill ``out`` [B, K, N, H] from q, q_cls [B, K, M, H*C], xl [B, N, H*C], att [H, C]; ``consts`` =
    (negative slope, 1) in the arrays' dtype, so that no literal promotes float32 arithmetic to float64."""
    B, K = q.shape[0], q.shape[1]
    N = xl.shape[1]
    H, C = att.shape
    s, one = consts[0], consts[1]
    for b in range(B):
        for n in range(N):
            m = node_block[n]
            src = q_cls if node_is_cls[n] else q
            x = xl[b, n]
            for k in range(K):
                qk = src[b, k, m]
                for h in range(H):
                    acc = one - one
                    base = h * C
                    for c in range(C):
                        z = qk[base + c] + x[base + c]
                        acc += att[h, c] * (z if z > 0 else s * z)
                    out[b, k, n, h] = acc


@numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False)
def gatv2_scores_backward(q, q_cls, xl, att, node_block, node_is_cls, consts, grad,
                          dq, dq_cls, dxl, datt):  # pragma: no cover - jit
    """The gradients of :func:`gatv2_scores_forward` for ``grad`` [B, K, N, H]: written into dxl (like xl,
    any content) and added to the zero-initialised dq, dq_cls (like q) and datt (like att). Target-node
    pairs whose score gradients are all exactly 0 (padding, masked out by the softmax) are skipped.

    The loops run over flat H*C rows (the head's gradient first spread over its channels) and write one
    array each: LLVM vectorises these; a loop updating dxl, dq and datt at once is ~10x slower."""
    B, K = q.shape[0], q.shape[1]
    N = xl.shape[1]
    H, C = att.shape
    s, one = consts[0], consts[1]
    att_flat, datt_flat = att.reshape(H * C), datt.reshape(H * C)
    gz = np.empty(H * C, dtype=xl.dtype)  # per channel: the head's score gradient, then d score / d z
    for b in range(B):
        for n in range(N):
            m = node_block[n]
            cls = node_is_cls[n]
            src = q_cls if cls else q
            dsrc = dq_cls if cls else dq
            x = xl[b, n]
            dx = dxl[b, n]
            dx[:] = 0  # here rather than a separate pass over dxl
            for k in range(K):
                g_heads = grad[b, k, n]
                if not g_heads.any():
                    continue
                for h in range(H):
                    gz[h * C:(h + 1) * C] = g_heads[h]
                qk = src[b, k, m]
                for i in range(H * C):
                    z = qk[i] + x[i]
                    g = gz[i]
                    datt_flat[i] += g * (z if z > 0 else s * z)
                    gz[i] = g * att_flat[i] * (one if z > 0 else s)
                dqk = dsrc[b, k, m]
                for i in range(H * C):
                    dx[i] += gz[i]
                for i in range(H * C):
                    dqk[i] += gz[i]


# ------------------------------------------------------------------------------------------- torch side


@lru_cache(maxsize=64)
def _node_layout(blocks: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Backbone (block) of every node and whether it is that block's CLS (first) node."""
    sizes = [hi - lo for lo, hi in blocks]
    node_block = np.repeat(np.arange(len(blocks), dtype=np.int64), sizes)
    node_is_cls = np.zeros(sum(sizes), dtype=np.bool_)
    node_is_cls[[lo for lo, _ in blocks]] = True
    return node_block, node_is_cls


def _arrays(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, blocks, slope: float) -> list:
    """numpy views (contiguous, in q's dtype; a narrower xl is widened) and the kernels' node metadata."""
    dtype = q.dtype
    tensors = [t.detach().to(dtype).contiguous() for t in (q, q_cls, xl, att)]
    consts = np.array([slope, 1.0], dtype=tensors[0].numpy().dtype)
    return [t.numpy() for t in tensors] + [*_node_layout(tuple(map(tuple, blocks))), consts]


def gatv2_cls_scores(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, blocks, slope: float) -> Tensor:
    """Scores [B, K, N, H] (no autograd; ``hada.dense.GatV2ClsScores`` wraps this on CPU)."""
    B, K, N, H = q.shape[0], q.shape[1], xl.shape[1], att.shape[0]
    out = torch.empty(B, K, N, H, dtype=q.dtype)
    gatv2_scores_forward(*_arrays(q, q_cls, xl, att, blocks, slope), out.numpy())
    return out


def gatv2_cls_scores_grads(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, blocks, slope: float,
                           grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dq_cls, dxl, datt) of :func:`gatv2_cls_scores` for the output gradient ``grad``; dxl
    in xl's own dtype."""
    dq, dq_cls = torch.zeros_like(q), torch.zeros_like(q_cls)
    dxl, datt = torch.empty(xl.shape, dtype=q.dtype), torch.zeros(att.shape, dtype=q.dtype)
    grad = grad.detach().to(q.dtype).contiguous()
    gatv2_scores_backward(*_arrays(q, q_cls, xl, att, blocks, slope), grad.numpy(),
                          dq.numpy(), dq_cls.numpy(), dxl.numpy(), datt.numpy())
    return dq, dq_cls, dxl.to(xl.dtype), datt.to(att.dtype)
