"""What each CLS node reads: GATv2 attention of a trained HADA model, over image patches and caption words.

In the published graph every node points into every CLS node (own features w_fc, other backbones' features
w_fcx, the other CLS nodes w_cc, itself w_self), so a CLS node's attention is one softmax over all the
sample's nodes. :meth:`hada.model.encoder.HadaEncoder.forward` with ``return_attention=True`` returns it per layer as
``[B, K, H, N]`` plus ``node_backbone`` / ``node_token`` / ``node_mask``, which map a node index back to
(backbone, token). Here we average over heads, split the mass into own patches / other patches / other CLS
nodes / itself, reshape patch attention to each backbone's square grid (ViT patches, or a conv backbone's
flattened spatial map, both row-major after the CLS/pooled token) and draw it over the image, and label a
caption's attention with the tokenizer's strings in the store's order (pooled token first, then the other
valid tokens in order).

Entry point for the book's chapter 7: :func:`attention_examples`; its figures are drawn by
:mod:`hada.book.views` (this module computes, it draws nothing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hada.errors import HadaError

MASS_PARTS = ("own patches", "other patches", "other CLS", "itself")
HEAT_SIZE = 112  # pixels of the upsampled heatmap (the image is drawn on the same extent)


# ----------------------------------------------------------------------------------------- node layout
@dataclass(frozen=True)
class NodeMap:
    """Which backbone and token each index of the model's padded node axis is, for one sample."""

    backbone: np.ndarray  # [N] int, backbone of node n
    token: np.ndarray  # [N] int, token index inside its backbone (0 = CLS / pooled token)
    valid: np.ndarray  # [N] bool, False for padding

    @classmethod
    def from_output(cls, out: dict, sample: int = 0) -> "NodeMap":
        """From the dict :meth:`HadaEncoder.forward` returns with ``return_attention=True``."""
        as_np = lambda t: t.detach().cpu().numpy()  # noqa: E731
        return cls(as_np(out["node_backbone"]).astype(np.int64), as_np(out["node_token"]).astype(np.int64),
                   as_np(out["node_mask"][sample]).astype(bool))

    @property
    def num_backbones(self) -> int:
        return int(self.backbone.max()) + 1

    def cls_index(self, k: int) -> int:
        """Node index of backbone k's CLS node."""
        return int(np.flatnonzero((self.backbone == k) & (self.token == 0))[0])

    def features(self, k: int) -> np.ndarray:
        """Node indices of backbone k's valid feature tokens (token >= 1), in token order."""
        return np.flatnonzero((self.backbone == k) & (self.token >= 1) & self.valid)

    def grid_side(self, k: int) -> int | None:
        """Side g of backbone k's patch grid if its feature tokens form a g x g square, else None."""
        n = len(self.features(k))
        g = math.isqrt(n)
        return g if n >= 1 and g * g == n else None


def patch_grid(attention: np.ndarray, nodes: NodeMap, k: int) -> np.ndarray | None:
    """One CLS node's attention ``[N]`` over backbone k's patches as a ``[g, g]`` row-major grid (or None).

    ViT patches and a conv map flattened with ``flatten(2)`` are both row-major, so token 1 + r*g + c is
    the patch in row r, column c.
    """
    g = nodes.grid_side(k)
    if g is None:
        return None
    return np.asarray(attention)[nodes.features(k)].reshape(g, g)


def upsample(grid: np.ndarray, size: int = HEAT_SIZE) -> np.ndarray:
    """Bilinear upsampling of a ``[g, g]`` grid to ``[size, size]`` (patch centres at cell centres)."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


@dataclass(frozen=True)
class AttentionMass:
    """How one CLS node's attention splits over node kinds (sums to 1 for GATv2 / Transformer)."""

    own_patches: float
    other_patches: float
    other_cls: float
    itself: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.own_patches, self.other_patches, self.other_cls, self.itself)


