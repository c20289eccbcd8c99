"""Stored token features -> normalised :class:`~hada.model.encoder.ModalityBatch` tensors, without per-sample Python.

Tokens are L2-normalised per token, then standardised with one global mean and std per
backbone and modality (or one over all of them: ``compute_stats(..., pooled=True)``, the published), or enter
raw (``compute_stats(..., raw=True)``: HADA-LAVIS).
The statistics come from the *train* split (:func:`compute_stats`) and travel with the run and its
checkpoint, so val and test are normalised with the train statistics. Training batches can use augmented
image views stored ahead (``FeatureData(augment_p=...)``, ``hada features extract --augment N``).

The backbones' own projected embeddings pass through unchanged (fp32): the model and the loss
L2-normalise them, and any shift would change the main backbone's cosine that HADA mixes in.

Data path: each split's arrays are read from the memory-mapped store once, in contiguous chunks, into
resident fp16 tensors (unless larger than the host budget below, in which case batches are gathered from the
memmaps with sorted indices). A batch is one ``index_select`` per array, trimmed to
the batch's longest caption, converted to fp32 and normalised with tensor ops.

Three tiers, the first that fits: on a GPU the arrays go onto the device when they fit
``HADA_DEVICE_RESIDENT_MB`` (default: half the device's *free* memory), so a batch never crosses the bus;
else they stay in host memory (``HADA_RESIDENT_MB``, default half the host memory available) and batches are
gathered into pinned memory and copied without blocking; else batches are gathered from the memory-mapped
store. :attr:`FeatureData.placement` says which, :func:`placement_line` says it for every split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hada.errors import HadaError
from hada.model.encoder import ModalityBatch

CHUNK_ROWS = 1024  # rows per contiguous read from a memmap


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class TokenStats:
    """Global mean and std of one backbone's per-token L2-normalised features in one modality; ``raw``: the tokens
    enter as stored, with no L2 norm and no standardisation (HADA-LAVIS; mean 0 and std 1 then)."""

    mean: float
    std: float
    raw: bool = False


@dataclass
class FeatureStats:
    """Train-split statistics for K backbones: ``image[k]``, ``text[k]``."""

    image: list[TokenStats]
    text: list[TokenStats]

    def to_dict(self) -> dict:
        return {"image": [_stats_dict(s) for s in self.image], "text": [_stats_dict(s) for s in self.text]}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        return cls([TokenStats(**s) for s in d["image"]], [TokenStats(**s) for s in d["text"]])


def _stats_dict(s: TokenStats) -> dict:
    """``s`` as a dict; ``raw`` only when set (statistics written before it existed read the same)."""
    return {k: v for k, v in asdict(s).items() if k != "raw" or v}


def _token_moments(tokens, lengths: np.ndarray | None) -> tuple[float, float, int]:
    """(sum, sum of squares, element count) of per-token L2-normalised valid tokens, read in chunks."""
    total, total_sq, count = 0.0, 0.0, 0
    for s in range(0, tokens.shape[0], CHUNK_ROWS):
        e = min(tokens.shape[0], s + CHUNK_ROWS)
        if lengths is None:
            x = F.normalize(torch.from_numpy(np.array(tokens[s:e], dtype=np.float32)), dim=-1)
            count += x.numel()
        else:
            n = torch.from_numpy(np.array(lengths[s:e], dtype=np.int64))
            lmax = int(n.max()) if len(n) else 0
            x = F.normalize(torch.from_numpy(np.array(tokens[s:e, :lmax], dtype=np.float32)), dim=-1)
            x.mul_((torch.arange(lmax) < n[:, None]).unsqueeze(-1))  # padding contributes nothing
            count += int(n.clamp(max=lmax).sum()) * x.shape[-1]
        total += float(x.sum(dtype=torch.float64))
        total_sq += float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    return total, total_sq, count


def _stats_of(s: float, sq: float, n: int) -> TokenStats:
    if n == 0:
        raise HadaError("cannot compute feature statistics of an empty split")
    mean = s / n
    std = math.sqrt(max(sq / n - mean * mean, 0.0))
    return TokenStats(mean, std if std > 1e-12 else 1.0)


def raw_stats(k: int) -> FeatureStats:
    """The statistics of K backbones whose tokens enter as stored (HADA-LAVIS): no L2 norm, no standardisation."""
    return FeatureStats([TokenStats(0.0, 1.0, raw=True) for _ in range(k)],
                        [TokenStats(0.0, 1.0, raw=True) for _ in range(k)])


def compute_stats(splits: Sequence, pooled: bool = False, raw: bool = False) -> FeatureStats:
    """Mean/std per backbone and modality of per-token L2-normalised features (valid tokens only); with
    ``pooled`` one global mean/std over every backbone and both modalities (the published standardisation),
    repeated in every entry; with ``raw`` no statistics: the tokens enter as stored (HADA-LAVIS)."""
    if raw:
        return raw_stats(len(splits))
    image, text, totals = [], [], np.zeros(3)
    for fs in splits:
        for out, (tokens, lengths) in ((image, (fs.image_tokens, None)), (text, (fs.text_tokens, fs.text_lengths))):
            moments = _token_moments(tokens, lengths)
            totals += moments
            out.append(_stats_of(*moments))
    if pooled:
        pool = _stats_of(float(totals[0]), float(totals[1]), int(totals[2]))
        return FeatureStats([pool] * len(image), [pool] * len(text))
    return FeatureStats(image, text)


# ----------------------------------------------------------------------------------------------- data
#: The share of the free memory (GPU or host) one split's token arrays may take: the rest is for the splits after
#: it, the model, its activations and the similarity stripes (on the host: everything else running).
FREE_SHARE = 0.5


def _host_available() -> int:
    """Bytes of host memory available now (``MemAvailable``; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _resident_budget() -> int:
    """Bytes of token arrays kept in host memory: ``HADA_RESIDENT_MB``, else half the host memory available now."""
    if "HADA_RESIDENT_MB" in os.environ:
        return int(float(os.environ["HADA_RESIDENT_MB"]) * 2**20)
    return int(_host_available() * FREE_SHARE)


def _device_budget(device: torch.device) -> int:
    """Bytes of token arrays kept on a GPU: ``HADA_DEVICE_RESIDENT_MB``, else half of the device's *free* memory
    now (``torch.cuda.mem_get_info``): the splits placed before this one, and anything else on the card, count."""
    if "HADA_DEVICE_RESIDENT_MB" in os.environ:
        return int(float(os.environ["HADA_DEVICE_RESIDENT_MB"]) * 2**20)
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * FREE_SHARE)


