"""HADA encoders: K frozen backbones' tokens -> one graph per sample -> GNN -> fused, L2-normalised embedding.

DESIGN section 1: each backbone's tokens get their own linear map to a common ``width``; a GNN (GATv2 in the
paper: one layer, 4 heads, concat, ``edge_dim=1``, then a linear back to ``width``; skip connections, GELU and
LayerNorm when there are more layers) runs on the graph of :mod:`hada.graph`; the readout concatenates the K
updated CLS nodes with each backbone's own (L2-normalised) projected embedding, applies dropout and one linear
layer to ``out_dim``, and L2-normalises.

Two backends compute the same numbers with the same parameter tensors:

* ``"pyg"`` builds the batched graph and runs torch_geometric's convolutions on every node and edge. It
  supports every edge option (undirected, feature-feature edges).
* ``"dense"`` works on padded ``[batch, nodes, width]`` tensors. In the published graph (directed, no
  feature-feature edges) a feature node receives only its self loop, so its update is a per-node transform
  that nothing reads after the last layer (DESIGN 2b): attention is computed for the K CLS nodes only, and
  GCN/Transformer aggregate in input space before their (linear) value maps. It reads the convolutions'
  own weights (``lin_l``, ``lin_r``, ``att``, ``lin_edge``, ``bias``, ...), so a model can switch backend.

``"auto"`` picks dense whenever the edge options allow it.

Two options trade the paper's exact setting for speed on a CPU (both off by default = the paper):
``head_dim`` (channels per head; the paper concatenates ``heads`` heads of ``width`` channels, so the
GATv2 attention works on ``heads * width`` channels per node pair) and ``precision="bf16"`` (the encoder's
matrix products under bfloat16 autocast; softmax, readout and L2 norm stay float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada.errors import HadaError
from hada.graph import EdgeWeights, GraphBatch, batch_graphs

GNN_TYPES = ("gatv2", "gcn", "transformer")
#: "fp32": everything in float32 (the paper). "bf16": the encoder's linear maps, attention scores and
#: pooling under ``torch.autocast(dtype=torch.bfloat16)`` (several times faster matrix products on CPUs with
#: AMX / AVX512-BF16); attention softmax, readout, L2 norm and everything in the loss stay float32.
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("auto", "dense", "pyg")
MODALITIES = ("image", "text")


@dataclass
class ModalityBatch:
    """One modality (image or text) of one batch, K backbones (see notes/INTERFACES.md)."""

    tokens: list[Tensor]  # per backbone k: [B, N_k, D_k] float32, CLS/pooled token first, zero-padded
    lengths: list[Tensor]  # per backbone k: [B] long, valid tokens incl. the CLS one (images: all N_k)
    embeds: list[Tensor]  # per backbone k: [B, E_k] float32, the backbone's own projected embedding

    @property
    def num_backbones(self) -> int:
        return len(self.tokens)

    @property
    def batch_size(self) -> int:
        return int(self.tokens[0].shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ModalityBatch":
        move = lambda xs: [x.to(device, non_blocking=non_blocking) for x in xs]  # noqa: E731
        return ModalityBatch(move(self.tokens), move(self.lengths), move(self.embeds))


def _dims(value) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


@dataclass
class HadaConfig:
    """Shape and options of a :class:`HadaPair`; defaults are the paper's (DESIGN section 1).

    ``token_dims`` / ``embed_dims`` give both modalities the same per-backbone widths; the ``image_*`` and
    ``text_*`` fields override them per modality (a CLIP's text tower is usually narrower than its ViT).
    """

    token_dims: tuple[int, ...] | None = None
    embed_dims: tuple[int, ...] | None = None
    image_token_dims: tuple[int, ...] | None = None
    text_token_dims: tuple[int, ...] | None = None
    image_embed_dims: tuple[int, ...] | None = None
    text_embed_dims: tuple[int, ...] | None = None
    width: int = 512
    out_dim: int = 512
    gnn: str = "gatv2"
    heads: int = 4
    head_dim: int | None = None  # channels per head; None: ``width`` (the paper: 4 heads x 512 concatenated)
    layers: int = 1
    dropout: float = 0.3
    w_fc: float = 0.9
    w_fcx: float = 0.7
    w_cc: float = 1.1
    w_ffx: float | None = None
    w_self: float = 1.0
    directed: bool = True
    backend: str = "auto"
    precision: str = "fp32"  # "bf16": the encoders' matrix products under bfloat16 autocast (PRECISIONS)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_dims"):
                setattr(self, f.name, _dims(getattr(self, f.name)))
        self.image_token_dims = self.image_token_dims or self.token_dims
        self.text_token_dims = self.text_token_dims or self.token_dims
        self.image_embed_dims = self.image_embed_dims or self.embed_dims
        self.text_embed_dims = self.text_embed_dims or self.embed_dims
        self._validate()

    def _validate(self) -> None:
        per_modality = {"image_token_dims": self.image_token_dims, "text_token_dims": self.text_token_dims,
                        "image_embed_dims": self.image_embed_dims, "text_embed_dims": self.text_embed_dims}
        missing = [name for name, v in per_modality.items() if v is None]
        if missing:
            raise HadaError(f"HadaConfig needs token_dims and embed_dims (or per modality); missing {missing}")
        if len({len(v) for v in per_modality.values()}) != 1:
            raise HadaError(f"HadaConfig: every *_dims needs one entry per backbone, got {per_modality}")
        if self.num_backbones < 2:
            raise HadaError(f"HADA fuses at least 2 backbones, got {self.num_backbones}")
        if self.gnn not in GNN_TYPES:
            raise HadaError(f"HadaConfig.gnn must be one of {GNN_TYPES}, got {self.gnn!r}")
        if self.backend not in BACKENDS:
            raise HadaError(f"HadaConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if min(self.width, self.out_dim, self.heads, self.layers) < 1:
            raise HadaError("HadaConfig: width, out_dim, heads and layers must be >= 1")
        if self.head_dim is not None and self.head_dim < 1:
            raise HadaError(f"HadaConfig.head_dim must be >= 1 or None (= width), got {self.head_dim}")
        if self.precision not in PRECISIONS:
            raise HadaError(f"HadaConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise HadaError(f"HadaConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.backend == "dense" and not self.edge_weights().published_topology:
            raise HadaError("the dense backend needs the published graph (directed=True, w_ffx=None); "
                            "use backend='pyg' or 'auto'")

    @classmethod
    def paper(cls, **overrides) -> "HadaConfig":
        """The paper's widths: ALBEF (768-d tokens, 256-d ITC embedding) + LightningDOT (768-d, 768-d)."""
        return cls(**{"token_dims": (768, 768), "embed_dims": (256, 768), **overrides})

    @property
    def num_backbones(self) -> int:
        return len(self.image_token_dims)

    def dims(self, modality: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(token_dims, embed_dims) of one modality."""
        if modality not in MODALITIES:
            raise HadaError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return getattr(self, f"{modality}_token_dims"), getattr(self, f"{modality}_embed_dims")

    def edge_weights(self) -> EdgeWeights:
        return EdgeWeights(self.w_fc, self.w_fcx, self.w_cc, self.w_ffx, self.w_self, self.directed)

    def resolve_backend(self, backend: str | None = None) -> str:
        """"dense" or "pyg": ``backend`` (or the config's), with "auto" -> dense when the graph allows it."""
        backend = backend or self.backend
        published = self.edge_weights().published_topology
        if backend == "auto":
            return "dense" if published else "pyg"
        if backend == "dense" and not published:
            raise HadaError("the dense backend needs the published graph (directed=True, w_ffx=None)")
        if backend not in BACKENDS:
            raise HadaError(f"backend must be one of {BACKENDS}, got {backend!r}")
        return backend


# ----------------------------------------------------------------------------------------------------------
# Convolutions (torch_geometric modules; their parameters are also what the dense backend reads)


def make_conv(gnn: str, width: int, heads: int, head_dim: int | None = None) -> tuple[nn.Module, int]:
    """One GNN layer and its output width (``heads * head_dim``; ``head_dim`` None = ``width``, the paper's).
    Self loops are explicit edges (hada.graph), never added here."""
    from torch_geometric.nn import GATv2Conv, GCNConv, TransformerConv

    C = head_dim or width
    if gnn == "gatv2":
        return GATv2Conv(width, C, heads=heads, concat=True, edge_dim=1, add_self_loops=False), heads * C
    if gnn == "gcn":  # GCN has no heads: one "head" of ``width`` channels
        return GCNConv(width, width, add_self_loops=False, normalize=True), width
    if gnn == "transformer":
        conv = TransformerConv(width, C, heads=heads, concat=True, beta=False, edge_dim=1, root_weight=True)
        return conv, heads * C
    raise HadaError(f"unknown gnn {gnn!r}; choose from {GNN_TYPES}")


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

    @classmethod
    def build(cls, sizes: list[int], weights: EdgeWeights, device) -> "DenseLayout":
        K = len(sizes)
        node_backbone = torch.repeat_interleave(torch.arange(K), torch.tensor(sizes)).to(device)
        starts = torch.tensor([sum(sizes[:k]) for k in range(K)], device=device)
        node_token = torch.arange(sum(sizes), device=device) - starts[node_backbone]
        own = node_backbone[None, :] == torch.arange(K, device=device)[:, None]
        is_cls = (node_token == 0)[None, :]
        w = torch.where(own, weights.w_fc, weights.w_fcx)
        w = torch.where(is_cls, torch.where(own, weights.w_self, weights.w_cc), w)
        blocks = [(sum(sizes[:k]), sum(sizes[: k + 1])) for k in range(K)]
        eye = torch.eye(K, dtype=torch.bool, device=device)
        block_weight = torch.where(eye, weights.w_fc, weights.w_fcx).float()
        cls_weight = torch.where(eye, weights.w_self, weights.w_cc).float()
        return cls(starts, node_backbone, node_token, w.float(), float(weights.w_self), blocks, block_weight,
                   cls_weight)


@lru_cache(maxsize=256)
def _dense_layout(sizes: tuple[int, ...], weights: EdgeWeights, device: torch.device) -> DenseLayout:
    """Layouts are constants of the padded sizes: build each once (saves small host->device copies).
    Built outside inference mode, so a layout cached during evaluation can be saved for backward later."""
    with torch.inference_mode(False):
        return DenseLayout.build(list(sizes), weights, device)


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
#: On CPU, compute the scores with the fused numba kernels of :mod:`hada.kernels` (one pass over ``xl``
#: forward, one backward) instead of the tiled PyTorch ops, which remain the path on other devices.
FUSED_CPU_SCORES = True


def _fused_scores(xl: Tensor) -> bool:
    return FUSED_CPU_SCORES and xl.device.type == "cpu"


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
    Per-head products with ``att`` are matrix products with its block-diagonal form. On CPU the fused
    kernels of :mod:`hada.kernels` do the same work in one pass each way (``FUSED_CPU_SCORES``).

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
        ctx.save_for_backward(q, q_cls, xl, att)
        ctx.blocks, ctx.slope = blocks, slope
        if _fused_scores(xl):
            from hada.kernels import gatv2_cls_scores

            return gatv2_cls_scores(q, q_cls, xl, att, blocks, slope)
        B, K, _, HC = q.shape
        N, (H, C) = xl.shape[1], att.shape
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
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, q_cls, xl, att = ctx.saved_tensors
        if _fused_scores(xl):
            from hada.kernels import gatv2_cls_scores_grads

            return *gatv2_cls_scores_grads(q, q_cls, xl, att, ctx.blocks, ctx.slope, grad), None, None
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
            dx = torch.add(ga[:, 0], ga[:, 1], out=dxbuf[: x.numel()].view(x.shape))  # relu part, summed
            for k in range(2, K):  # over the targets k (adds: faster than a sum over a middle axis)
                dx.add_(ga[:, k])
            dx.view(-1, HC).addmm_(gn, att_lin)  # + linear part
            dxl[bs, ns] = dx
        d_att = d_lin.mul_(s).add_(d_relu, alpha=1 - s)
        return dq, dq_cls, dxl, _head_diagonal(d_att), None, None


def dense_gatv2(conv, x: Tensor, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """GATv2Conv (edge_dim=1, no added self loops) on the published graph, attention at the CLS nodes only.

    Same algebra as torch_geometric: score = att . leaky_relu(x_i W_r + x_j W_l + w_ji W_e), softmax over the
    sources of each CLS node i, out_i = sum_j alpha_ij x_j W_l + bias; a feature node's only source is
    itself, so its output is x W_l + bias. Messages are pooled in input space before W_l (K rows, not N).
    """
    B, N, W = x.shape
    H, C = conv.heads, conv.out_channels
    K = layout.cls_pos.numel()
    xl = conv.lin_l(x)  # [B, N, H*C]
    xr = conv.lin_r(x[:, layout.cls_pos])  # [B, K, H*C]
    w_edge = conv.lin_edge.weight.view(H * C)
    q = xr.unsqueeze(2) + layout.block_weight.unsqueeze(-1) * w_edge  # [B, K, M, H*C]
    q_cls = xr.unsqueeze(2) + layout.cls_weight.unsqueeze(-1) * w_edge
    # the score function computes in q's dtype (autocast may leave q in float32 and xl in bfloat16): xl's,
    # except float32 for a half type on CPU, whose element-wise kernels are slower than float32's there
    # (measured); xl itself is passed as it is and widened tile by tile
    dt = xl.dtype
    if dt in (torch.bfloat16, torch.float16) and xl.device.type == "cpu":
        dt = torch.float32
    score = GatV2ClsScores.apply(q.to(dt), q_cls.to(dt), xl, conv.att[0].to(dt), layout.blocks,
                                 conv.negative_slope)
    alpha = _masked_softmax(score, mask)  # [B, K, N, H]
    pooled = torch.einsum("bknh,bnw->bkhw", alpha, x)
    out_cls = torch.einsum("bkhw,hcw->bkhc", pooled, conv.lin_l.weight.view(H, C, W))
    out_cls = (out_cls + conv.lin_l.bias.view(H, C)).reshape(B, K, H * C) + conv.bias
    out_all = None
    if need_all:
        out_all = _with_cls(xl + conv.bias, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, alpha.permute(0, 1, 3, 2))


def dense_gcn(conv, x: Tensor, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """GCNConv (symmetric normalisation, edge weights, no added self loops) at the CLS nodes.

    deg_i sums the weights of i's incoming edges: w_self for a feature node, every valid node's edge weight
    for a CLS node. coef_ji = deg_j^-1/2 w_ji deg_i^-1/2; GCN's linear map has no bias, so the sum is taken
    in input space before it (K rows instead of N).
    """
    deg_cls = (layout.edge_weight.unsqueeze(0) * mask.unsqueeze(1)).sum(-1)  # [B, K]
    w_self = layout.w_self
    deg = torch.full(mask.shape, w_self, device=x.device, dtype=deg_cls.dtype)
    deg = deg.index_copy(1, layout.cls_pos, deg_cls)
    dis = deg.pow(-0.5)
    coef = dis.unsqueeze(1) * layout.edge_weight.unsqueeze(0) * dis[:, layout.cls_pos].unsqueeze(-1)
    coef = coef * mask.unsqueeze(1)  # [B, K, N]
    out_cls = conv.lin(torch.einsum("bkn,bnw->bkw", coef, x)) + conv.bias
    out_all = None
    if need_all:
        self_coef = (dis * w_self * dis).unsqueeze(-1)
        out_all = _with_cls(self_coef * conv.lin(x) + conv.bias, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, coef.unsqueeze(2))


def dense_transformer(conv, x: Tensor, mask: Tensor, layout: DenseLayout, need_all: bool) -> DenseOut:
    """TransformerConv (edge_dim=1, root weight, no beta) at the CLS nodes, keys and values in input space.

    score_ij = q_i . (x_j W_k + b_k + w_ji e) / sqrt(C) = (q_i W_k^T) . x_j + q_i . b_k + w_ji q_i . e, and
    out_i = sum_j alpha_ij (x_j W_v + b_v + w_ji e) + x_i W_skip: both are linear in x_j, so only the K CLS
    rows pass through W_k / W_v. A feature node (self loop only): x W_v + b_v + w_self e + x W_skip.
    """
    B, N, W = x.shape
    H, C = conv.heads, conv.out_channels
    K = layout.cls_pos.numel()
    x_cls = x[:, layout.cls_pos]
    q = conv.lin_query(x_cls).view(B, K, H, C)
    e = conv.lin_edge.weight.view(H, C)
    w_key, b_key = conv.lin_key.weight.view(H, C, W), conv.lin_key.bias.view(H, C)
    score = torch.einsum("bkhw,bnw->bknh", torch.einsum("bkhc,hcw->bkhw", q, w_key), x)
    score = score + torch.einsum("bkhc,hc->bkh", q, b_key).unsqueeze(2)
    score = score + layout.edge_weight[None, :, :, None] * torch.einsum("bkhc,hc->bkh", q, e).unsqueeze(2)
    alpha = _masked_softmax(score / math.sqrt(C), mask)  # [B, K, N, H]
    pooled = torch.einsum("bknh,bnw->bkhw", alpha, x)
    value = torch.einsum("bkhw,hcw->bkhc", pooled, conv.lin_value.weight.view(H, C, W))
    value = value + alpha.sum(2).unsqueeze(-1) * conv.lin_value.bias.view(H, C)
    value = value + torch.einsum("bknh,kn->bkh", alpha, layout.edge_weight).unsqueeze(-1) * e
    out_cls = value.reshape(B, K, H * C) + conv.lin_skip(x_cls)
    out_all = None
    if need_all:
        per_node = conv.lin_value(x) + layout.w_self * e.reshape(H * C) + conv.lin_skip(x)
        out_all = _with_cls(per_node, out_cls, layout.cls_pos)
    return DenseOut(out_cls, out_all, alpha.permute(0, 1, 3, 2))


DENSE_CONVS: dict[str, Callable[..., DenseOut]] = {
    "gatv2": dense_gatv2, "gcn": dense_gcn, "transformer": dense_transformer}


# ----------------------------------------------------------------------------------------------------------
# Encoders


class HadaEncoder(nn.Module):
    """The HADA encoder of one modality: ``forward(batch) -> [B, out_dim]`` L2-normalised embeddings."""

    def __init__(self, config: HadaConfig, modality: str = "image"):
        super().__init__()
        self.config = config
        self.modality = modality
        token_dims, embed_dims = config.dims(modality)
        self.token_dims, self.embed_dims = token_dims, embed_dims
        W, K = config.width, config.num_backbones
        self.proj = nn.ModuleList(nn.Linear(d, W) for d in token_dims)
        convs, posts = [], []
        for _ in range(config.layers):
            conv, conv_out = make_conv(config.gnn, W, config.heads, config.head_dim)
            convs.append(conv)
            posts.append(nn.Linear(conv_out, W))
        self.convs, self.post = nn.ModuleList(convs), nn.ModuleList(posts)
        self.residual = config.layers > 1
        self.norms = nn.ModuleList(nn.LayerNorm(W) for _ in range(config.layers)) if self.residual else None
        self.dropout = nn.Dropout(config.dropout)
        self.readout = nn.Linear(K * W + sum(embed_dims), config.out_dim)
        self.edge_weights = config.edge_weights()

    # -- shared pieces -------------------------------------------------------------------------------------

    def _check(self, batch: ModalityBatch) -> None:
        K = len(self.token_dims)
        if not (len(batch.tokens) == len(batch.lengths) == len(batch.embeds) == K):
            raise HadaError(f"{self.modality} batch has {len(batch.tokens)} token / {len(batch.lengths)} length /"
                            f" {len(batch.embeds)} embed entries; the model expects {K} backbones")
        for k, (t, e) in enumerate(zip(batch.tokens, batch.embeds)):
            if t.dim() != 3 or t.shape[-1] != self.token_dims[k]:
                raise HadaError(f"{self.modality} tokens of backbone {k}: expected [B, N, {self.token_dims[k]}],"
                                f" got {list(t.shape)}")
            if e.dim() != 2 or e.shape[-1] != self.embed_dims[k]:
                raise HadaError(f"{self.modality} embeds of backbone {k}: expected [B, {self.embed_dims[k]}],"
                                f" got {list(e.shape)}")
        for k, (t, n) in enumerate(zip(batch.tokens, batch.lengths)):
            lo, hi = int(n.min()), int(n.max())  # every sample needs its CLS node; lengths count it
            if n.shape != t.shape[:1] or lo < 1 or hi > t.shape[1]:
                raise HadaError(f"{self.modality} lengths of backbone {k} must be [B] in 1..{t.shape[1]},"
                                f" got shape {list(n.shape)} with range {lo}..{hi}")

    def _project(self, batch: ModalityBatch) -> tuple[Tensor, Tensor]:
        """Per-backbone linear maps, concatenated on the node axis: x [B, N, W] and validity mask [B, N]."""
        x = torch.cat([proj(t) for proj, t in zip(self.proj, batch.tokens)], dim=1)
        mask = torch.cat([torch.arange(t.shape[1], device=t.device) < n.to(t.device).view(-1, 1)
                          for t, n in zip(batch.tokens, batch.lengths)], dim=1)
        return x, mask

    def _block(self, layer: int, conv_out: Tensor, x_in: Tensor) -> Tensor:
        """Heads -> width linear; with several layers also GELU, skip connection and LayerNorm."""
        h = self.post[layer](conv_out)
        if self.residual:
            h = self.norms[layer](x_in + F.gelu(h))
        return h

    def _readout(self, cls: Tensor, embeds: list[Tensor]) -> Tensor:
        """[g_1..g_K, e_1..e_K] -> dropout -> linear -> L2 norm (DESIGN section 1, readout)."""
        own = [F.normalize(e.to(cls.dtype), dim=-1) for e in embeds]
        h = torch.cat([cls.flatten(1), *own], dim=-1)
        return F.normalize(self.readout(self.dropout(h)), dim=-1)

    # -- backends ------------------------------------------------------------------------------------------

    def _dense(self, x: Tensor, mask: Tensor, layout: DenseLayout) -> tuple[Tensor, list[Tensor]]:
        conv_fn = DENSE_CONVS[self.config.gnn]
        attention = []
        for layer, conv in enumerate(self.convs):
            last = layer == len(self.convs) - 1
            out = conv_fn(conv, x, mask, layout, need_all=not last)
            attention.append(out.attention)
            if last:
                return self._block(layer, out.cls, x[:, layout.cls_pos]), attention
            x = self._block(layer, out.all, x)
        raise AssertionError("unreachable")

    def _pyg_conv(self, conv, x: Tensor, graph: GraphBatch) -> tuple[Tensor, Tensor]:
        """One torch_geometric conv on the full graph; returns (out, per-edge weights [E, H])."""
        if self.config.gnn == "gcn":
            from torch_geometric.nn.conv.gcn_conv import gcn_norm

            out = conv(x, graph.edge_index, graph.edge_weight)
            _, coef = gcn_norm(graph.edge_index, graph.edge_weight, x.size(0), add_self_loops=False)
            return out, coef.unsqueeze(-1)
        out, (_, alpha) = conv(x, graph.edge_index, graph.edge_weight.unsqueeze(-1),
                               return_attention_weights=True)
        return out, alpha

    def _pyg(self, x: Tensor, mask: Tensor, lengths: list[Tensor], layout: DenseLayout):
        graph = batch_graphs(lengths, self.edge_weights, device=x.device)
        h = x[mask]  # node order: sample, backbone, token == hada.graph's order
        B, N = mask.shape
        H = self.convs[0].heads if self.config.gnn != "gcn" else 1
        src, dst = graph.edge_index
        to_cls = graph.node_token[dst] == 0
        src_pos = layout.cls_pos[graph.node_backbone[src[to_cls]]] + graph.node_token[src[to_cls]]
        where = (graph.batch[dst[to_cls]], graph.node_backbone[dst[to_cls]], src_pos)
        attention = []
        for layer, conv in enumerate(self.convs):
            out, alpha = self._pyg_conv(conv, h, graph)
            att = torch.zeros(B, len(self.token_dims), N, H, device=x.device, dtype=alpha.dtype)
            att = att.index_put(where, alpha[to_cls])
            attention.append(att.permute(0, 1, 3, 2))
            h = self._block(layer, out, h)
        return h[graph.cls_index], attention

    # -- public --------------------------------------------------------------------------------------------

    def forward(self, batch: ModalityBatch, return_attention: bool = False, backend: str | None = None):
        """Fused embeddings [B, out_dim]; with ``return_attention`` also a dict for the attention chapter:

        ``attention``: per layer a [B, K, H, N] tensor, the weight of padded node n in CLS node k's aggregation
        (0 for padding and non-neighbours; GCN: its normalised edge coefficient, H = 1); ``node_backbone`` /
        ``node_token`` [N]: which backbone's token (index into ``batch.tokens[k]``, 0 = CLS) node n is;
        ``node_mask`` [B, N]: valid nodes.
        """
        self._check(batch)
        device = batch.tokens[0].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            x, mask = self._project(batch)
            layout = _dense_layout(tuple(t.shape[1] for t in batch.tokens), self.edge_weights, x.device)
            if self.config.resolve_backend(backend) == "dense":
                cls, attention = self._dense(x, mask, layout)
            else:
                cls, attention = self._pyg(x, mask, batch.lengths, layout)
        with torch.autocast(device.type, enabled=False):  # readout and L2 norm in float32
            out = self._readout(_full(cls), batch.embeds)
        if not return_attention:
            return out
        return out, {"attention": attention, "node_backbone": layout.node_backbone,
                     "node_token": layout.node_token, "node_mask": mask}


class HadaPair(nn.Module):
    """Image and text HADA encoders of the same shape (separate weights, DESIGN section 1)."""

    def __init__(self, config: HadaConfig):
        super().__init__()
        self.config = config
        self.image = HadaEncoder(config, "image")
        self.text = HadaEncoder(config, "text")

    def forward(self, images: ModalityBatch, texts: ModalityBatch, backend: str | None = None):
        return self.image(images, backend=backend), self.text(texts, backend=backend)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