def attention_mass(attention: np.ndarray, nodes: NodeMap, k: int) -> AttentionMass:
    """Split CLS node k's attention ``[N]`` into own features, other backbones' features, other CLS, self."""
    a = np.asarray(attention, dtype=np.float64) * nodes.valid
    own = nodes.backbone == k
    feat = nodes.token >= 1
    return AttentionMass(float(a[own & feat].sum()), float(a[~own & feat].sum()),
                         float(a[~own & ~feat].sum()), float(a[own & ~feat].sum()))


@torch.no_grad()
def cls_attention(encoder, batch, layer: int = -1) -> tuple[np.ndarray, list[NodeMap]]:
    """Every CLS node's attention in one GNN layer: ``(heads [B, K, H, N], one NodeMap per sample)``.

    Average over axis 2 for the per-CLS distribution. The encoder runs in eval mode, as at retrieval time.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        _, out = encoder(batch, return_attention=True)
    finally:
        encoder.train(was_training)
    heads = out["attention"][layer].float().cpu().numpy()
    return heads, [NodeMap.from_output(out, b) for b in range(heads.shape[0])]


# ----------------------------------------------------------------------------------------- token strings
SPECIAL_TOKENS = {"<start_of_text>": "<sot>", "<end_of_text>": "<eot>"}


def decode_token(tokenizer, token_id: int) -> str:
    """One token id as a short string: open_clip's SimpleTokenizer, an HF tokenizer, or any ``decode``."""
    if hasattr(tokenizer, "decoder") and hasattr(tokenizer, "decode"):  # open_clip SimpleTokenizer (CLIP BPE)
        text = tokenizer.decode([token_id]).strip()
    elif hasattr(getattr(tokenizer, "tokenizer", None), "convert_ids_to_tokens"):  # open_clip HFTokenizer
        text = tokenizer.tokenizer.convert_ids_to_tokens(int(token_id))
    elif hasattr(tokenizer, "decode"):
        text = tokenizer.decode([token_id]).strip()
    else:
        text = str(token_id)
    return SPECIAL_TOKENS.get(text, text)


def caption_token_strings(backbone, caption: str) -> list[str]:
    """The strings of a caption's stored text tokens, in the store's order (pooled first, then in order).

    Uses the backbone's own rule for which positions are valid and which one is pooled (one forward pass of
    the text tower on one caption), so the labels line up with the feature store token by token.
    """
    from hada.backbones import text_token_order

    raw = backbone.encode_text_raw([caption])
    order = text_token_order(raw.valid, raw.pooled_index)[0, : int(raw.lengths[0])].tolist()
    ids = backbone.tokenize([caption])[0].tolist()
    return [decode_token(backbone.tokenizer, ids[p]) if p < len(ids) else "<cls>" for p in order]


def backbone_token_labels(specs: Sequence[str]) -> list[Callable[[str], list[str]]]:
    """One ``caption -> token strings`` function per backbone spec (loads each backbone once)."""
    from hada.backbones import load_backbone

    backbones = [load_backbone(s) for s in specs]
    return [lambda caption, b=b: caption_token_strings(b, caption) for b in backbones]


