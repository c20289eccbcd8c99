"""The dense backend: the published graph on padded ``[batch, nodes, width]`` tensors, computing only what is
read (the K CLS nodes). :func:`hada.model.fast.encode_cls` is its entry point.

In the published graph (directed, no feature-feature edges) a feature node receives only its self loop, so
its update is a per-node transform that nothing reads after the last layer: attention is computed for the K
CLS nodes only. GATv2 needs ``x W_l`` at every node for its scores anyway and weights those messages per head
(on CPU in one fused kernel, :mod:`hada.model.fast.kernels`); GCN and TransformerConv pool in input space before their
(linear) value maps. Each function reads the torch_geometric convolution's own weights (``lin_l``, ``lin_r``,
``att``, ``lin_edge``, ``bias``, ...), so a model can switch between this backend and torch_geometric's
("pyg") at any time.

A convolution sees its input only through :class:`NodeFeatures`. In a one-layer model that is
:class:`ProjectedTokens`: the node features ``x = proj_m(tokens_m)`` are never built for every node. Pooling
and dot products with ``x`` are taken in token space and mapped once per CLS node, and a linear map of every
node (GATv2's ``x W_l``) is one product with the composite weight ``W_l P_m`` where that is cheaper. The
frozen tokens need no gradient, so the per-token backward is one weight-gradient product instead of three.
On CPU, GATv2's per-node map of the tokens is computed for the valid nodes only, packed per backbone
(:class:`ValidRows`), and handed to the fused kernels without a concatenation or its bias added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada.config import EdgeWeights
from hada.model.graph import padded_nodes


# ----------------------------------------------------------------------------------------------------------
# Node features as the convolutions read them


class NodeFeatures:
    """The node features x [B, N, W] (all backbones' nodes on one padded axis), by the four things a dense
    convolution does with them."""

    def cls(self, cls_pos: Tensor) -> Tensor:
        """x at the K CLS nodes: [B, K, W]. Computed once: a layer reads it for its queries and the model again
        for the skip connection (a second gather would cost a second full-size zero gradient)."""
        if getattr(self, "_cls", None) is None:
            self._cls = self._gather_cls(cls_pos)
        return self._cls

    def _gather_cls(self, cls_pos: Tensor) -> Tensor:
        raise NotImplementedError

    def linear(self, lin: nn.Module) -> Tensor:
        """``lin(x)`` at every node: [B, N, out] (``lin`` has ``weight`` [out, W] and ``bias`` or None)."""
        raise NotImplementedError

    def linear_rows(self, lin: nn.Module, mask: Tensor, layout: "DenseLayout"
                    ) -> tuple["ValidRows", list[Tensor], Tensor]:
        """``lin(x)`` for the fused kernels: (where the valid nodes' rows are, the arrays holding the rows
        ``x W^T``, each block's bias [M, out]). No block is concatenated or split, and the bias is left to the
        kernels (no pass over the rows to add it)."""
        raise NotImplementedError

    def pool(self, weights: Tensor) -> Tensor:
        """``sum_n weights[b, k, n, h] x[b, n]``: [B, K, H, W] for weights [B, K, N, H]."""
        raise NotImplementedError

    def dot(self, v: Tensor) -> Tensor:
        """``v[b, k, h] . x[b, n]``: [B, K, N, H] for v [B, K, H, W]."""
        raise NotImplementedError


class MaterialisedNodes(NodeFeatures):
    """x held as one [B, N, W] tensor (layers after the first, and the first when a later one reads it)."""

    def __init__(self, x: Tensor):
        self.x = x

    def _gather_cls(self, cls_pos: Tensor) -> Tensor:
        return self.x[:, cls_pos]

    def linear(self, lin: nn.Module) -> Tensor:
        return F.linear(self.x, lin.weight, lin.bias)

    def linear_rows(self, lin: nn.Module, mask: Tensor, layout: "DenseLayout"
                    ) -> tuple["ValidRows", list[Tensor], Tensor]:
        rows = ValidRows.padded(mask, layout)  # read in place: x is materialised anyway
        return rows, rows.pack(F.linear(self.x, lin.weight)), _block_bias(lin, len(layout.blocks))

    def pool(self, weights: Tensor) -> Tensor:
        return torch.einsum("bknh,bnw->bkhw", weights, self.x)

    def dot(self, v: Tensor) -> Tensor:
        return torch.einsum("bkhw,bnw->bknh", v, self.x)


class ProjectedTokens(NodeFeatures):
    """x = ``projs[m](tokens[m])`` block by block, without materialising it for every node."""

    def __init__(self, tokens: list[Tensor], projs: nn.ModuleList):
        self.tokens, self.projs = tokens, list(projs)
        self.blocks = []
        start = 0
        for t in tokens:
            self.blocks.append((start, start + t.shape[1]))
            start += t.shape[1]

    def project(self) -> Tensor:
        """The materialised x [B, N, W]."""
        return torch.cat([proj(t) for proj, t in zip(self.projs, self.tokens)], dim=1)

    def _gather_cls(self, cls_pos: Tensor) -> Tensor:  # each block's CLS token is its first
        return torch.stack([proj(t[:, 0]) for proj, t in zip(self.projs, self.tokens)], dim=1)

    def linear(self, lin: nn.Module) -> Tensor:
        out = []
        for proj, t in zip(self.projs, self.tokens):
            weight, bias = self._folded(lin, proj, t)
            out.append(F.linear(t, weight, bias) if weight is not None else F.linear(proj(t), lin.weight, lin.bias))
        return torch.cat(out, dim=1)

    def linear_rows(self, lin: nn.Module, mask: Tensor, layout: "DenseLayout"
                    ) -> tuple["ValidRows", list[Tensor], Tensor]:
        rows = ValidRows.build(mask, layout)  # only the valid tokens are mapped
        xls, biases = [], []
        for proj, t in zip(self.projs, rows.pack_blocks(self.tokens)):
            weight, bias = self._folded(lin, proj, t)
            xls.append(F.linear(t, weight) if weight is not None else F.linear(proj(t), lin.weight))
            biases.append(bias if weight is not None else _block_bias(lin, 1)[0])
        return rows, xls, torch.stack(biases)

    @staticmethod
    def _folded(lin: nn.Module, proj: nn.Module, t: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(weight, bias) of ``lin(proj(t))`` as one linear map of the tokens t [..., D] where that is cheaper,
        else (None, None)."""
        if not _fold_is_cheaper(t, proj.weight.shape[0], lin.weight.shape[0]):
            return None, None
        weight = lin.weight @ proj.weight  # [out, D]: x W^T = t (W P)^T + W p
        bias = lin.weight @ proj.bias if lin.bias is None else torch.addmv(lin.bias, lin.weight, proj.bias)
        return weight, bias

    def pool(self, weights: Tensor) -> Tensor:
        pooled = 0
        for proj, t, (lo, hi) in zip(self.projs, self.tokens, self.blocks):
            w = weights[:, :, lo:hi]
            in_tokens = torch.einsum("bknh,bnd->bkhd", w, t)  # pool the block's tokens, then map once
            pooled = pooled + F.linear(in_tokens, proj.weight) + w.sum(2).unsqueeze(-1) * proj.bias
        return pooled

    def dot(self, v: Tensor) -> Tensor:
        scores = []
        for proj, t in zip(self.projs, self.tokens):
            v_tokens = v @ proj.weight  # [B, K, H, D]: v . (P t + p) = (v P) . t + v . p
            scores.append(torch.einsum("bkhd,bnd->bknh", v_tokens, t) + (v @ proj.bias).unsqueeze(2))
        return torch.cat(scores, dim=2)


def _block_bias(lin: nn.Module, blocks: int) -> Tensor:
    """``lin``'s bias (zeros without one) for each of ``blocks`` blocks: [blocks, out]."""
    out = lin.weight.shape[0]
    if lin.bias is None:
        return lin.weight.new_zeros(blocks, out)
    return lin.bias.expand(blocks, out)


def _fold_is_cheaper(tokens: Tensor, width: int, out: int) -> bool:
    """Whether ``lin(proj(t))`` costs fewer multiply-adds per training step as one product with the folded
    weight (per token D*out forward + D*out weight gradient, plus out*W*D three times for the fold) than as
    two (D*W + W*out forward; W*out + W*out + D*W backward: lin's input and weight, proj's weight)."""
    n = tokens.numel() // tokens.shape[-1]
    D = tokens.shape[-1]
    folded = 2 * n * D * out + 3 * out * width * D
    unfolded = n * (2 * D * width + 3 * width * out)
    return folded <= unfolded


# ----------------------------------------------------------------------------------------------------------
# Layout of the padded node axis


@dataclass
class DenseLayout:
    """Static facts of the padded node axis: backbone k's tokens occupy ``[start_k, start_k + N_k)``."""

    cls_pos: Tensor  # [K] long, position of each backbone's CLS token
    node_backbone: Tensor  # [N] long
    node_token: Tensor  # [N] long, token index inside its backbone
    edge_weight: Tensor  # [K, N] float, weight of the edge node n -> CLS k (published graph)
    w_self: float  # weight of every self loop (a feature node's only incoming edge)
    blocks: list[tuple[int, int]]  # [start, end) of each backbone's tokens on the node axis
    block_weight: Tensor  # [K, M=K] weight of a feature edge from backbone m to CLS k (w_fc on the diagonal)
    cls_weight: Tensor  # [K, M=K] weight of the edge CLS m -> CLS k (w_self on the diagonal, else w_cc)
    mean_self_loops: bool = False  # a CLS node's self loop weighs the mean of its other incoming edges

    @classmethod
    def build(cls, sizes: list[int], weights: EdgeWeights, device) -> "DenseLayout":
        K = len(sizes)
        starts, node_backbone, node_token = padded_nodes(tuple(sizes), device)
        own = node_backbone[None, :] == torch.arange(K, device=device)[:, None]
        is_cls = (node_token == 0)[None, :]
        w = torch.where(own, weights.w_fc, weights.w_fcx)
        w = torch.where(is_cls, torch.where(own, weights.w_self, weights.w_cc), w)
        blocks = [(sum(sizes[:k]), sum(sizes[: k + 1])) for k in range(K)]
        eye = torch.eye(K, dtype=torch.bool, device=device)
        block_weight = torch.where(eye, weights.w_fc, weights.w_fcx).float()
        cls_weight = torch.where(eye, weights.w_self, weights.w_cc).float()
        return cls(starts, node_backbone, node_token, w.float(), float(weights.w_self), blocks, block_weight,
                   cls_weight, weights.self_loops == "mean")


@lru_cache(maxsize=256)
def dense_layout(sizes: tuple[int, ...], weights: EdgeWeights, device: torch.device) -> DenseLayout:
    """Layouts are constants of the padded sizes: build each once (saves small host->device copies).
    Built outside inference mode, so a layout cached during evaluation can be saved for backward later."""
    with torch.inference_mode(False):
        return DenseLayout.build(list(sizes), weights, device)


@dataclass
class ValidRows:
    """Where the fused kernels find each valid node's row: sample b's tokens of backbone m are rows
    ``offsets[m, b]`` to ``offsets[m, b] + lengths[m, b]`` (its CLS first) of input array ``source[m]``.

    :meth:`build` packs the valid nodes backbone by backbone (array m holds block m's rows [R_m, C]).
    Captions are padded to the batch's longest (~40% padding in the embedded default): packing spends no
    product on padding, and a block without padding (images) packs as a view. :meth:`padded` reads a
    materialised [B, N, C] tensor in place instead (one array, padding rows skipped): a deeper model has
    that tensor anyway, and slicing it per block would cost a full-size zero gradient per block."""

    lengths: Tensor  # [K, B] int64
    offsets: Tensor  # [K, B] int64
    starts: Tensor  # [K] int64, backbone m's first position on the padded node axis
    index: list[Tensor | None]  # per backbone m: the valid rows of [B * N_m] in order, None if all are
    num_nodes: int  # N, the padded node axis
    source: list[int]  # per backbone m: which input array holds its rows
    in_place: bool = False  # rows are read from the padded tensor (padding rows get a zero gradient)

    @classmethod
    def build(cls, mask: Tensor, layout: DenseLayout) -> "ValidRows":
        masks = [mask[:, lo:hi] for lo, hi in layout.blocks]
        lengths = torch.stack([m.sum(1) for m in masks])
        offsets = torch.cumsum(lengths, 1) - lengths
        index = [None if bool(m.all()) else m.reshape(-1).nonzero().squeeze(1) for m in masks]
        return cls(lengths, offsets, layout.cls_pos, index, mask.shape[1], list(range(len(masks))))

    @classmethod
    def padded(cls, mask: Tensor, layout: DenseLayout) -> "ValidRows":
        B, N = mask.shape
        K = len(layout.blocks)
        lengths = torch.stack([mask[:, lo:hi].sum(1) for lo, hi in layout.blocks])
        offsets = torch.arange(B, device=mask.device) * N + layout.cls_pos.unsqueeze(1)
        return cls(lengths, offsets, layout.cls_pos, [None] * K, N, [0] * K, True)

    def index_arrays(self) -> list:
        """(starts, offsets, lengths) as int64 numpy arrays, for the kernels (converted once per batch)."""
        if not hasattr(self, "_arrays"):
            self._arrays = [t.detach().to(torch.int64).contiguous().numpy()
                            for t in (self.starts, self.offsets, self.lengths)]
        return self._arrays

    def pack_blocks(self, blocks: list[Tensor]) -> list[Tensor]:
        """Per backbone [B, N_m, C] -> [R_m, C] (packed rows only)."""
        out = []
        for t, index in zip(blocks, self.index):
            rows = t.reshape(-1, t.shape[-1])
            out.append(rows if index is None else rows.index_select(0, index))
        return out

    def pack(self, x: Tensor) -> list[Tensor]:
        """[B, N, C] on the padded node axis -> the kernels' input arrays."""
        if self.in_place:
            return [x.reshape(-1, x.shape[-1])]
        bounds = self.starts.tolist() + [x.shape[1]]
        return self.pack_blocks([x[:, lo:hi] for lo, hi in zip(bounds, bounds[1:])])


@dataclass
class DenseOut:
    cls: Tensor  # [B, K, C_out] conv output at the CLS nodes
    all: Tensor | None  # [B, N, C_out] conv output at every node (only when a later layer reads it)
    attention: Tensor  # [B, K, H, N] weight of every node in each CLS node's aggregation (0 at padding)


def _full(t: Tensor) -> Tensor:
    """A half-precision tensor (bfloat16 autocast output) as float32; float32/float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _masked_softmax(score: Tensor, mask: Tensor) -> Tensor:
    """Softmax (at least float32) over the node axis (dim 2) of [B, K, N, H] scores; padding gets exactly 0."""
    return torch.softmax(_full(score).masked_fill(~mask[:, None, :, None], float("-inf")), dim=2)


def _with_cls(all_nodes: Tensor, cls_out: Tensor, cls_pos: Tensor) -> Tensor:
    """Replace the CLS rows of a per-node update by the CLS nodes' aggregated outputs."""
    return all_nodes.index_copy(1, cls_pos, cls_out)


#: Elements of the [chunk, K, N, H*C] working buffers of :class:`GatV2ClsScores` on CPU (about 1 MB of
#: float32): small enough to stay in cache, large enough to keep the Python loop short.
GATV2_CHUNK_ELEMENTS = 1 << 18
#: The same on a GPU, where the cost is kernel launches, not cache misses (128 MB of float32).
GATV2_CUDA_CHUNK_ELEMENTS = 1 << 25
#: On CPU, compute GATv2's scores, softmax and messages at the CLS nodes with the fused numba kernels of
#: :mod:`hada.model.fast.kernels` (:class:`GatV2ClsAttention`) instead of PyTorch ops (:class:`GatV2ClsScores`, softmax,
#: einsum), which remain the path on other devices.
FUSED_CPU_ATTENTION = True


def use_fused_kernels(device: torch.device | str) -> bool:
    """Whether GATv2's attention at the CLS nodes runs in the numba kernels (CPU tensors only: they read host
    memory) or in the tiled PyTorch ops (every other device, CUDA included)."""
    return FUSED_CPU_ATTENTION and torch.device(device).type == "cpu"


def _head_diagonal(full: Tensor) -> Tensor:
    """[H, H*C] -> [H, C]: row h's own head block (the gradient of a per-head dot product)."""
    H = full.shape[0]
    return full.view(H, H, -1).diagonal(dim1=0, dim2=1).t()


def _block_diagonal(att: Tensor) -> Tensor:
    """[H, C] -> [H, H*C]: row h holds att[h] in head h's columns. A per-head dot product (or the outer
    product of a per-head grad with att) becomes one small matrix product instead of a broadcast multiply
    and a sum (two passes over the tile and a temporary; broadcasting a size-1 last axis is slow on CPU)."""
    H, C = att.shape
    return (torch.eye(H, dtype=att.dtype, device=att.device).unsqueeze(-1) * att).reshape(H, H * C)


class GatV2ClsScores(torch.autograd.Function):
    """GATv2 scores of the K CLS targets over every node, without materialising [B, K, N, H*C] tensors.

    ``score[b, k, n, h] = sum_c att[h, c] * leaky_relu(q[b, k, m(n), h, c] + xl[b, n, h, c])`` where ``m(n)``
    is the backbone (block) of node n and ``q = x_k W_r + w(k, m) W_e`` already holds the edge term: in the
    published graph the weight of an edge into CLS k depends only on the source's backbone m and on whether
    the source is m's CLS (then ``q_cls`` is used). Eager PyTorch makes about ten passes over a freshly
    allocated B*K*N*H*C tensor (hundreds of MB at the paper's shapes); here the work is cut into
    (samples x nodes) tiles that live in reused, cache-sized buffers, and the backward splits
    leaky_relu(z) = s*z + (1-s)*relu(z): the linear part needs only per-block and per-node sums of the grad.
    Per-head products with ``att`` are matrix products with its block-diagonal form. (On CPU,
    :class:`GatV2ClsAttention` replaces this, the softmax and the messages by fused kernels.)

    Runs with autocast off, in ``q``'s dtype (:func:`dense_gatv2` passes float32 on CPU, where bfloat16
    element-wise kernels are slower than float32 ones). ``xl`` may be narrower (bfloat16 from an autocast
    linear): it is widened tile by tile and its gradient is returned in its own dtype, so no full-size
    float32 copy of ``xl`` or of its gradient is ever allocated (at the paper's shapes each would be
    ~190 MB of fresh, page-faulting memory per step).
    """

    @staticmethod
    def _tiles(B: int, K: int, HC: int, blocks: list[tuple[int, int]], device: torch.device):
        """(samples, block, node range) tiles of at most ~GATV2_CHUNK_ELEMENTS elements, and the largest."""
        budget = GATV2_CHUNK_ELEMENTS if device.type == "cpu" else GATV2_CUDA_CHUNK_ELEMENTS
        rows = max(1, budget // (K * HC))  # (sample, node) pairs per tile
        tiles, largest = [], 1
        for m, (lo, hi) in enumerate(blocks):
            n_block = hi - lo
            nb = min(B, max(1, rows // max(1, n_block)))
            nn = n_block if nb > 1 else min(n_block, rows)
            largest = max(largest, nb * nn)
            for b in range(0, B, nb):
                for n in range(lo, hi, nn):
                    tiles.append((slice(b, min(B, b + nb)), m, slice(n, min(hi, n + nn)), n == lo))
        return tiles, largest

    @staticmethod
    def _xl_tile(xbuf: Tensor | None, xl: Tensor, bs: slice, ns: slice) -> Tensor:
        """xl[bs, ns] in the compute dtype: a view when xl already has it, else widened into ``xbuf``."""
        tile = xl[bs, ns]
        if xbuf is None:
            return tile
        return xbuf[: tile.numel()].view(tile.shape).copy_(tile)

    @staticmethod
    def _z(buf: Tensor, q: Tensor, q_cls: Tensor, x: Tensor, bs: slice, m: int, has_cls: bool):
        """Pre-activation tile [nb, K, nn, H*C] = q[b, k, m] + x[b, n] (``x`` = the xl tile), in ``buf``."""
        nb, K, nn, HC = x.shape[0], q.shape[1], x.shape[1], q.shape[3]
        z = buf[: nb * K * nn * HC].view(nb, K, nn, HC)
        torch.add(q[bs, :, m].unsqueeze(2), x.unsqueeze(1), out=z)
        if has_cls:  # the block's first node is backbone m's CLS: self loop or CLS <-> CLS weight
            torch.add(q_cls[bs, :, m], x[:, 0].unsqueeze(1), out=z[:, :, 0])
        return z

    @staticmethod
    def _buffers(q: Tensor, xl: Tensor, largest: int):
        """Tile buffers: z [largest * K * H*C] and, when xl is narrower than q, its widened tile."""
        K, HC = q.shape[1], q.shape[3]
        xbuf = q.new_empty(largest * HC) if xl.dtype != q.dtype else None
        return q.new_empty(largest * K * HC), xbuf

    @staticmethod
    def forward(ctx, q: Tensor, q_cls: Tensor, xl: Tensor, att: Tensor, blocks: list[tuple[int, int]],
                slope: float):
        B, K, _, HC = q.shape
        N, H = xl.shape[1], att.shape[0]
        tiles, largest = GatV2ClsScores._tiles(B, K, HC, blocks, xl.device)
        with torch.autocast(xl.device.type, enabled=False):
            att_block = _block_diagonal(att)  # [H, H*C]
            buf, xbuf = GatV2ClsScores._buffers(q, xl, largest)
            sbuf = q.new_empty(largest * K * H)
            out = q.new_empty(B, K, N, H)
            for bs, m, ns, has_cls in tiles:
                x = GatV2ClsScores._xl_tile(xbuf, xl, bs, ns)
                z = F.leaky_relu_(GatV2ClsScores._z(buf, q, q_cls, x, bs, m, has_cls), slope)
                rows = z.numel() // HC
                # [H, H*C] @ z^T: a wide product, ~3x faster on CPU than z @ [H*C, H] (4 output columns)
                score_t = torch.mm(att_block, z.view(rows, HC).t(), out=sbuf[: rows * H].view(H, rows))
                out[bs, :, ns] = score_t.t().view(*z.shape[:3], H)
        ctx.save_for_backward(q, q_cls, xl, att)
        ctx.blocks, ctx.slope = blocks, slope
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return GatV2ClsScores._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: Tensor):
        q, q_cls, xl, att = ctx.saved_tensors
        blocks, s = ctx.blocks, ctx.slope
        B, K, M, HC = q.shape
        H, C = att.shape
        grad = grad.to(q.dtype).contiguous()
        g_cls = torch.stack([grad[:, :, lo] for lo, _ in blocks], 2)  # [B, K, M, H]
        g_block = torch.stack([grad[:, :, lo + 1:hi].sum(2) for lo, hi in blocks], 2)  # [B, K, M, H]
        g_node = grad.sum(1)  # [B, N, H]
        # linear part s*z: sums of the grad per block / per node (the xl terms are added tile by tile)
        att_block = _block_diagonal(att)  # [H, H*C]
        att_lin, att_relu = s * att_block, (1 - s) * att  # [H, H*C] and [H, C]
        dq = (g_block.reshape(-1, H) @ att_lin).view(B, K, M, HC)
        dq_cls = (g_cls.reshape(-1, H) @ att_lin).view(B, K, M, HC)
        d_lin = g_block.reshape(-1, H).t() @ q.reshape(-1, HC)  # att's grad through s*z, [H, H*C]
        d_lin.addmm_(g_cls.reshape(-1, H).t(), q_cls.reshape(-1, HC))
        d_relu = torch.zeros_like(d_lin)  # ... and through relu(z)
        dxl = torch.empty_like(xl)  # in xl's dtype, written once per tile
        tiles, largest = GatV2ClsScores._tiles(B, K, HC, blocks, xl.device)
        buf, xbuf = GatV2ClsScores._buffers(q, xl, largest)
        gbuf, dxbuf = q.new_empty(largest * K * HC), q.new_empty(largest * HC)
        for bs, m, ns, has_cls in tiles:
            x = GatV2ClsScores._xl_tile(xbuf, xl, bs, ns)  # [nb, nn, H*C]
            gn = g_node[bs, ns].reshape(-1, H)  # [nb * nn, H]
            d_lin.addmm_(gn.t(), x.reshape(-1, HC))
            z = GatV2ClsScores._z(buf, q, q_cls, x, bs, m, has_cls).relu_()
            g = grad[bs, :, ns].reshape(-1, H)  # [nb * K * nn, H]
            d_relu.addmm_(g.t(), z.reshape(-1, HC))
            ga = gbuf[: z.numel()].view(z.shape)
            torch.mul(g.view(-1, H, 1), att_relu, out=ga.view(-1, H, C))  # per-head outer product
            torch.ops.aten.threshold_backward.grad_input(ga, z, 0.0, grad_input=ga)  # (1-s) g att [z > 0]
            if has_cls:
                dq_cls[bs, :, m] += ga[:, :, 0]
                dq[bs, :, m] += ga[:, :, 1:].sum(2)
            else:
                dq[bs, :, m] += ga.sum(2)
            dx = dxbuf[: x.numel()].view(x.shape)  # relu part, summed over the targets k
            if K == 1:  # one backbone: a single target, nothing to add
                dx.copy_(ga[:, 0])
            else:
                torch.add(ga[:, 0], ga[:, 1], out=dx)
            for k in range(2, K):  # over the targets k (adds: faster than a sum over a middle axis)
                dx.add_(ga[:, k])
            dx.view(-1, HC).addmm_(gn, att_lin)  # + linear part
            dxl[bs, ns] = dx
        d_att = d_lin.mul_(s).add_(d_relu, alpha=1 - s)
        return dq, dq_cls, dxl, _head_diagonal(d_att), None, None


class GatV2ClsAttention(torch.autograd.Function):
    """GATv2 at the K CLS targets in one fused CPU kernel each way (:mod:`hada.model.fast.kernels`): the scores of
    :class:`GatV2ClsScores`, their softmax over the valid nodes and the per-head weighted sum of ``xl``, read
    from the packed rows ``xls`` of :class:`ValidRows` (no padding, no concatenated copy) plus their block's
    ``bias`` [M, H*C].
    ``drop`` [B, K, N, H] (or None) weighs each coefficient in the messages: the attention dropout of
    :func:`attention_dropout`, applied inside the kernels as torch_geometric applies it to alpha.
    Returns (messages [B, K, H*C] without the conv's bias, alpha [B, K, N, H] before dropout, 0 at padding), in
    q's dtype."""

    @staticmethod
    def forward(ctx, q: Tensor, q_cls: Tensor, bias: Tensor, att: Tensor, rows: ValidRows, slope: float,
                drop: Tensor | None, *xls: Tensor):
        from hada.model.fast.kernels import gatv2_cls_attention

        out, alpha = gatv2_cls_attention(q, q_cls, list(xls), bias, att, rows, slope, drop)
        ctx.save_for_backward(q, q_cls, bias, att, alpha, *xls)
        ctx.rows, ctx.slope, ctx.drop = rows, slope, drop
        return out, alpha

    @staticmethod
    def backward(ctx, d_out: Tensor, d_alpha: Tensor):
        from hada.model.fast.kernels import gatv2_cls_attention_grads

        q, q_cls, bias, att, alpha, *xls = ctx.saved_tensors
        d_out = torch.zeros(alpha.shape[:2] + q.shape[-1:], dtype=q.dtype) if d_out is None else d_out
        d_alpha = torch.zeros_like(alpha) if d_alpha is None else d_alpha
        dq, dq_cls, dbias, datt, *dxls = gatv2_cls_attention_grads(q, q_cls, xls, bias, att, ctx.rows, ctx.slope,
                                                                   alpha, d_out, d_alpha, ctx.drop)
        return dq, dq_cls, dbias, datt, None, None, None, *dxls


def dense_gatv2(conv, x: NodeFeatures, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """GATv2Conv (edge_dim=1, no added self loops) on the published graph, attention at the CLS nodes only.

    Same algebra as torch_geometric: score = att . leaky_relu(x_i W_r + x_j W_l + w_ji W_e), softmax over the
    sources of each CLS node i, out_i = sum_j alpha_ij x_j W_l + bias; a feature node's only source is
    itself, so its output is x W_l + bias.
    """
    H, C = conv.heads, conv.out_channels
    K = layout.cls_pos.numel()
    xr = conv.lin_r(x.cls(layout.cls_pos))  # [B, K, H*C]
    B = xr.shape[0]
    w_edge = conv.lin_edge.weight.view(H * C)
    q = xr.unsqueeze(2) + layout.block_weight.unsqueeze(-1) * w_edge  # [B, K, M, H*C]
    q_cls = xr.unsqueeze(2) + cls_weights(layout, mask).unsqueeze(-1) * w_edge
    N = mask.shape[1]
    # dropout of the attention coefficients (GATv2Conv's ``dropout``): one weight per coefficient, 0 or 1/(1-p)
    drop = attention_dropout((B, K, N, H), conv.dropout, xr.device) if conv.training and conv.dropout > 0 else None
    fused = use_fused_kernels(xr.device)
    xl = x.linear(conv.lin_l) if need_all or not fused else None  # [B, N, H*C]
    # the score function computes in q's dtype (autocast may leave q in float32 and xl in bfloat16): xl's,
    # except float32 for a half type on CPU, whose element-wise kernels are slower than float32's there
    # (measured); xl itself is passed as it is and widened tile by tile (tiled ops) or whole (fused kernels)
    dt = conv.lin_l.weight.dtype if xl is None else xl.dtype
    if dt in (torch.bfloat16, torch.float16) and xr.device.type == "cpu":
        dt = torch.float32
    args = (q.to(dt), q_cls.to(dt))
    # the messages x_j W_l + b_l are xl itself (needed for the scores anyway), weighted per head
    if fused:
        if xl is None:
            rows, xls, bias = x.linear_rows(conv.lin_l, mask, layout)
        else:  # xl already holds its bias
            rows = ValidRows.padded(mask, layout)
            xls, bias = rows.pack(xl), xl.new_zeros(K, H * C)
        messages, alpha = GatV2ClsAttention.apply(*args, bias.to(dt), conv.att[0].to(dt), rows,
                                                  conv.negative_slope, None if drop is None else drop.to(dt), *xls)
    else:
        scores = GatV2ClsScores.apply(*args, xl, conv.att[0].to(dt), layout.blocks, conv.negative_slope)
        alpha = _masked_softmax(scores, mask)
        weights = alpha if drop is None else alpha * drop
        messages = torch.einsum("bknh,bnhc->bkhc", weights, xl.view(B, N, H, C)).reshape(B, K, H * C)
    out_cls = messages + conv.bias
    out_all = None
    if need_all:  # a feature node's one coefficient (its self loop, 1) is dropped like any other
        self_loops = xl
        if drop is not None:
            keep = self_loop_dropout(B, N, H, conv.dropout, xl.device).to(xl.dtype)
            self_loops = (xl.view(B, N, H, C) * keep.unsqueeze(-1)).view(B, N, H * C)
        out_all = _with_cls(self_loops + conv.bias, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, alpha.permute(0, 1, 3, 2))


def attention_dropout(shape: tuple[int, ...], p: float, device) -> Tensor:
    """Dropout weights of the attention coefficients at the CLS nodes, [B, K, N, H] float32: 0 with probability
    p, else 1 / (1 - p) (what ``F.dropout`` multiplies by). The messages use ``alpha * weights``; the attention
    the dense backend returns stays the softmax alpha (torch_geometric's GATv2Conv returns it after dropout, its
    TransformerConv before). Tests replace this function to give both backends one mask."""
    return torch.empty(shape, device=device).bernoulli_(1 - p).div_(1 - p)


def self_loop_dropout(B: int, N: int, H: int, p: float, device) -> Tensor:
    """Dropout weights of every node's self-loop coefficient, [B, N, H] (read for the feature nodes only, by a
    layer whose output a later layer reads)."""
    return attention_dropout((B, N, H), p, device)


def cls_weights(layout: DenseLayout, mask: Tensor) -> Tensor:
    """Weight of the edge CLS m -> CLS k: [K, M], or [B, K, M] with mean-filled self loops, where CLS k's self
    loop weighs the mean of its other incoming edges, which depends on the sample's valid nodes
    (:mod:`hada.model.graph`)."""
    if not layout.mean_self_loops:
        return layout.cls_weight
    K = layout.cls_pos.numel()
    incoming = (layout.edge_weight.unsqueeze(0) * mask.unsqueeze(1)).sum(-1) - layout.w_self  # [B, K]
    mean = incoming / (mask.sum(1, keepdim=True) - 1).clamp_min(1)
    eye = torch.eye(K, dtype=torch.bool, device=mask.device)
    return torch.where(eye, mean.unsqueeze(-1), layout.cls_weight)


def dense_gcn(conv, x: NodeFeatures, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """GCNConv (symmetric normalisation, edge weights, no added self loops) at the CLS nodes.

    deg_i sums the weights of i's incoming edges: w_self for a feature node, every valid node's edge weight
    for a CLS node. coef_ji = deg_j^-1/2 w_ji deg_i^-1/2; GCN's linear map has no bias, so the sum is taken
    in input space before it (K rows instead of N).
    """
    deg_cls = (layout.edge_weight.unsqueeze(0) * mask.unsqueeze(1)).sum(-1)  # [B, K]
    w_self = layout.w_self
    deg = torch.full(mask.shape, w_self, device=mask.device, dtype=deg_cls.dtype)
    deg = deg.index_copy(1, layout.cls_pos, deg_cls)
    dis = deg.pow(-0.5)
    coef = dis.unsqueeze(1) * layout.edge_weight.unsqueeze(0) * dis[:, layout.cls_pos].unsqueeze(-1)
    coef = coef * mask.unsqueeze(1)  # [B, K, N]
    out_cls = conv.lin(x.pool(coef.unsqueeze(-1))[:, :, 0]) + conv.bias
    out_all = None
    if need_all:
        self_coef = (dis * w_self * dis).unsqueeze(-1)
        out_all = _with_cls(self_coef * x.linear(conv.lin) + conv.bias, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, coef.unsqueeze(2))


def dense_transformer(conv, x: NodeFeatures, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """TransformerConv (edge_dim=1, root weight, no beta) at the CLS nodes, keys and values in input space.

    score_ij = q_i . (x_j W_k + b_k + w_ji e) / sqrt(C) = (q_i W_k^T) . x_j + q_i . b_k + w_ji q_i . e, and
    out_i = sum_j alpha_ij (x_j W_v + b_v + w_ji e) + x_i W_skip: both are linear in x_j, so only the K CLS
    rows pass through W_k / W_v. A feature node (self loop only): x W_v + b_v + w_self e + x W_skip.
    """
    H, C = conv.heads, conv.out_channels
    x_cls = x.cls(layout.cls_pos)
    B, K, W = x_cls.shape
    q = conv.lin_query(x_cls).view(B, K, H, C)
    e = conv.lin_edge.weight.view(H, C)
    w_key, b_key = conv.lin_key.weight.view(H, C, W), conv.lin_key.bias.view(H, C)
    score = x.dot(torch.einsum("bkhc,hcw->bkhw", q, w_key))
    score = score + torch.einsum("bkhc,hc->bkh", q, b_key).unsqueeze(2)
    score = score + layout.edge_weight[None, :, :, None] * torch.einsum("bkhc,hc->bkh", q, e).unsqueeze(2)
    alpha = _masked_softmax(score / math.sqrt(C), mask)  # [B, K, N, H]
    drop = conv.training and conv.dropout > 0
    weights = alpha * attention_dropout(alpha.shape, conv.dropout, alpha.device) if drop else alpha
    pooled = x.pool(weights)
    value = torch.einsum("bkhw,hcw->bkhc", pooled, conv.lin_value.weight.view(H, C, W))
    value = value + weights.sum(2).unsqueeze(-1) * conv.lin_value.bias.view(H, C)
    value = value + torch.einsum("bknh,kn->bkh", weights, layout.edge_weight).unsqueeze(-1) * e
    out_cls = value.reshape(B, K, H * C) + conv.lin_skip(x_cls)
    out_all = None
    if need_all:
        value = x.linear(conv.lin_value) + layout.w_self * e.reshape(H * C)
        if drop:  # a feature node's one coefficient (its self loop, 1) is dropped like any other
            N = mask.shape[1]
            keep = self_loop_dropout(B, N, H, conv.dropout, value.device).to(value.dtype)
            value = (value.view(B, N, H, C) * keep.unsqueeze(-1)).view(B, N, H * C)
        per_node = value + x.linear(conv.lin_skip)
        out_all = _with_cls(per_node, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, alpha.permute(0, 1, 3, 2))


DENSE_CONVS: dict[str, Callable[..., DenseOut]] = {
    "gatv2": dense_gatv2, "gcn": dense_gcn, "transformer": dense_transformer}
