"""HADA's node graph: typed, weighted, directed edges between the tokens of K backbones.

One sample (an image or a caption) has, for each backbone k, ``counts[k]`` nodes: its CLS (pooled) token
first, then its feature tokens. Nodes are ordered backbone 0's, then backbone 1's, and so on. Edges:

=====================  ===========  =====================================================
type                   weight       edges
=====================  ===========  =====================================================
``fc``                 ``w_fc``     f_k -> c_k (feature to its own backbone's CLS)
``fcx``                ``w_fcx``    f_k -> c_j, j != k (feature to another backbone's CLS)
``cc``                 ``w_cc``     c_k <-> c_j, j != k
``ffx``                ``w_ffx``    f_k <-> f_j, j != k (every pair; off when ``w_ffx is None``)
``self``               ``w_self``   i -> i on every node
=====================  ===========  =====================================================

Self loops are explicit edges with their own weight; the convolutions must therefore run with
``add_self_loops=False``. With ``self_loops="mean"`` a node's self-loop weight is the mean of its other
incoming edges' weights (0 for a node without any): what the public code's GATv2Conv did with its defaults
(``add_self_loops=True, fill_value='mean'``), which overwrote the hand-set self loops and produced the
published numbers.
With ``directed=False`` every ``fc``/``fcx`` edge also gets its reverse, with the same type and weight
(``cc``, ``ffx`` and self loops are already symmetric).

The topology depends only on the count tuple, so one template per tuple is cached and a batch is built by
offsetting templates with tensor ops (no per-sample Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from hada.config import EdgeWeights

EDGE_FC, EDGE_FCX, EDGE_CC, EDGE_FFX, EDGE_SELF = range(5)
#: Short edge type names, indexed by the ``edge_type`` codes above.
EDGE_TYPES: tuple[str, ...] = ("fc", "fcx", "cc", "ffx", "self")
#: Legend text for the book's figures, same order as ``EDGE_TYPES``.
EDGE_TYPE_LABELS: tuple[str, ...] = (
    "feature -> own CLS (w_fc)",
    "feature -> other CLS (w_fcx)",
    "CLS <-> CLS (w_cc)",
    "feature <-> feature, across backbones (w_ffx)",
    "self loop (w_self)",
)


@dataclass(frozen=True)
class EdgeTemplate:
    """The edges of one sample with a given count tuple (local node ids), sorted by (dst, src)."""

    edge_index: Tensor  # [2, E] long
    edge_weight: Tensor  # [E] float32
    edge_type: Tensor  # [E] long

    @property
    def num_edges(self) -> int:
        return int(self.edge_type.numel())


@dataclass
class GraphBatch:
    """A batch of sample graphs as one disconnected graph, in torch_geometric's layout."""

    edge_index: Tensor  # [2, E] long, global node ids
    edge_weight: Tensor  # [E] float32
    edge_type: Tensor  # [E] long
    ptr: Tensor  # [B + 1] long, first node of each sample
    batch: Tensor  # [N] long, sample of each node
    node_backbone: Tensor  # [N] long
    node_token: Tensor  # [N] long, token index inside its backbone (0 = CLS)
    cls_index: Tensor  # [B, K] long, global id of each sample's CLS node of backbone k

    @property
    def num_nodes(self) -> int:
        return int(self.batch.numel())


def _check_counts(counts: Sequence[int]) -> tuple[int, ...]:
    counts = tuple(int(c) for c in counts)
    if len(counts) < 1:
        raise ValueError("HADA needs at least one backbone (one alone: its CLS and its feature nodes)")
    if min(counts) < 1:
        raise ValueError(f"every backbone needs its CLS node (count >= 1), got counts {counts}")
    return counts


def _cross_pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """All (a_i, b_j) pairs as two flat index vectors."""
    return a.repeat_interleave(b.numel()), b.repeat(a.numel())


