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

The model's settings are a :class:`hada.config.ModelConfig`; the widths of its inputs a :class:`FeatureDims`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada.errors import HadaError
from hada.config import GNN_TYPES, ModelConfig
from hada.model import fast
from hada.model.graph import GraphBatch, batch_graphs, padded_nodes

MODALITIES = ("image", "text")


@dataclass
class ModalityBatch:
    """One modality (image or text) of one batch, K backbones (what hada.features.batching yields)."""

    tokens: list[Tensor]  # per backbone k: [B, N_k, D_k] float32, CLS/pooled token first, zero-padded
    lengths: list[Tensor]  # per backbone k: [B] long, valid tokens incl. the CLS one (images: all N_k)
    embeds: list[Tensor]  # per backbone k: [B, E_k] float32, the backbone's own projected embedding
    #: lengths known to be in 1..N_k (FeatureData checks them on the host): the encoders then skip reading them
    #: back, which on a GPU is a host synchronisation per backbone and encoder call
    checked: bool = False

    @property
    def num_backbones(self) -> int:
        return len(self.tokens)

    @property
    def batch_size(self) -> int:
        return int(self.tokens[0].shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ModalityBatch":
        move = lambda xs: [x.to(device, non_blocking=non_blocking) for x in xs]  # noqa: E731
        return ModalityBatch(move(self.tokens), move(self.lengths), move(self.embeds), self.checked)


@dataclass
class FeatureDims:
    """Per-backbone widths of the stored features, per modality (a CLIP's text tower is usually narrower than its
    ViT): what the encoders' input maps are sized for, read off the feature stores."""

    image_token_dims: tuple[int, ...]
    text_token_dims: tuple[int, ...]
    image_embed_dims: tuple[int, ...]
    text_embed_dims: tuple[int, ...]

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, tuple(int(v) for v in getattr(self, f.name)))
        lengths = {len(getattr(self, f.name)) for f in fields(self)}
        if len(lengths) != 1:
            raise HadaError(f"every *_dims needs one entry per backbone, got {self}")
        if self.num_backbones < 1:
            raise HadaError("HADA needs at least one backbone")

    @classmethod
    def same(cls, token_dims, embed_dims) -> "FeatureDims":
        """Both modalities with the same widths."""
        return cls(token_dims, token_dims, embed_dims, embed_dims)

    @classmethod
    def paper(cls) -> "FeatureDims":
        """The paper's widths: ALBEF (768-d tokens, 256-d ITC embedding) + LightningDOT (768-d, 768-d)."""
        return cls.same((768, 768), (256, 768))

    @property
    def num_backbones(self) -> int:
        return len(self.image_token_dims)

    def of(self, modality: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(token_dims, embed_dims) of one modality."""
        if modality not in MODALITIES:
            raise HadaError(f"modality must be one of {MODALITIES}, got {modality!r}")
        return getattr(self, f"{modality}_token_dims"), getattr(self, f"{modality}_embed_dims")

    def to_dict(self) -> dict:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}


# ----------------------------------------------------------------------------------------------------------
# Convolutions (torch_geometric modules; their parameters are also what hada.model.fast reads)


def make_conv(gnn: str, width: int, heads: int, head_dim: int | None = None,
              attention_dropout: float = 0.0) -> tuple[nn.Module, int]:
    """One GNN layer and its output width (``heads * head_dim``; ``head_dim`` None = ``width``, the paper's).
    Self loops are explicit edges (hada.model.graph), never added here. ``attention_dropout`` is the conv's own
    dropout of its attention coefficients (training mode only; GCN has none)."""
    from torch_geometric.nn import GATv2Conv, GCNConv, TransformerConv

    C = head_dim or width
    if gnn == "gatv2":
        conv = GATv2Conv(width, C, heads=heads, concat=True, edge_dim=1, add_self_loops=False,
                         dropout=attention_dropout)
        return conv, heads * C
    if gnn == "gcn":  # GCN has no heads: one "head" of ``width`` channels
        return GCNConv(width, width, add_self_loops=False, normalize=True), width
    if gnn == "transformer":
        conv = TransformerConv(width, C, heads=heads, concat=True, beta=False, edge_dim=1, root_weight=True,
                               dropout=attention_dropout)
        return conv, heads * C
    raise HadaError(f"unknown gnn {gnn!r}; choose from {GNN_TYPES}")


# ----------------------------------------------------------------------------------------------------------
# Encoders


class HadaEncoder(nn.Module):
    """The HADA encoder of one modality: ``forward(batch) -> [B, out_dim]`` L2-normalised embeddings."""

    def __init__(self, config: ModelConfig, dims: FeatureDims, modality: str = "image"):
        super().__init__()
        if config.precision == "auto":  # an unresolved config (TrainConfig.resolved picks bf16 on a CUDA GPU)
            config = replace(config, precision="fp32")
        self.config = config
        self.modality = modality
        token_dims, embed_dims = dims.of(modality)
        self.token_dims, self.embed_dims = token_dims, embed_dims
        W, K = config.width, dims.num_backbones
        if any(k >= K for k in config.single_node):
            raise HadaError(f"single_node {config.single_node} names a backbone beyond the {K} of the features")
        self.single_node = tuple(config.single_node)
        # a single-node backbone's one node is its embedding: its map reads the embedding's width
        node_dims = [embed_dims[k] if k in self.single_node else d for k, d in enumerate(token_dims)]
        self.proj = nn.ModuleList(nn.Linear(d, W) for d in node_dims)
        convs, posts = [], []
        for _ in range(config.layers):
            conv, conv_out = make_conv(config.gnn, W, config.heads, config.head_dim, config.attention_dropout)
            convs.append(conv)
            posts.append(nn.Linear(conv_out, W))
        self.convs, self.post = nn.ModuleList(convs), nn.ModuleList(posts)
        self.residual = config.layers > 1
        self.norms = _norms(config) if self.residual else None
        self.dropout = nn.Dropout(config.dropout)
        self.post_dropout = nn.Dropout(config.post_dropout)
        self.readout = nn.Linear(K * W + sum(embed_dims), config.out_dim)
        self.edge_weights = config.edges
        if config.embed_norm == "standardise":  # (mean, std) per backbone, set from the train statistics
            self.register_buffer("embed_stats", torch.tensor([[0.0, 1.0]] * K))
        if config.init == "kaiming":
            kaiming_init(self)

    def set_embed_stats(self, stats: list[tuple[float, float]]) -> None:
        """The (mean, std) of each backbone's tokens in this modality, used to standardise its embeddings."""
        if hasattr(self, "embed_stats"):
            self.embed_stats.copy_(torch.tensor(stats, dtype=torch.float32))

    # -- shared pieces -------------------------------------------------------------------------------------

    def _check(self, batch: ModalityBatch) -> None:
        K = len(self.token_dims)
        if not (len(batch.tokens) == len(batch.lengths) == len(batch.embeds) == K):
            raise HadaError(f"{self.modality} batch has {len(batch.tokens)} token / {len(batch.lengths)} length /"
                            f" {len(batch.embeds)} embed entries; the model expects {K} backbones")
        for k, (t, e) in enumerate(zip(batch.tokens, batch.embeds)):
            width = self.proj[k].in_features
            if t.dim() != 3 or t.shape[-1] != width:
                raise HadaError(f"{self.modality} tokens of backbone {k}: expected [B, N, {width}],"
                                f" got {list(t.shape)}")
            if e.dim() != 2 or e.shape[-1] != self.embed_dims[k]:
                raise HadaError(f"{self.modality} embeds of backbone {k}: expected [B, {self.embed_dims[k]}],"
                                f" got {list(e.shape)}")
        if batch.checked:
            return
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

    def _block(self, layer: int, conv_out: Tensor, x_in: Tensor, groups=None) -> Tensor:
        """(Dropout and) heads -> width linear; with several layers also GELU, skip connection and LayerNorm:
        per node after every layer (``norm="node"``), or the published ``x + conv(x)``, GELU, graph LayerNorm
        between layers (``norm="graph"``; ``groups``: the graph of each row, see :func:`graph_layer_norm`)."""
        if self.post_dropout.p > 0:
            conv_out = self.post_dropout(conv_out)
        h = self.post[layer](conv_out)
        if not self.residual:
            return h
        if self.config.norm == "node":
            return self.norms[layer](x_in + F.gelu(h))
        h = x_in + h
        if layer == len(self.convs) - 1:
            return h
        return graph_layer_norm(self.norms[layer], F.gelu(h), groups)

    def embed_input(self, e: Tensor, k: int) -> Tensor:
        """Backbone k's own embedding as the readout (and a single node) reads it: L2-normalised, and with
        ``embed_norm="standardise"`` standardised with the token statistics; with ``"raw"`` as given."""
        if self.config.embed_norm == "raw":
            return e
        e = F.normalize(e, dim=-1)
        if hasattr(self, "embed_stats"):
            e = (e - self.embed_stats[k, 0]) / self.embed_stats[k, 1]
        return e

    def _readout(self, cls: Tensor, embeds: list[Tensor]) -> Tensor:
        """[g_1..g_K, e_1..e_K] -> dropout -> linear -> L2 norm, in float32 (a bfloat16 ``cls`` is widened)."""
        cls = cls.float() if cls.dtype in (torch.bfloat16, torch.float16) else cls
        own = [self.embed_input(e.to(cls.dtype), k) for k, e in enumerate(embeds)]
        h = torch.cat([cls.flatten(1), *own], dim=-1)
        return F.normalize(self.readout(self.dropout(h)), dim=-1)

    def _as_nodes(self, batch: ModalityBatch) -> ModalityBatch:
        """The batch with each single-node backbone's tokens replaced by its one node (its embedding)."""
        if not self.single_node:
            return batch
        tokens, lengths = list(batch.tokens), list(batch.lengths)
        for k in self.single_node:
            e = batch.embeds[k].float()
            tokens[k] = self.embed_input(e, k).unsqueeze(1)
            lengths[k] = torch.ones(e.shape[0], dtype=torch.long, device=e.device)
        return ModalityBatch(tokens, lengths, list(batch.embeds), batch.checked)

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
            h = self._block(layer, out, h, graph.batch)
        return h[graph.cls_index], attention

    # -- public --------------------------------------------------------------------------------------------

    def forward(self, batch: ModalityBatch, return_attention: bool = False, backend: str | None = None):
        """Fused embeddings [B, out_dim]; with ``return_attention`` also a dict for the attention chapter:

        ``attention``: per layer a [B, K, H, N] tensor, the weight of padded node n in CLS node k's aggregation
        (0 for padding and non-neighbours; GCN: its normalised edge coefficient, H = 1); ``node_backbone`` /
        ``node_token`` [N]: which backbone's token (index into ``batch.tokens[k]``, 0 = CLS) node n is;
        ``node_mask`` [B, N]: valid nodes.
        """
        batch = self._as_nodes(batch)
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


def kaiming_init(module: nn.Module) -> None:
    """Kaiming-normal weights (std sqrt(2 / fan_in)) for every ``nn.Linear`` in ``module``, biases as PyTorch's:
    the published code's init of the token maps, the heads -> width linears, the readout and the ITM linear
    (torch_geometric's own linears inside the convolutions keep theirs)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)


def _norms(config: ModelConfig) -> nn.ModuleList:
    """LayerNorms of a deeper model: one per layer over each node, or torch_geometric's graph-mode LayerNorm
    between layers (after every layer but the last)."""
    if config.norm == "node":
        return nn.ModuleList(nn.LayerNorm(config.width) for _ in range(config.layers))
    from torch_geometric.nn import LayerNorm

    return nn.ModuleList(LayerNorm(config.width, mode="graph") for _ in range(config.layers - 1))


def graph_layer_norm(norm: nn.Module, x: Tensor, groups) -> Tensor:
    """torch_geometric's graph-mode LayerNorm (mean and variance over every node and channel of each graph, then
    the per-channel affine map) on flat nodes [N, W] with ``groups`` their graph ids (the pyg path) or on padded
    nodes [B, N, W] with ``groups`` the [B, N] validity mask (the dense path); padding stays zero."""
    if x.dim() == 2:
        return norm(x, groups)
    mask = groups.unsqueeze(-1).to(x.dtype)
    count = (mask.sum(1, keepdim=True) * x.shape[-1]).clamp_min(1)
    mean = (x * mask).sum((1, 2), keepdim=True) / count
    centred = (x - mean) * mask
    var = (centred * centred).sum((1, 2), keepdim=True) / count
    out = centred / (var + norm.eps).sqrt()
    return (out * norm.weight + norm.bias) * mask


class HadaPair(nn.Module):
    """Image and text HADA encoders of the same shape (separate weights, as in the paper)."""

    def __init__(self, config: ModelConfig, dims: FeatureDims):
        super().__init__()
        self.config = config
        self.image = HadaEncoder(config, dims, "image")
        self.text = HadaEncoder(config, dims, "text")

    def forward(self, images: ModalityBatch, texts: ModalityBatch, backend: str | None = None):
        return self.image(images, backend=backend), self.text(texts, backend=backend)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """The module's parameters (by default only those it trains: a momentum encoder's frozen copy is not)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