def _torch_dtype(array) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype


def _load(array, device: torch.device | None = None) -> Tensor:
    """A memmap as a resident tensor (on ``device``, default the host), copied in contiguous row chunks (fp16
    stays fp16)."""
    if device is not None and device.type != "cpu":
        out = torch.empty(tuple(array.shape), dtype=_torch_dtype(array), device=device)
        for s in range(0, array.shape[0], CHUNK_ROWS):
            e = min(array.shape[0], s + CHUNK_ROWS)
            out[s:e].copy_(torch.from_numpy(np.ascontiguousarray(array[s:e])))
        return out
    out = torch.empty(tuple(array.shape), dtype=_torch_dtype(array))
    for s in range(0, array.shape[0], CHUNK_ROWS):
        e = min(array.shape[0], s + CHUNK_ROWS)
        out[s:e].numpy()[...] = array[s:e]  # straight from the memmap into the tensor, one copy
    return out


class _Rows:
    """Row access to one stored array: a tensor resident on the host or the device, or a memmap; same results.
    ``pin``: host gathers land in pinned memory (for a non-blocking copy to a GPU)."""

    def __init__(self, array, resident: bool, device: torch.device | None = None, pin: bool = False):
        self.array = _load(array, device) if resident else array
        self.resident, self.pin = resident, pin
        self.shape = tuple(array.shape)

    def take(self, index: np.ndarray, width: int | None = None) -> Tensor:
        """Rows ``index`` (any order, repeats allowed), second axis cut to ``width``, as a tensor."""
        if len(index) and index[-1] - index[0] == len(index) - 1 and np.all(np.diff(index) == 1):
            rows = slice(int(index[0]), int(index[-1]) + 1)  # a contiguous range: a plain slice
            part = self.array[rows] if width is None else self.array[rows, :width]
            part = part if self.resident else torch.from_numpy(np.array(part))
            return torch.empty(part.shape, dtype=part.dtype, pin_memory=True).copy_(part) if self.pin else part
        if self.resident:
            src = self.array if width is None else self.array[:, :width]
            idx = torch.from_numpy(index).to(src.device, non_blocking=True)
            if not self.pin:
                return src.index_select(0, idx)
            out = torch.empty((len(index),) + tuple(src.shape[1:]), dtype=src.dtype, pin_memory=True)
            return torch.index_select(src, 0, idx, out=out)
        order = np.argsort(index, kind="stable")  # read the memmap front to back
        part = self.array[index[order]] if width is None else self.array[index[order], :width]
        out = torch.empty((len(index),) + part.shape[1:], dtype=torch.from_numpy(part[:0]).dtype, pin_memory=self.pin)
        out[torch.from_numpy(order)] = torch.from_numpy(np.ascontiguousarray(part))
        return out


