"""The comparison rows of the results table, scored by the same function as HADA.

* **backbone alone**: cosine of the backbone's own projected embeddings (its zero-shot retrieval).
* **similarity averaging**: the mean of the K backbones' cosines (late fusion, nothing trained).
* **concatenation + linear** (:class:`ConcatPair`): the K L2-normalised embeddings concatenated and mapped
  by one linear layer per modality, trained by :mod:`hada.train` with exactly HADA's loss (``arch="concat"``).
  It is HADA without the graph and without the token features: what fusion gains without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hada.errors import HadaError
from hada.metrics import EmbeddingSimilarity, retrieval_metrics, row_label


class ConcatEncoder(nn.Module):
    """``normalize(Linear(dropout([e_1/|e_1|, ..., e_K/|e_K|])))``: reads only ``batch.embeds``."""

    def __init__(self, embed_dims: Sequence[int], out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(sum(self.embed_dims), out_dim)

    def forward(self, batch) -> Tensor:
        if len(batch.embeds) != len(self.embed_dims):
            raise HadaError(f"batch has {len(batch.embeds)} backbones' embeddings, the model expects "
                            f"{len(self.embed_dims)}")
        h = [F.normalize(e.float(), dim=-1) for e in batch.embeds]
        return F.normalize(self.linear(self.dropout(torch.cat(h, dim=-1))), dim=-1)


class ConcatPair(nn.Module):
    """Image and text :class:`ConcatEncoder` (separate weights, like HADA's pair)."""

    def __init__(self, image_embed_dims: Sequence[int], text_embed_dims: Sequence[int], out_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.image = ConcatEncoder(image_embed_dims, out_dim, dropout)
        self.text = ConcatEncoder(text_embed_dims, out_dim, dropout)


# ---------------------------------------------------------------------------------------- scoring
def backbone_similarity(data, k: int) -> EmbeddingSimilarity:
    """Backbone k alone: the cosine of its own projected embeddings."""
    img, txt = data.main_embeddings(k)
    return EmbeddingSimilarity([(1.0, img, txt)])


def averaging_similarity(data, backbones: Sequence[int] | None = None) -> EmbeddingSimilarity:
    """Mean of the chosen backbones' cosines (all by default)."""
    ks = list(range(data.num_backbones)) if backbones is None else list(backbones)
    terms = []
    for k in ks:
        img, txt = data.main_embeddings(k)
        terms.append((1.0 / len(ks), img, txt))
    return EmbeddingSimilarity(terms)


def untrained_baselines(data, names: Sequence[str]) -> list[tuple[str, str, dict]]:
    """Rows ``(kind, label, metrics)`` for each backbone alone and their similarity average, on ``data``'s split
    (kinds and labels of :func:`hada.metrics.row_label`)."""
    if len(names) != data.num_backbones:
        raise HadaError(f"{len(names)} backbone names for {data.num_backbones} backbones")
    ci = data.caption_image_index
    rows = [("backbone", row_label("backbone", names, k), retrieval_metrics(backbone_similarity(data, k), ci))
            for k in range(len(names))]
    if data.num_backbones > 1:
        rows.append(("average", row_label("average", names), retrieval_metrics(averaging_similarity(data), ci)))
    return rows
