"""Fused CPU kernels (numba) for GATv2 attention at the K CLS nodes of the published graph.

For sample b and CLS target k, with ``m(n)`` the backbone (block) of node n and ``q_cls`` in place of ``q`` when
n is its block's CLS token (``node_backbone`` and ``node_token`` of :class:`hada.dense.DenseLayout`) (:func:`hada.dense.dense_gatv2` builds both)::

    score[b, k, n, h] = sum_c att[h, c] * leaky_relu(q[b, k, m(n), h*C + c] + xl[b, n, h*C + c])
    alpha[b, k, :, h] = softmax over the valid nodes n of score[b, k, n, h]   (0 at padding)
    out[b, k, h*C + c] = sum_n alpha[b, k, n, h] * xl[b, n, h*C + c]

Eager PyTorch computes this with a few dozen ops and several passes over [B, K, N, H*C] tensors (or their
tiles); here the forward is two passes over ``xl`` per target and the backward two more, every intermediate
in registers or in one row of scratch. On a 2-core CPU this is what makes the dense backend's training step
many times cheaper than torch_geometric's per-edge GATv2 (``benchmarks/bench_train_step.py``).

Single-threaded by design (hada.train runs one torch thread); compiled on first use and cached on disk
(numba's ``cache=True``), so only the first call after an install pays the compilation (a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

_JIT = dict(cache=True, fastmath=True, nogil=True, boundscheck=False)


@numba.njit(**_JIT)
def gatv2_attention_forward(q, q_cls, xl, att, node_backbone, node_token, mask, consts,
                            alpha, out):  # pragma: no cover - compiled
    """Fill ``alpha`` [B, K, N, H] and ``out`` [B, K, H*C] from q, q_cls [B, K, M, H*C], xl [B, N, H*C],
    att [H, C] and the validity ``mask`` [B, N]. ``consts`` = (negative slope, 1) in the arrays' dtype, so that
    no literal promotes float32 arithmetic to float64."""
    B, K = q.shape[0], q.shape[1]
    N = xl.shape[1]
    H, C = att.shape
    s, one = consts[0], consts[1]
    zero = one - one
    top, total = np.empty(H, dtype=xl.dtype), np.empty(H, dtype=xl.dtype)
    for b in range(B):
        for k in range(K):
            a = alpha[b, k]
            for n in range(N):  # scores
                if not mask[b, n]:
                    continue
                qk = (q_cls if node_token[n] == 0 else q)[b, k, node_backbone[n]]
                x = xl[b, n]
                for h in range(H):
                    acc = zero
                    base = h * C
                    for c in range(C):
                        z = qk[base + c] + x[base + c]
                        acc += att[h, c] * (z if z > 0 else s * z)
                    a[n, h] = acc
            top[:] = a[0]  # softmax over the valid nodes (node 0, a CLS token, always is one)
            for n in range(N):
                if mask[b, n]:
                    for h in range(H):
                        top[h] = max(top[h], a[n, h])
            total[:] = zero
            for n in range(N):
                if mask[b, n]:
                    for h in range(H):
                        e = np.exp(a[n, h] - top[h])
                        a[n, h] = e
                        total[h] += e
            for h in range(H):
                total[h] = one / total[h]
            for n in range(N):
                if mask[b, n]:
                    for h in range(H):
                        a[n, h] *= total[h]
            o = out[b, k]
            o[:] = zero
            for n in range(N):  # messages: xl weighted per head
                if not mask[b, n]:
                    continue
                x = xl[b, n]
                for h in range(H):
                    w = a[n, h]
                    base = h * C
                    for c in range(C):
                        o[base + c] += w * x[base + c]


@numba.njit(**_JIT)
def gatv2_attention_backward(q, q_cls, xl, att, node_backbone, node_token, mask, consts, alpha, d_out, d_alpha,
                             dq, dq_cls, dxl, datt):  # pragma: no cover - compiled
    """Gradients of :func:`gatv2_attention_forward` for ``d_out`` [B, K, H*C] and ``d_alpha`` [B, K, N, H]:
    written into dxl (like xl, any content) and added to the zero-initialised dq, dq_cls (like q) and datt
    (like att). Loops run over flat channel rows and write one array each, which LLVM vectorises (one loop
    updating dxl, dq and datt at once was ~10x slower)."""
    B, K = q.shape[0], q.shape[1]
    N = xl.shape[1]
    H, C = att.shape
    s, one = consts[0], consts[1]
    zero = one - one
    att_flat, datt_flat = att.reshape(H * C), datt.reshape(H * C)
    gz = np.empty(H * C, dtype=xl.dtype)  # per channel: a head's gradient, then d score / d z
    g = np.empty((N, H), dtype=xl.dtype)  # d alpha, then d score
    dot = np.empty(H, dtype=xl.dtype)
    for b in range(B):
        dxl[b] = zero
        for k in range(K):
            a, do = alpha[b, k], d_out[b, k]
            for n in range(N):  # through the messages: d alpha, and alpha * d_out into dxl
                if not mask[b, n]:
                    continue
                x, dx = xl[b, n], dxl[b, n]
                for h in range(H):
                    acc = d_alpha[b, k, n, h]
                    base = h * C
                    for c in range(C):
                        acc += do[base + c] * x[base + c]
                    g[n, h] = acc
                    w = a[n, h]
                    for c in range(C):
                        dx[base + c] += w * do[base + c]
            dot[:] = zero  # through the softmax: d score = alpha * (d alpha - sum_n alpha d alpha)
            for n in range(N):
                if mask[b, n]:
                    for h in range(H):
                        dot[h] += a[n, h] * g[n, h]
            for n in range(N):
                if mask[b, n]:
                    for h in range(H):
                        g[n, h] = a[n, h] * (g[n, h] - dot[h])
            for n in range(N):  # through the scores
                if not mask[b, n]:
                    continue
                cls = node_token[n] == 0
                qk = (q_cls if cls else q)[b, k, node_backbone[n]]
                dqk = (dq_cls if cls else dq)[b, k, node_backbone[n]]
                x, dx = xl[b, n], dxl[b, n]
                for h in range(H):
                    gz[h * C:(h + 1) * C] = g[n, h]
                for i in range(H * C):
                    z = qk[i] + x[i]
                    gi = gz[i]
                    datt_flat[i] += gi * (z if z > 0 else s * z)
                    gz[i] = gi * att_flat[i] * (one if z > 0 else s)
                for i in range(H * C):
                    dx[i] += gz[i]
                for i in range(H * C):
                    dqk[i] += gz[i]


# ------------------------------------------------------------------------------------------- torch side


def _numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _inputs(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, mask: Tensor, layout, slope: float) -> list:
    """The kernels' leading arguments as numpy arrays: features in q's dtype (a narrower xl is widened), the
    node layout (a :class:`hada.dense.DenseLayout`) as int64."""
    arrays = [_numpy(t, q.dtype) for t in (q, q_cls, xl, att)]
    nodes = [_numpy(t, torch.int64) for t in (layout.node_backbone, layout.node_token)]
    consts = np.array([slope, 1.0], dtype=arrays[0].dtype)
    return [*arrays, *nodes, _numpy(mask, torch.bool), consts]


def gatv2_cls_attention(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, mask: Tensor, layout,
                        slope: float) -> tuple[Tensor, Tensor]:
    """(out [B, K, H*C], alpha [B, K, N, H]) in q's dtype, without autograd (``hada.dense.GatV2ClsAttention``
    wraps it)."""
    B, K, N, H = q.shape[0], q.shape[1], xl.shape[1], att.shape[0]
    alpha = torch.zeros(B, K, N, H, dtype=q.dtype)  # padding keeps its 0
    out = torch.empty(B, K, q.shape[-1], dtype=q.dtype)
    gatv2_attention_forward(*_inputs(q, q_cls, xl, att, mask, layout, slope), alpha.numpy(), out.numpy())
    return out, alpha


def gatv2_cls_attention_grads(q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, mask: Tensor, layout,
                              slope: float, alpha: Tensor, d_out: Tensor, d_alpha: Tensor
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dq_cls, dxl, datt) of :func:`gatv2_cls_attention`; dxl in xl's own dtype."""
    dq, dq_cls = torch.zeros_like(q), torch.zeros_like(q_cls)
    dxl, datt = torch.empty(xl.shape, dtype=q.dtype), torch.zeros(att.shape, dtype=q.dtype)
    gatv2_attention_backward(*_inputs(q, q_cls, xl, att, mask, layout, slope), _numpy(alpha, q.dtype),
                             _numpy(d_out, q.dtype), _numpy(d_alpha, q.dtype),
                             dq.numpy(), dq_cls.numpy(), dxl.numpy(), datt.numpy())
    return dq, dq_cls, dxl.to(xl.dtype), datt.to(att.dtype)