def _placement(size: int, device: torch.device, resident: bool | None) -> str:
    """Where the token arrays live, the first tier they fit: "device" (resident on the GPU), "memory" (host
    tensors; on a GPU run gathered into pinned memory and copied without blocking) or "memmap" (read from the
    store per batch); ``resident`` forces host memory (True) or the memmap (False)."""
    if resident is None and device.type != "cpu" and size <= _device_budget(device):
        return "device"
    if resident is None:
        resident = size <= _resident_budget()
    return "memory" if resident else "memmap"


def where(placement: str, device: torch.device, size: int) -> str:
    """A few words on one split's tier and bytes: "on cuda:0 (1.2 GB)", "in pinned host memory (...)", ..."""
    tier = {"device": f"on {device}",
            "memory": "in pinned host memory" if device.type != "cpu" else "in host memory",
            "memmap": "memory-mapped from the store"}[placement]
    return f"{tier} ({_bytes(size)})"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def placement_line(data: dict) -> str:
    """One line for the start of training: where each split's token arrays live and how many bytes they take."""
    return "token features: " + ", ".join(f"{split} {d.where()}" for split, d in data.items())


def _check_lengths(lengths: list[Tensor], widths: list[int]) -> None:
    """Every caption counts its pooled token and fits its array, checked once on the host, so that its batches can
    say so (``ModalityBatch.checked``) and the encoders never read lengths back from a GPU."""
    for k, (n, width) in enumerate(zip(lengths, widths)):
        if len(n) and (int(n.min()) < 1 or int(n.max()) > width):
            raise HadaError(f"text lengths of backbone {k} must be in 1..{width}, got {int(n.min())}..{int(n.max())}")