def build_edges(counts: Sequence[int], weights: EdgeWeights = EdgeWeights()) -> tuple[Tensor, Tensor, Tensor]:
    """Edges of one sample whose backbone k has ``counts[k]`` nodes (CLS first).

    Returns ``(edge_index [2, E] long, edge_weight [E] float32, edge_type [E] long)`` in local node ids,
    sorted by (dst, src). Computed afresh on every call; batching uses the cached :func:`edge_template`.
    """
    counts = _check_counts(counts)
    starts = [sum(counts[:k]) for k in range(len(counts))]
    feats = [torch.arange(s + 1, s + n) for s, n in zip(starts, counts)]
    src, dst, typ = [], [], []

    def add(s: Tensor, d: Tensor, t: int) -> None:
        src.append(s)
        dst.append(d)
        typ.append(torch.full((s.numel(),), t, dtype=torch.long))

    for k, f_k in enumerate(feats):
        for j, c_j in enumerate(starts):
            add(f_k, torch.full_like(f_k, c_j), EDGE_FC if j == k else EDGE_FCX)
            if not weights.directed:
                add(torch.full_like(f_k, c_j), f_k, EDGE_FC if j == k else EDGE_FCX)
            if j != k:
                add(torch.tensor([starts[k]]), torch.tensor([c_j]), EDGE_CC)
                if weights.w_ffx is not None:
                    add(*_cross_pairs(f_k, feats[j]), EDGE_FFX)
    nodes = torch.arange(sum(counts))
    add(nodes, nodes, EDGE_SELF)

    src, dst, typ = torch.cat(src), torch.cat(dst), torch.cat(typ)
    order = torch.argsort(dst * nodes.numel() + src)
    src, dst, typ = src[order], dst[order], typ[order]
    weight = weights.by_type()[typ]
    if weights.self_loops == "mean":
        weight = _mean_self_loops(dst, typ, weight, nodes.numel())
    return torch.stack([src, dst]), weight, typ


def _mean_self_loops(dst: Tensor, typ: Tensor, weight: Tensor, n: int) -> Tensor:
    """``weight`` with each self loop set to the mean weight of its node's other incoming edges (0 without)."""
    other = typ != EDGE_SELF
    total = torch.zeros(n).index_add_(0, dst[other], weight[other])
    count = torch.zeros(n).index_add_(0, dst[other], torch.ones(int(other.sum())))
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros(n))
    return torch.where(other, weight, mean[dst])


@lru_cache(maxsize=4096)
def edge_template(counts: tuple[int, ...], weights: EdgeWeights = EdgeWeights()) -> EdgeTemplate:
    """Cached :func:`build_edges` for one count tuple: the topology depends only on the counts."""
    return EdgeTemplate(*build_edges(counts, weights))


def _counts_matrix(lengths_per_backbone: Sequence[Tensor] | Tensor) -> Tensor:
    """[B, K] long matrix of node counts from K length vectors (or an already stacked matrix)."""
    if isinstance(lengths_per_backbone, Tensor):
        counts = lengths_per_backbone
    else:
        counts = torch.stack([torch.as_tensor(x).reshape(-1) for x in lengths_per_backbone], dim=1)
    counts = counts.to(device="cpu", dtype=torch.long)
    if counts.dim() != 2 or counts.size(1) < 1:
        raise ValueError(f"need lengths of at least one backbone, got shape {tuple(counts.shape)}")
    if counts.numel() and int(counts.min()) < 1:
        raise ValueError("every sample needs its CLS node in every backbone (length >= 1)")
    return counts


