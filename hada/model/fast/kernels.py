"""Fused CPU kernels (numba) for GATv2 attention at the K CLS nodes of the published graph.

The kernels read only the valid nodes' rows ``x W_l``, without their backbone's bias ``bias[m]``, where a
:class:`hada.model.fast.dense.ValidRows` says they are: packed backbone by backbone, or in place in a padded tensor.
For sample b and CLS target k, with ``q_cls`` in place of ``q`` for a block's first (CLS) token::

    score[b, k, n, h] = sum_c att[h, c] * leaky_relu(q[b, k, m(n), h*C + c] + bias[m(n), h*C + c] + xl[n, h*C + c])
    alpha[b, k, :, h] = softmax over the sample's valid nodes n of score[b, k, n, h]   (0 at padding)
    out[b, k, h*C + c] = sum_n alpha[b, k, n, h] * drop[b, k, n, h] * (xl[n, h*C + c] + bias[m(n), h*C + c])

where ``drop`` is the attention dropout's weight of each coefficient (0 or 1 / (1 - p); 1 without dropout), as
torch_geometric's GATv2Conv drops alpha before its messages.

Eager PyTorch computes this with a few dozen ops and several passes over [B, K, N, H*C] tensors (or their
tiles); here the forward is two passes over a sample's rows per target and the backward two more, every
intermediate in registers or in one row of scratch. Padding costs nothing, and adding the bias here spares
a pass over every row (and the bias's own gradient pass). On a 2-core CPU this is what makes the dense
backend's training step many times cheaper than torch_geometric's per-edge GATv2
(``benchmarks/bench_train_step.py``).

Single-threaded by design (hada.train runs one torch thread). Splitting samples over threads with numba's
``parallel=True`` saved ~10% of a step in one process at 2 threads, but numba's OpenMP pool then spins beside
torch's: two such processes on 2 cores (``hada prepare``) ran each step over 10x slower. Compiled on first use and
cached on disk (numba's ``cache=True``), so only the first call after an install pays the compilation.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

_JIT = dict(cache=True, fastmath=True, nogil=True, boundscheck=False)


@numba.njit(**_JIT)
def _sizes(q, xls, att, consts):  # pragma: no cover - compiled
    """(B, K, M, H, C, negative slope, one, zero) of the kernels' arguments; the constants in their dtype."""
    H, C = att.shape
    one = consts[1]
    return q.shape[0], q.shape[1], len(xls), H, C, consts[0], one, one - one


@numba.njit(**_JIT)
def gatv2_attention_forward(q, q_cls, xls, bias, att, starts, offsets, lengths, consts, drop,
                            alpha, out):  # pragma: no cover - compiled
    """Fill ``alpha`` [B, K, N, H] and ``out`` [B, K, H*C] from q, q_cls [B, K, M, H*C], att [H, C] and the
    valid nodes' rows ``xls``: per backbone m the array holding its rows ``x W_l`` (packed [R_m, H*C], or one
    padded [B*N, H*C] array for every backbone) without their bias, which is ``bias[m]`` (adding it here saves
    a pass over every row). Sample b's tokens are rows ``offsets[m, b]`` to
    ``offsets[m, b] + lengths[m, b]``, its CLS first; ``starts[m]`` is backbone m's first position on alpha's
    padded node axis. ``consts`` = (negative slope, 1) in the arrays' dtype, so that no literal promotes
    float32 arithmetic to float64. ``drop`` [B, K, N, H] weighs each coefficient in the messages only (dropout
    of the attention: 0 or 1 / (1 - p)), as torch_geometric's GATv2Conv does; ``alpha`` stays the softmax. An
    empty ``drop`` (shape 0) means no dropout."""
    B, K, M, H, C, s, one, zero = _sizes(q, xls, att, consts)
    HC = H * C
    dropping = drop.shape[0] > 0
    top, total = np.empty(H, dtype=out.dtype), np.empty(H, dtype=out.dtype)
    qb = np.empty((2, HC), dtype=out.dtype)  # q + bias for the block's CLS token (0) and other tokens (1)
    block_sum = np.empty((M, H), dtype=out.dtype)  # each block's share of the attention, per head
    for b in range(B):
        for k in range(K):
            a = alpha[b, k]
            top[:] = -np.inf
            for m in range(M):  # scores
                x_m, row0, p0 = xls[m], offsets[m, b], starts[m]
                for i in range(HC):
                    qb[0, i] = q_cls[b, k, m, i] + bias[m, i]
                    qb[1, i] = q[b, k, m, i] + bias[m, i]
                for j in range(lengths[m, b]):
                    qk = qb[min(j, 1)]
                    x = x_m[row0 + j]
                    for h in range(H):
                        acc = zero
                        base = h * C
                        for c in range(C):
                            z = qk[base + c] + x[base + c]
                            acc += att[h, c] * (z if z > 0 else s * z)
                        a[p0 + j, h] = acc
                        top[h] = max(top[h], acc)
            total[:] = zero  # softmax over the valid nodes
            for m in range(M):
                p0 = starts[m]
                for j in range(lengths[m, b]):
                    for h in range(H):
                        e = np.exp(a[p0 + j, h] - top[h])
                        a[p0 + j, h] = e
                        total[h] += e
            for h in range(H):
                total[h] = one / total[h]
            o = out[b, k]
            o[:] = zero
            block_sum[:] = zero
            for m in range(M):  # normalise, and the messages: xl weighted per head
                x_m, row0, p0 = xls[m], offsets[m, b], starts[m]
                for j in range(lengths[m, b]):
                    x = x_m[row0 + j]
                    for h in range(H):
                        w = a[p0 + j, h] * total[h]
                        a[p0 + j, h] = w
                        if dropping:
                            w *= drop[b, k, p0 + j, h]
                        block_sum[m, h] += w
                        base = h * C
                        for c in range(C):
                            o[base + c] += w * x[base + c]
            for m in range(M):
                for h in range(H):
                    for c in range(C):
                        o[h * C + c] += block_sum[m, h] * bias[m, h * C + c]