class FeatureData:
    """K backbones' stored features of one split, ready to batch.

    ``splits``: one FeatureSplit per backbone (same dataset and split; backbone 0 is the main one).
    ``with_tokens=False`` never reads the token arrays: batches carry only the embeddings (for the
    concatenation baseline), with empty ``tokens``/``lengths`` lists. ``augment_p``: the probability that a
    training image uses one of its stored augmented views, in every backbone or (``augment_backbones="main"``,
    the published) in backbone 0 alone; ``augment_policy``, when given, must be the policy its views were made
    with. ``captions_per_image``: keep only the first N captions of each image, in the split's order (HADA-LAVIS
    scores MSCOCO's test split on 5); caption rows then count the kept ones. ``device``: where batches are
    delivered (and the arrays kept, when they fit: :attr:`placement`).
    """

    def __init__(self, splits: Sequence, stats: FeatureStats, resident: bool | None = None,
                 with_tokens: bool = True, device: torch.device | str = "cpu", augment_p: float = 0.0,
                 augment_backbones: str = "all", captions_per_image: int | None = None,
                 augment_policy: str | None = None):
        if len(splits) < 1:
            raise HadaError("FeatureData needs at least one backbone's features")
        if len(stats.image) != len(splits) or len(stats.text) != len(splits):
            raise HadaError(f"feature statistics cover {len(stats.image)} backbones, features {len(splits)}")
        first = splits[0]
        self.caption_image_index = np.array(first.caption_image_index, dtype=np.int64)
        self.n_images = int(first.image_tokens.shape[0])
        self.n_captions = int(first.text_tokens.shape[0])
        for k, fs in enumerate(splits):
            if fs.image_tokens.shape[0] != self.n_images or fs.text_tokens.shape[0] != self.n_captions:
                raise HadaError(f"backbone {k} has {fs.image_tokens.shape[0]} images / {fs.text_tokens.shape[0]}"
                                f" captions, backbone 0 {self.n_images} / {self.n_captions}: not the same split")
            if not np.array_equal(np.asarray(fs.caption_image_index), self.caption_image_index):
                raise HadaError(f"backbone {k}'s caption order differs from backbone 0's")
        self.captions_per_image = captions_per_image
        #: the stored caption row of each kept caption (None: every caption, row i is caption i)
        self.caption_rows = first_captions(self.caption_image_index, captions_per_image)
        if self.caption_rows is not None:
            self.caption_image_index = self.caption_image_index[self.caption_rows]
            self.n_captions = len(self.caption_rows)
        keep = slice(None) if self.caption_rows is None else self.caption_rows
        self.device = torch.device(device)
        self.size_bytes = sum(a.nbytes for fs in splits for a in (fs.image_tokens, fs.text_tokens)) if with_tokens \
            else 0
        self.placement = _placement(self.size_bytes, self.device, resident)
        on_device = self.placement == "device"
        rows = {"device": self.device if on_device else None, "pin": self.device.type == "cuda" and not on_device}
        self.stats = stats
        self.splits = list(splits)
        self.with_tokens = with_tokens
        resident = self.placement != "memmap"
        self.image_tokens = [_Rows(fs.image_tokens, resident, **rows) for fs in splits] if with_tokens else []
        self.text_tokens = [_Rows(fs.text_tokens, resident, **rows) for fs in splits] if with_tokens else []
        self.text_lengths = [torch.from_numpy(np.array(fs.text_lengths[keep], dtype=np.int64)) for fs in splits]
        _check_lengths(self.text_lengths, [fs.text_tokens.shape[1] for fs in splits])
        # the embeddings are small: on the device whenever the run is
        self.image_embeds = [torch.from_numpy(np.array(fs.image_embeds, dtype=np.float32)).to(self.device)
                             for fs in splits]
        self.text_embeds = [torch.from_numpy(np.array(fs.text_embeds[keep], dtype=np.float32)).to(self.device)
                            for fs in splits]
        self.augment_p = float(augment_p)
        augmented = splits[:1] if augment_backbones == "main" else splits
        self.views = _augmented_views(augmented, with_tokens, self.device, rows, augment_policy) \
            if augment_p > 0 else None
        if self.views is not None:  # a backbone that is not augmented: None, its plain view
            self.views += [None] * (len(splits) - len(self.views))

    def describe(self) -> str:
        """One line: where the token features are, for the training log."""
        mb = self.size_bytes / 2**20
        return {"device": f"token features on {self.device} ({mb:.0f} MB)",
                "memory": f"token features in host memory ({mb:.0f} MB)"
                          + (", streamed to the device from pinned memory" if self.device.type != "cpu" else ""),
                "memmap": f"token features read from the memory-mapped store ({mb:.0f} MB)"
                          + (", streamed through pinned memory" if self.device.type != "cpu" else "")}[self.placement]

    def where(self) -> str:
        """A few words: where this split's token arrays live (see :func:`placement_line`)."""
        return where(self.placement, self.device, self.size_bytes)

    @property
    def num_backbones(self) -> int:
        return len(self.splits)

    # -- batches -----------------------------------------------------------------------------------
    @staticmethod
    def _normalise(x: Tensor, st: TokenStats, mask: Tensor | None) -> Tensor:
        """fp32 ``(x / |x| - mean) / std`` per token (``x`` itself with raw statistics), in place on a fresh copy;
        padding set to exactly zero."""
        x = x.to(torch.float32, copy=True)
        if st.raw:
            return x if mask is None else x.mul_(mask.unsqueeze(-1))
        scale = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12).mul_(st.std).reciprocal_()
        x.mul_(scale).sub_(st.mean / st.std)
        if mask is not None:
            x.mul_(mask.unsqueeze(-1))
        return x

    def to_device(self, x: Tensor) -> Tensor:
        """``x`` on the batches' device (a no-op where it already is; non-blocking from pinned memory)."""
        return x.to(self.device, non_blocking=True)

    def image_batch(self, rows: np.ndarray, augment: bool = False) -> ModalityBatch:
        """Images ``rows``; with ``augment`` (training) each one is, with probability ``augment_p``, one of its
        stored augmented views (drawn from torch's RNG, which a checkpoint keeps), its embedding too."""
        rows = np.asarray(rows, dtype=np.int64)
        idx = self.to_device(torch.from_numpy(rows))
        view = self._draw_views(len(rows)) if augment and self.views is not None else None
        tokens, lengths = [], []
        for k, store in enumerate(self.image_tokens):
            raw = store.take(rows)
            if view is not None and self.views[k] is not None:
                raw = self.views[k].tokens(raw, rows, view)
            t = self._normalise(self.to_device(raw), self.stats.image[k], None)
            tokens.append(t)
            lengths.append(torch.full((len(rows),), t.shape[1], dtype=torch.long, device=self.device))
        embeds = [e.index_select(0, idx) for e in self.image_embeds]
        if view is not None:
            embeds = [e if v is None else v.embeds(e, rows, view) for e, v in zip(embeds, self.views)]
        return ModalityBatch(tokens=tokens, lengths=lengths, embeds=embeds, checked=True)  # every token valid

    def _draw_views(self, n: int) -> np.ndarray:
        """Per image: -1 (the plain view) or the index of one of its augmented views."""
        use = torch.rand(n) < self.augment_p
        count = next(v.count for v in self.views if v is not None)
        view = torch.randint(count, (n,))
        return torch.where(use, view, torch.full_like(view, -1)).numpy()

    def text_batch(self, caps: np.ndarray) -> ModalityBatch:
        caps = np.asarray(caps, dtype=np.int64)
        idx = torch.from_numpy(caps)
        idx_device = self.to_device(idx)
        tokens, lengths = [], []
        for k, store in enumerate(self.text_tokens):
            n = self.text_lengths[k].index_select(0, idx)  # on the host: the width needs no device sync
            width = max(1, int(n.max()))
            n = self.to_device(n)
            mask = torch.arange(width, device=self.device) < n[:, None]
            stored = caps if self.caption_rows is None else self.caption_rows[caps]
            tokens.append(self._normalise(self.to_device(store.take(stored, width)), self.stats.text[k], mask))
            lengths.append(n)
        embeds = [e.index_select(0, idx_device) for e in self.text_embeds]
        return ModalityBatch(tokens=tokens, lengths=lengths, embeds=embeds, checked=True)  # see _check_lengths

    def iter_images(self, batch_size: int) -> Iterator[ModalityBatch]:
        """All images in split order (contiguous reads)."""
        for s in range(0, self.n_images, batch_size):
            yield self.image_batch(np.arange(s, min(self.n_images, s + batch_size)))

    def iter_texts(self, batch_size: int) -> Iterator[ModalityBatch]:
        """All captions in split order (contiguous reads)."""
        for s in range(0, self.n_captions, batch_size):
            yield self.text_batch(np.arange(s, min(self.n_captions, s + batch_size)))

    def main_embeddings(self, k: int = 0) -> tuple[Tensor, Tensor]:
        """Backbone k's own L2-normalised (image [n_img, E], text [n_cap, E]) embeddings."""
        return F.normalize(self.image_embeds[k], dim=-1), F.normalize(self.text_embeds[k], dim=-1)