def _node_layout(counts: Tensor, total: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-node sample / backbone / token ids and the CLS ids, for nodes ordered sample, backbone, token;
    ``total``: the node count when the caller knows it (else read from ``counts``)."""
    B, K = counts.shape
    flat = counts.reshape(-1)  # (sample, backbone) blocks in node order
    block_start = torch.cumsum(flat, 0) - flat
    block = torch.repeat_interleave(torch.arange(B * K), flat)
    node_token = torch.arange(int(flat.sum()) if total is None else total) - block_start[block]
    sizes = counts.sum(1)
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])
    return ptr, block // K, block % K, node_token, block_start.view(B, K)


@lru_cache(maxsize=256)
def padded_nodes(sizes: tuple[int, ...], device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """(cls_pos [K], node_backbone [N], node_token [N]) of a batch's padded node axis, whose backbone k holds
    ``sizes[k]`` nodes (CLS first, backbones concatenated). Constants of the sizes: cached, and built outside
    inference mode so that a copy cached during evaluation can be saved for backward later."""
    with torch.inference_mode(False):
        _, _, node_backbone, node_token, starts = _node_layout(torch.tensor([list(sizes)], dtype=torch.long),
                                                               sum(sizes))
        return starts[0].to(device), node_backbone.to(device), node_token.to(device)


def batch_graphs(lengths_per_backbone: Sequence[Tensor] | Tensor,
                 weights: EdgeWeights = EdgeWeights(), device: torch.device | str | None = None) -> GraphBatch:
    """Graph of a whole batch: K length vectors [B] (valid tokens incl. CLS) -> one :class:`GraphBatch`.

    Loops over the distinct count tuples only; edges come out sample by sample, in the same order as
    concatenating offset :func:`build_edges` results.
    """
    counts = _counts_matrix(lengths_per_backbone)
    ptr, batch, node_backbone, node_token, cls_index = _node_layout(counts)
    uniq, inverse = torch.unique(counts, dim=0, return_inverse=True)
    templates = [edge_template(tuple(row.tolist()), weights) for row in uniq]
    per_sample = torch.tensor([t.num_edges for t in templates], dtype=torch.long)[inverse]
    edge_ptr = torch.cumsum(per_sample, 0) - per_sample
    E = int(per_sample.sum())
    edge_index = torch.empty(2, E, dtype=torch.long)
    edge_type = torch.empty(E, dtype=torch.long)
    edge_weight = torch.empty(E, dtype=torch.float32)
    for u, t in enumerate(templates):
        samples = (inverse == u).nonzero().view(-1)
        pos = (edge_ptr[samples, None] + torch.arange(t.num_edges)).view(-1)
        offsets = ptr[samples].view(1, -1, 1)
        edge_index[:, pos] = (t.edge_index.view(2, 1, -1) + offsets).reshape(2, -1)
        edge_type[pos] = t.edge_type.repeat(samples.numel())
        edge_weight[pos] = t.edge_weight.repeat(samples.numel())
    out = GraphBatch(edge_index, edge_weight, edge_type, ptr, batch, node_backbone, node_token, cls_index)
    if device is not None:
        out = GraphBatch(*(getattr(out, f).to(device) for f in out.__dataclass_fields__))
    return out


def to_networkx(counts: Sequence[int], weights: EdgeWeights = EdgeWeights()):
    """One sample's graph as a ``networkx.DiGraph`` for drawing (book chapter 3).

    Node attributes: ``backbone``, ``token`` (0 = CLS), ``is_cls``; edge attributes: ``type`` (a name from
    ``EDGE_TYPES``) and ``weight``.
    """
    import networkx as nx

    counts = _check_counts(counts)
    g = nx.DiGraph()
    node = 0
    for k, n in enumerate(counts):
        for t in range(n):
            g.add_node(node, backbone=k, token=t, is_cls=t == 0)
            node += 1
    edge_index, edge_weight, edge_type = build_edges(counts, weights)
    by_type = weights.as_tuple()
    for (s, d), w, t in zip(edge_index.t().tolist(), edge_weight.tolist(), edge_type.tolist()):
        g.add_edge(s, d, type=EDGE_TYPES[t], weight=by_type[t] if t != EDGE_SELF or weights.self_loops == "fixed"
                   else w)
    return g