@numba.njit(**_JIT)
def gatv2_attention_backward(q, q_cls, xls, bias, att, starts, offsets, lengths, consts, drop, alpha, d_out,
                             d_alpha, dq, dq_cls, dxls, dbias, datt):  # pragma: no cover - compiled
    """Gradients of :func:`gatv2_attention_forward` (same ``drop``) for ``d_out`` [B, K, H*C] and ``d_alpha``
    [B, K, N, H] (alpha before dropout):
    written into ``dxls`` (like xls; the valid rows only, once each) and added to the zero-initialised dq, dq_cls (like q), dbias
    (like bias) and datt (like att). Per sample, one pass over its rows per target for d alpha, then one pass
    for everything else with the targets innermost, so that each dxl row is written once. The channel loops
    run over a flat row (datt, the score grad and dq in one, dxl in the next), which LLVM vectorises; one loop
    per head updating dxl, dq and datt at once measured ~5x slower."""
    B, K, M, H, C, s, one, zero = _sizes(q, xls, att, consts)
    HC = H * C
    dropping = drop.shape[0] > 0
    att_flat, datt_flat = att.reshape(HC), datt.reshape(HC)
    gz = np.empty(HC, dtype=d_out.dtype)  # per channel: a head's d score, then d score / d z
    ga = np.empty(HC, dtype=d_out.dtype)  # per channel: its head's alpha
    g = np.empty((K, alpha.shape[2], H), dtype=d_out.dtype)  # d alpha, then d score
    dot = np.empty((K, H), dtype=d_out.dtype)
    dob = np.empty(H, dtype=d_out.dtype)
    qb = np.empty((K, 2, HC), dtype=d_out.dtype)
    block_sum = np.empty((K, M, H), dtype=d_out.dtype)
    for b in range(B):
        dot[:] = zero
        for k in range(K):  # d alpha = d_alpha + drop * d_out . (x + bias) per head
            a, do = alpha[b, k], d_out[b, k]
            for m in range(M):
                x_m, row0, p0 = xls[m], offsets[m, b], starts[m]
                for h in range(H):
                    acc = zero
                    for c in range(h * C, (h + 1) * C):
                        acc += do[c] * bias[m, c]
                    dob[h] = acc
                for j in range(lengths[m, b]):
                    x = x_m[row0 + j]
                    for h in range(H):
                        acc = dob[h]
                        base = h * C
                        for c in range(C):
                            acc += do[base + c] * x[base + c]
                        if dropping:
                            acc *= drop[b, k, p0 + j, h]
                        acc += d_alpha[b, k, p0 + j, h]
                        g[k, p0 + j, h] = acc
                        dot[k, h] += a[p0 + j, h] * acc
        block_sum[:] = zero
        for m in range(M):  # softmax, scores, and alpha * d_out: into dxl, dq, datt
            x_m, dx_m, row0, p0 = xls[m], dxls[m], offsets[m, b], starts[m]
            for k in range(K):
                for i in range(HC):
                    qb[k, 0, i] = q_cls[b, k, m, i] + bias[m, i]
                    qb[k, 1, i] = q[b, k, m, i] + bias[m, i]
            for j in range(lengths[m, b]):
                x, dx = x_m[row0 + j], dx_m[row0 + j]
                for k in range(K):
                    qk = qb[k, min(j, 1)]
                    dqk = (dq_cls if j == 0 else dq)[b, k, m]
                    do = d_out[b, k]
                    for h in range(H):
                        w = alpha[b, k, p0 + j, h]
                        gz[h * C:(h + 1) * C] = w * (g[k, p0 + j, h] - dot[k, h])
                        if dropping:
                            w *= drop[b, k, p0 + j, h]
                        block_sum[k, m, h] += w
                        ga[h * C:(h + 1) * C] = w
                    for i in range(HC):
                        z = qk[i] + x[i]
                        gi = gz[i]
                        datt_flat[i] += gi * (z if z > 0 else s * z)
                        gi = gi * att_flat[i] * (one if z > 0 else s)
                        gz[i] = gi
                        dqk[i] += gi
                    if k == 0:
                        for i in range(HC):
                            dx[i] = gz[i] + ga[i] * do[i]
                    else:
                        for i in range(HC):
                            dx[i] += gz[i] + ga[i] * do[i]
        for k in range(K):  # the bias: through the scores (dq, dq_cls) and the messages
            do = d_out[b, k]
            for m in range(M):
                for h in range(H):
                    for c in range(h * C, (h + 1) * C):
                        dbias[m, c] += dq[b, k, m, c] + dq_cls[b, k, m, c] + block_sum[k, m, h] * do[c]