def first_captions(caption_image_index: np.ndarray, n: int | None) -> np.ndarray | None:
    """The rows of the first ``n`` captions of each image, in split order (None for ``n`` None: every row)."""
    if n is None:
        return None
    index = np.asarray(caption_image_index, dtype=np.int64)
    order = np.argsort(index, kind="stable")  # each image's captions together, in split order
    sorted_ids = index[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_ids))[0] + 1]
    rank = np.arange(len(index)) - np.repeat(starts, np.diff(np.r_[starts, len(index)]))
    keep = np.zeros(len(index), dtype=bool)
    keep[order[rank < n]] = True
    return np.nonzero(keep)[0]


class _Views:
    """One backbone's augmented image views (``hada features extract --augment N``): tokens [V, N, T, D] and
    embeddings [V, N, E], read as rows ``view * N + image``."""

    def __init__(self, tokens, embeds, with_tokens: bool, device: torch.device, rows: dict):
        self.count, self.n = int(tokens.shape[0]), int(tokens.shape[1])
        flat = tokens.reshape((-1,) + tuple(tokens.shape[2:]))
        self.rows = _Rows(flat, resident=False, pin=rows["pin"]) if with_tokens else None
        self.embed_rows = torch.from_numpy(np.array(embeds, dtype=np.float32).reshape(-1, embeds.shape[-1]))
        self.embed_rows = self.embed_rows.to(device)

    def tokens(self, plain: Tensor, rows: np.ndarray, view: np.ndarray) -> Tensor:
        chosen = np.nonzero(view >= 0)[0]
        if not len(chosen):
            return plain
        out = plain.clone()
        aug = self.rows.take(view[chosen] * self.n + rows[chosen]).to(out.device)
        out[torch.from_numpy(chosen).to(out.device)] = aug.to(out.dtype)
        return out

    def embeds(self, plain: Tensor, rows: np.ndarray, view: np.ndarray) -> Tensor:
        chosen = np.nonzero(view >= 0)[0]
        if not len(chosen):
            return plain
        flat = torch.from_numpy(view[chosen] * self.n + rows[chosen]).to(plain.device)
        return plain.index_copy(0, torch.from_numpy(chosen).to(plain.device), self.embed_rows.index_select(0, flat))


