"""HADA encoders: K frozen backbones' tokens -> one graph per sample -> GNN -> fused, L2-normalised embedding.

This module is the readable reference. Each backbone's tokens get their own linear map to a common ``width``
(``proj``); a torch_geometric convolution (GATv2 in the paper: one layer, 4 heads, concat, ``edge_dim=1``) runs
on the batched graph of :mod:`hada.model.graph`; a block maps the heads back to ``width`` (with more layers
also GELU, skip connection and LayerNorm); the readout concatenates the K updated CLS nodes with each
backbone's own (L2-normalised) projected embedding, applies dropout and one linear layer to ``out_dim``, and
L2-normalises.

Two backends compute the same numbers with the same parameters: ``"pyg"`` (below: every node and edge, any
edge option) and ``"dense"`` (:mod:`hada.model.fast`: the published graph only, computing just the K CLS rows
that are read). ``"auto"`` picks dense whenever the edge options allow it.

Two options trade the paper's exact setting for speed on a CPU (both off by default = the paper):
``head_dim`` (channels per head; the paper concatenates ``heads`` heads of ``width`` channels, so the
GATv2 attention works on ``heads * width`` channels per node pair) and ``precision="bf16"`` (the encoder's
matrix products under bfloat16 autocast; softmax, readout and L2 norm stay float32).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada.errors import HadaError
from hada.model import fast
from hada.model.graph import EdgeWeights, GraphBatch, batch_graphs, padded_nodes

GNN_TYPES = ("gatv2", "gcn", "transformer")
#: "fp32": everything in float32 (the paper). "bf16": the encoder's linear maps, attention scores and
#: pooling under ``torch.autocast(dtype=torch.bfloat16)`` (several times faster matrix products on CPUs with
#: AMX / AVX512-BF16); attention softmax, readout, L2 norm and everything in the loss stay float32.
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("auto", "dense", "pyg")
MODALITIES = ("image", "text")


@dataclass
class ModalityBatch:
    """One modality (image or text) of one batch, K backbones (what hada.features.batching yields)."""

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
# Convolutions (torch_geometric modules; their parameters are also what hada.model.fast reads)


def make_conv(gnn: str, width: int, heads: int, head_dim: int | None = None) -> tuple[nn.Module, int]:
    """One GNN layer and its output width (``heads * head_dim``; ``head_dim`` None = ``width``, the paper's).
    Self loops are explicit edges (hada.model.graph), never added here."""
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

    @staticmethod
    def _mask(batch: ModalityBatch) -> Tensor:
        """Validity of every node on the padded node axis (backbones concatenated): [B, N] bool."""
        return torch.cat([torch.arange(t.shape[1], device=t.device) < n.to(t.device).view(-1, 1)
                          for t, n in zip(batch.tokens, batch.lengths)], dim=1)

    def _block(self, layer: int, conv_out: Tensor, x_in: Tensor) -> Tensor:
        """Heads -> width linear; with several layers also GELU, skip connection and LayerNorm."""
        h = self.post[layer](conv_out)
        if self.residual:
            h = self.norms[layer](x_in + F.gelu(h))
        return h

    def _readout(self, cls: Tensor, embeds: list[Tensor]) -> Tensor:
        """[g_1..g_K, e_1..e_K] -> dropout -> linear -> L2 norm, in float32 (a bfloat16 ``cls`` is widened)."""
        cls = cls.float() if cls.dtype in (torch.bfloat16, torch.float16) else cls
        own = [F.normalize(e.to(cls.dtype), dim=-1) for e in embeds]
        h = torch.cat([cls.flatten(1), *own], dim=-1)
        return F.normalize(self.readout(self.dropout(h)), dim=-1)

    # -- the torch_geometric path --------------------------------------------------------------------------

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

    def _pyg(self, x: Tensor, mask: Tensor, lengths: list[Tensor], cls_pos: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The CLS nodes after the last block [B, K, width] and each layer's attention [B, K, H, N], from
        torch_geometric's convolutions on every node and edge of the batched graph (``x``: projected tokens on
        the padded node axis, whose backbone k starts at ``cls_pos[k]``)."""
        graph = batch_graphs(lengths, self.edge_weights, device=x.device)
        h = x[mask]  # node order: sample, backbone, token == hada.model.graph's order
        B, N = mask.shape
        H = self.convs[0].heads if self.config.gnn != "gcn" else 1
        src, dst = graph.edge_index
        to_cls = graph.node_token[dst] == 0
        src_pos = cls_pos[graph.node_backbone[src[to_cls]]] + graph.node_token[src[to_cls]]
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
        cls_pos, node_backbone, node_token = padded_nodes(tuple(t.shape[1] for t in batch.tokens), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            mask = self._mask(batch)
            if self.config.resolve_backend(backend) == "dense":
                cls, attention = fast.encode_cls(self, batch.tokens, mask)
            else:
                x = torch.cat([proj(t) for proj, t in zip(self.proj, batch.tokens)], dim=1)
                cls, attention = self._pyg(x, mask, batch.lengths, cls_pos)
        with torch.autocast(device.type, enabled=False):  # readout and L2 norm in float32
            out = self._readout(cls, batch.embeds)
        if not return_attention:
            return out
        return out, {"attention": attention, "node_backbone": node_backbone, "node_token": node_token,
                     "node_mask": mask}


class HadaPair(nn.Module):
    """Image and text HADA encoders of the same shape (separate weights, as in the paper)."""

    def __init__(self, config: HadaConfig):
        super().__init__()
        self.config = config
        self.image = HadaEncoder(config, "image")
        self.text = HadaEncoder(config, "text")

    def forward(self, images: ModalityBatch, texts: ModalityBatch, backend: str | None = None):
        return self.image(images, backend=backend), self.text(texts, backend=backend)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