# ------------------------------------------------------------------------------------------- torch side


def _numpy(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _inputs(q: Tensor, q_cls: Tensor, xls: list[Tensor], bias: Tensor, att: Tensor, rows, slope: float) -> list:
    """The kernels' leading arguments as numpy arrays: features in q's dtype (a narrower xl is widened), the
    rows' arrays per backbone and their layout (a :class:`hada.model.fast.dense.ValidRows`)."""
    q_, q_cls_, bias_, att_ = (_numpy(t, q.dtype) for t in (q, q_cls, bias, att))
    arrays = [_numpy(x, q.dtype) for x in xls]
    xls_ = tuple(arrays[i] for i in rows.source)  # per backbone
    consts = np.array([slope, 1.0], dtype=q_.dtype)
    return [q_, q_cls_, xls_, bias_, att_, *rows.index_arrays(), consts]


def _drop(drop: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """The dropout weights [B, K, N, H] for the kernels, or an empty array (no dropout)."""
    return torch.zeros(0, 0, 0, 0, dtype=dtype).numpy() if drop is None else _numpy(drop, dtype)


def gatv2_cls_attention(q: Tensor, q_cls: Tensor, xls: list[Tensor], bias: Tensor, att: Tensor, rows,
                        slope: float, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, K, H*C], alpha [B, K, N, H]) in q's dtype, without autograd (``hada.model.fast.dense.GatV2ClsAttention``
    wraps it). ``drop`` [B, K, N, H]: the attention dropout's weights of the messages (0 or 1 / (1 - p)), None
    for none; alpha is the softmax before dropout."""
    B, K, H = q.shape[0], q.shape[1], att.shape[0]
    alpha = torch.zeros(B, K, rows.num_nodes, H, dtype=q.dtype)  # padding keeps its 0
    out = torch.empty(B, K, q.shape[-1], dtype=q.dtype)
    gatv2_attention_forward(*_inputs(q, q_cls, xls, bias, att, rows, slope), _drop(drop, q.dtype), alpha.numpy(),
                            out.numpy())
    return out, alpha


def gatv2_cls_attention_grads(q: Tensor, q_cls: Tensor, xls: list[Tensor], bias: Tensor, att: Tensor, rows,
                              slope: float, alpha: Tensor, d_out: Tensor, d_alpha: Tensor,
                              drop: Tensor | None = None) -> tuple[Tensor, ...]:
    """Gradients (dq, dq_cls, dbias, datt, *dxls) of :func:`gatv2_cls_attention` (same ``drop``); each dxl in
    its xl's dtype."""
    dq, dq_cls = torch.zeros_like(q), torch.zeros_like(q_cls)
    dbias, datt = torch.zeros(bias.shape, dtype=q.dtype), torch.zeros(att.shape, dtype=q.dtype)
    # the kernel writes every valid row once; rows read in place from a padded tensor leave padding unwritten
    dxls = [(torch.zeros if rows.in_place else torch.empty)(x.shape, dtype=q.dtype) for x in xls]
    gatv2_attention_backward(*_inputs(q, q_cls, xls, bias, att, rows, slope), _drop(drop, q.dtype),
                             _numpy(alpha, q.dtype),
                             _numpy(d_out, q.dtype), _numpy(d_alpha, q.dtype), dq.numpy(), dq_cls.numpy(),
                             tuple(dxls[i].numpy() for i in rows.source), dbias.numpy(), datt.numpy())
    return (dq, dq_cls, dbias.to(bias.dtype), datt.to(att.dtype), *(d.to(x.dtype) for d, x in zip(dxls, xls)))