def _augmented_views(splits: Sequence, with_tokens: bool, device: torch.device, rows: dict,
                     policy: str | None = None) -> list:
    """Each backbone's :class:`_Views` (None for a backbone without stored views: its plain view is used); views
    made with another policy than the run's ``policy`` gives the backbone (when given) are one clear error."""
    from hada.features.augment import backbone_policy

    views = []
    for index, fs in enumerate(splits):
        stored = getattr(fs, "augmented", None)
        made = getattr(fs, "augment_policy", None)
        wanted = None if policy is None else backbone_policy(policy, index)
        if stored is not None and wanted is not None and made is not None and made != wanted:
            name = (getattr(fs, "manifest", None) or {}).get("backbone", "a backbone")
            raise HadaError(f"{name}'s augmented views were made with the {made} policy, the run wants {wanted}: "
                            f"run `hada features extract --augment N --augment-policy {policy}`")
        views.append(None if stored is None else _Views(*stored, with_tokens, device, rows))
    counts = {v.count for v in views if v is not None}
    if not counts:
        raise HadaError("augment_p > 0 needs augmented image views of the training split: run "
                        "`hada features extract --augment N` (or set augment_p 0)")
    if len(counts) > 1:
        raise HadaError(f"the backbones store different numbers of augmented views ({sorted(counts)})")
    return views


class PairLoader:
    """Caption-image pairs, one item per caption (the paper's unit), in batches.

    Yields ``(image ModalityBatch, text ModalityBatch, image_index [B] long)``; ``image_index`` is the
    caption's image row in the split, the id the multi-positive targets compare. With ``shuffle`` the
    order is ``rng.permutation`` once per pass, so a checkpoint of ``rng`` reproduces the order.

    Under DDP (``world_size`` > 1) every rank draws the same order and takes the ``rank``-th contiguous slice of
    each global batch of ``batch_size * world_size`` pairs, so the ranks together see exactly the batches of one
    process with the global batch size. A short last global batch is split as evenly as possible (the first
    ranks take one pair more); if it holds fewer pairs than there are ranks it is skipped, so every rank takes
    the same number of steps.
    """

    def __init__(self, data: FeatureData, batch_size: int, shuffle: bool = True,
                 rng: np.random.Generator | None = None, drop_last: bool = False, limit: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise HadaError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise HadaError(f"rank {rank} is outside a world of {world_size} processes")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, int(batch_size), shuffle, drop_last
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.n = data.n_captions if limit is None else min(int(limit), data.n_captions)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (0 if self.drop_last or rest < self.world_size else 1)

    def _shard(self, caps: np.ndarray) -> np.ndarray:
        """This rank's contiguous slice of one global batch."""
        if self.world_size == 1:
            return caps
        return np.array_split(caps, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[tuple[ModalityBatch, ModalityBatch, Tensor]]:
        order = self.rng.permutation(self.data.n_captions) if self.shuffle else np.arange(self.data.n_captions)
        order = order[: self.n]
        for b in range(len(self)):
            caps = self._shard(order[b * self.global_batch:(b + 1) * self.global_batch])
            rows = self.data.caption_image_index[caps]
            yield (self.data.image_batch(rows, augment=True), self.data.text_batch(caps),
                   self.data.to_device(torch.from_numpy(rows)))


# ------------------------------------------------------------------------------------- in-memory stand-in
@dataclass
class ArraySplit:
    """An in-memory object with a FeatureSplit's attributes: features made in memory, without a store."""

    image_tokens: np.ndarray  # fp16 [N_img, T, D]
    image_embeds: np.ndarray  # fp16 [N_img, E]
    text_tokens: np.ndarray  # fp16 [N_cap, L, D], pooled token first, zero padded
    text_lengths: np.ndarray  # int [N_cap]
    text_embeds: np.ndarray  # fp16 [N_cap, E]
    image_ids: np.ndarray
    caption_ids: np.ndarray
    caption_image_index: np.ndarray
    manifest: dict
    augmented: tuple | None = None  # (image tokens [V, N_img, T, D], image embeds [V, N_img, E]) or None
    augment_policy: str | None = None  # the policy the views were made with (None: not recorded)