# ----------------------------------------------------------------------------------------- example choice
def top_captions(similarity, n_captions: int | None = None, max_block_elements: int = 1 << 24) -> np.ndarray:
    """Index of each image's top-1 retrieved caption (image -> text), in row stripes of bounded memory."""
    from hada.metrics import as_similarity

    src = as_similarity(similarity, n_captions=n_captions)
    n_img, n_cap = src.shape
    step = max(1, max_block_elements // max(n_cap, 1))
    out = np.empty(n_img, dtype=np.int64)
    for i0 in range(0, n_img, step):
        i1 = min(n_img, i0 + step)
        out[i0:i1] = src.block(slice(i0, i1), slice(0, n_cap)).argmax(dim=1).numpy()
    return out


def choose_examples(top: np.ndarray, caption_image_index: np.ndarray, n_correct: int, n_failures: int,
                    seed: int = 0) -> list[tuple[int, bool]]:
    """``(image row, correct)`` pairs: the first hits and misses in a seeded permutation of the images.

    A seeded order (not the first rows) shows varied images yet gives the same choice on every rebuild.
    Hits come first, then failures; fewer are returned if the split has fewer of either.
    """
    from hada.metrics import pick_rows

    hit = np.asarray(caption_image_index)[np.asarray(top)] == np.arange(len(top))
    chosen = pick_rows(len(top), [("hit", hit, n_correct), ("miss", ~hit, n_failures)], seed)
    return [(i, why == "hit") for i, why in chosen]


# ----------------------------------------------------------------------------------------- results
@dataclass
class ImageAttention:
    """One chosen image: its retrieval outcome and what every CLS node of the image encoder attends to."""

    row: int  # image row in the split
    image_id: int
    path: Path
    correct: bool  # HADA's top-1 caption belongs to this image
    top_caption: str
    top_caption_row: int
    captions: list[str]  # the image's own captions
    heads: np.ndarray  # [K, H, N] per-head attention of each CLS node (last layer by default)
    nodes: NodeMap

    @property
    def attention(self) -> np.ndarray:
        """[K, N] attention of each CLS node, averaged over heads."""
        return self.heads.mean(axis=1)

    def grid(self, cls: int, backbone: int) -> np.ndarray | None:
        """CLS node ``cls``'s attention over backbone ``backbone``'s patch grid ``[g, g]`` (None: no grid)."""
        return patch_grid(self.attention[cls], self.nodes, backbone)

    def mass(self, cls: int) -> AttentionMass:
        return attention_mass(self.attention[cls], self.nodes, cls)


@dataclass
class TextAttention:
    """One caption: each CLS node of the text encoder over every backbone's tokens, with token strings."""

    caption: str
    caption_row: int
    heads: np.ndarray  # [K, H, N]
    nodes: NodeMap
    tokens: list[list[str]]  # per backbone, the strings of its valid tokens in node order (pooled first)

    @property
    def attention(self) -> np.ndarray:
        return self.heads.mean(axis=1)

    def over_backbone(self, cls: int, backbone: int) -> np.ndarray:
        """CLS node ``cls``'s attention over backbone ``backbone``'s valid tokens (pooled token first)."""
        idx = np.flatnonzero((self.nodes.backbone == backbone) & self.nodes.valid)
        return self.attention[cls][idx]

    def mass(self, cls: int) -> AttentionMass:
        return attention_mass(self.attention[cls], self.nodes, cls)


@dataclass
class AttentionExamples:
    """Chosen test images (hits first, then failures) and the first image's first caption, ready to draw."""

    items: list[ImageAttention]
    text: TextAttention | None
    backbone_names: list[str]
    split: str
    layer: int = 0  # which GNN layer (0-based)
    num_layers: int = 1
    gnn: str = "gatv2"
    notes: list[str] = field(default_factory=list)  # e.g. fewer failures than asked

    @property
    def grid_backbones(self) -> list[int]:
        """Backbones whose image tokens form a square patch grid (the ones a heatmap can be drawn for)."""
        if not self.items:
            return []
        nodes = self.items[0].nodes
        return [k for k in range(nodes.num_backbones) if nodes.grid_side(k) is not None]


# ----------------------------------------------------------------------------------------- building
def _caption_offsets(records, data) -> np.ndarray:
    """Row of each image's first caption in the store; checks the store's caption order is the dataset's."""
    counts = np.array([len(r.captions) for r in records], dtype=np.int64)
    ci = np.asarray(data.caption_image_index)
    if len(records) != data.n_images or not np.array_equal(np.repeat(np.arange(len(records)), counts), ci):
        raise HadaError(f"the dataset split has {len(records)} images / {int(counts.sum())} captions but the "
                        f"features have {data.n_images} / {data.n_captions} in another order: not the same "
                        "dataset or split")
    return np.concatenate([[0], np.cumsum(counts)[:-1]])


def _labels_for(label_fn, caption: str, n: int, name: str) -> list[str]:
    labels = list(label_fn(caption)) if label_fn is not None else []
    if len(labels) != n:
        if label_fn is not None:
            warnings.warn(f"{name}: the tokenizer gives {len(labels)} tokens for the caption but the store has {n};"
                          " labelling tokens by position", stacklevel=3)
        labels = [f"#{i}" for i in range(n)]
    return labels


def attention_examples(trained, dataset, split: str = "test", n_correct: int = 2, n_failures: int = 1,
                       seed: int = 0, layer: int = -1, similarity=None,
                       token_labels: Sequence[Callable[[str], list[str]]] | None = None) -> AttentionExamples:
    """Pick test images by HADA's top-1 image->text result and collect every CLS node's attention.

    ``trained``: :func:`hada.train.load_trained` result (``.pair``, ``.config``, ``.load_data``,
    ``.similarity``). ``dataset``: :func:`hada.data.datasets.load_dataset` result of the same data (image paths and
    caption texts). ``similarity``: a precomputed images x captions similarity of the split (default: the
    model's own inference similarity). ``token_labels``: one ``caption -> token strings`` function per
    backbone (default: the run's backbones' tokenizers). ``layer``: which GNN layer's attention.
    """
    if getattr(trained.config, "arch", "hada") != "hada":
        raise HadaError("attention needs a HADA run (arch='hada'); the concatenation baseline has no graph")
    if n_correct < 0 or n_failures < 0 or n_correct + n_failures < 1:
        raise HadaError("ask for at least one example (n_correct, n_failures >= 0)")
    model = trained.pair.image.config
    if not -model.layers <= layer < model.layers:
        raise HadaError(f"layer {layer} does not exist: the model has {model.layers} GNN layer(s)")
    specs = list(trained.config.resolved().data.backbones)
    data = trained.load_data(split)
    records = dataset.split(split)
    first_caption = _caption_offsets(records, data)
    ci = np.asarray(data.caption_image_index)
    captions = [c for r in records for c in r.captions]  # store order: split order, each image's captions

    sims = similarity if similarity is not None else trained.similarity(data)
    top = top_captions(sims, data.n_captions)
    chosen = choose_examples(top, ci, n_correct, n_failures, seed)
    notes = []
    n_good = sum(ok for _, ok in chosen)
    if n_good < n_correct or len(chosen) - n_good < n_failures:
        notes.append(f"the {split} split has only {n_good} correct / {len(chosen) - n_good} failed images to show")

    items: list[ImageAttention] = []
    if chosen:
        rows = np.array([r for r, _ in chosen], dtype=np.int64)
        heads, nodes = cls_attention(trained.pair.image, data.image_batch(rows), layer)
        for b, (row, ok) in enumerate(chosen):
            rec = records[row]
            items.append(ImageAttention(row=row, image_id=rec.image_id, path=Path(rec.path), correct=ok,
                                        top_caption=captions[top[row]], top_caption_row=int(top[row]),
                                        captions=list(rec.captions), heads=heads[b], nodes=nodes[b]))

    text = None
    if items:
        cap = int(first_caption[items[0].row])
        heads, nodes = cls_attention(trained.pair.text, data.text_batch(np.array([cap])), layer)
        label_fns = list(token_labels) if token_labels is not None else backbone_token_labels(specs)
        tokens = []
        for k in range(nodes[0].num_backbones):
            n = int(((nodes[0].backbone == k) & nodes[0].valid).sum())
            tokens.append(_labels_for(label_fns[k] if k < len(label_fns) else None, captions[cap], n, specs[k]))
        text = TextAttention(captions[cap], cap, heads[0], nodes[0], tokens)

    from hada.labels import backbone_labels

    return AttentionExamples(items, text, backbone_labels(specs), split,
                             layer % model.layers, model.layers, model.gnn, notes)
