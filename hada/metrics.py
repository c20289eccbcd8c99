"""Retrieval recalls (R@1/5/10 both ways, Rsum) in bounded memory, named as CLIP_benchmark names them.

The one recall function of the package: every row of the results table (a backbone alone, similarity
averaging, the concatenation baseline, HADA), the backbones' zero-shot scores and the synthetic data's
trivial baselines all hand :func:`retrieval_metrics` a similarity (a dense matrix,
weighted sums of embedding dot products, or any block function), images x captions.

Definitions (Karpathy protocol, any number of captions per image):

* ``text_retrieval_recall@k`` (image -> text): an image is a hit if ANY of its captions is among the
  k captions scored highest for it.
* ``image_retrieval_recall@k`` (text -> image): a caption is a hit if its one image is in its top k.
* ``rsum``: the sum of the six recalls. All in percent (CLIP_benchmark reports fractions).

**Ties.** The rank of a positive is the number of candidates scored *strictly* higher than it, so a
tie between a positive and a negative counts in favour of the positive. The result is deterministic
and independent of any sort order; it is optimistic only for exact ties, which real-valued scores
almost never produce.

**Memory.** Image -> text ranks are computed on stripes of full rows, text -> image ranks on
stripes of full columns, each stripe at most ``max_block_elements`` scores. Each direction compares
a positive only with scores from the same block computation, so floating-point differences between
differently shaped matrix products can never make a positive outrank itself. Blocks are ranked on the device
they come from (a GPU for embeddings there); only the ranks return to the host.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from hada.errors import HadaError

KS = (1, 5, 10)
#: Torch CPU threads of every scoring step (embedding a split, similarity products). Fixed, because the rounding of
#: CPU matrix products follows the thread count (under bfloat16 autocast, by enough to move a rank): a run scored
#: by ``hada train``, ``hada evaluate``, ``hada search`` or the book then gets the same numbers whatever the
#: caller's thread count.
SCORING_THREADS = 1
METRIC_KEYS = tuple(f"text_retrieval_recall@{k}" for k in KS) + tuple(f"image_retrieval_recall@{k}" for k in KS)


@contextlib.contextmanager
def scoring_threads():
    """Run the enclosed scoring step on :data:`SCORING_THREADS` torch threads, restoring the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(SCORING_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ similarity sources
@runtime_checkable
class SimilaritySource(Protocol):
    """Anything that can produce a block of the images x captions similarity matrix on request."""

    shape: tuple[int, int]

    def block(self, rows: slice, cols: slice) -> Tensor: ...


def _as_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    else:
        t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class DenseSimilarity:
    """A full matrix already in memory (tensor, array or read-only memmap)."""

    matrix: object

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.matrix.shape)  # type: ignore[return-value]

    def block(self, rows: slice, cols: slice) -> Tensor:
        return _as_tensor(self.matrix[rows, cols])


class EmbeddingSimilarity:
    """``sum_t weight_t * image_t @ text_t.T``: one backbone's cosine, an average, or HADA's mix.

    Embeddings are used as given (normalise them first for cosines); they may be memmaps, only the
    requested rows are converted.
    """

    def __init__(self, terms: Sequence[tuple[float, object, object]]):
        if not terms:
            raise HadaError("EmbeddingSimilarity needs at least one (weight, image, text) term")
        self.terms = [(float(w), img, txt) for w, img, txt in terms]
        n_img, n_cap = len(self.terms[0][1]), len(self.terms[0][2])
        for _, img, txt in self.terms:
            if len(img) != n_img or len(txt) != n_cap:
                raise HadaError("all similarity terms must cover the same images and captions")
        self.shape = (n_img, n_cap)

    def block(self, rows: slice, cols: slice) -> Tensor:
        out = None
        for w, img, txt in self.terms:
            if w == 0.0:
                continue
            part = _as_tensor(img[rows]).float() @ _as_tensor(txt[cols]).float().T
            out = w * part if out is None else out.add_(part.to(out.device), alpha=w)
        if out is None:
            n = len(range(*rows.indices(self.shape[0])))
            m = len(range(*cols.indices(self.shape[1])))
            out = torch.zeros(n, m)
        return out


@dataclass
class FunctionSimilarity:
    """Wraps ``fn(rows: slice, cols: slice) -> Tensor`` with the full matrix's shape."""

    fn: Callable[[slice, slice], object]
    shape: tuple[int, int]

    def block(self, rows: slice, cols: slice) -> Tensor:
        return _as_tensor(self.fn(rows, cols))


def as_similarity(sims, n_images: int | None = None, n_captions: int | None = None) -> SimilaritySource:
    if isinstance(sims, (Tensor, np.ndarray)):
        if sims.ndim != 2:
            raise HadaError(f"a similarity matrix must be 2-d (images x captions), got shape {tuple(sims.shape)}")
        return DenseSimilarity(sims)
    if isinstance(sims, SimilaritySource):
        return sims
    if callable(sims):
        if n_images is None or n_captions is None:
            raise HadaError("a similarity function needs n_images (and the caption count) to be given")
        return FunctionSimilarity(sims, (int(n_images), int(n_captions)))
    raise HadaError(f"cannot score a similarity of type {type(sims).__name__}")


# ------------------------------------------------------------------------------------------ ranks
def _check_block(block: Tensor, expect: tuple[int, int]) -> Tensor:
    if tuple(block.shape) != expect:
        raise HadaError(f"similarity block has shape {tuple(block.shape)}, expected {expect}")
    if torch.isnan(block).any():
        raise HadaError("the similarity matrix contains NaN; the model or features are broken")
    return block


def retrieval_ranks(
    sims,
    caption_image_index,
    n_images: int | None = None,
    max_block_elements: int = 1 << 24,
) -> tuple[Tensor, Tensor]:
    """0-based ranks of the best positive: ``(image_to_text [n_img], text_to_image [n_cap])``.

    A rank is the count of candidates scored strictly higher than the (best) positive. The similarity products
    run on :data:`SCORING_THREADS` threads, so the ranks do not follow the caller's thread count.
    """
    with scoring_threads():
        return _retrieval_ranks(sims, caption_image_index, n_images, max_block_elements)


def _retrieval_ranks(sims, caption_image_index, n_images, max_block_elements) -> tuple[Tensor, Tensor]:
    ci = torch.as_tensor(np.asarray(caption_image_index), dtype=torch.long).view(-1)
    n_cap = ci.numel()
    src = as_similarity(sims, n_images, n_cap)
    n_img, n_cols = src.shape
    if n_cols != n_cap:
        raise HadaError(f"similarity has {n_cols} caption columns but caption_image_index has {n_cap} entries")
    if n_cap == 0 or n_img == 0:
        raise HadaError("nothing to score: no images or no captions")
    if int(ci.min()) < 0 or int(ci.max()) >= n_img:
        raise HadaError(f"caption_image_index must lie in [0, {n_img}); got [{int(ci.min())}, {int(ci.max())}]")
    per_image = torch.bincount(ci, minlength=n_img)
    if bool((per_image == 0).any()):
        raise HadaError(f"{int((per_image == 0).sum())} image(s) have no caption; image->text recall is undefined")

    # image -> text: stripes of full rows; captions sorted by image so a stripe's positives are contiguous.
    order = torch.argsort(ci, stable=True)
    ci_sorted = ci[order]
    i2t = torch.empty(n_img, dtype=torch.long)
    step = max(1, max_block_elements // n_cap)
    for i0 in range(0, n_img, step):
        i1 = min(n_img, i0 + step)
        s = _check_block(src.block(slice(i0, i1), slice(0, n_cap)), (i1 - i0, n_cap))
        lo, hi = torch.searchsorted(ci_sorted, torch.tensor([i0, i1])).tolist()
        caps = order[lo:hi]
        local, caps = (ci[caps] - i0).to(s.device), caps.to(s.device)  # the block's device (no-op on CPU)
        best = torch.full((i1 - i0,), -math.inf, dtype=s.dtype, device=s.device)
        best = best.scatter_reduce(0, local, s[local, caps], reduce="amax", include_self=True)
        i2t[i0:i1] = (s > best[:, None]).sum(dim=1, dtype=torch.int32).cpu()

    # text -> image: stripes of full columns.
    t2i = torch.empty(n_cap, dtype=torch.long)
    step = max(1, max_block_elements // n_img)
    for j0 in range(0, n_cap, step):
        j1 = min(n_cap, j0 + step)
        s = _check_block(src.block(slice(0, n_img), slice(j0, j1)), (n_img, j1 - j0))
        pos = s[ci[j0:j1].to(s.device), torch.arange(j1 - j0, device=s.device)]
        t2i[j0:j1] = (s > pos[None, :]).sum(dim=0, dtype=torch.int32).cpu()
    return i2t, t2i


def metrics_from_ranks(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = 100.0 * float((i2t_ranks < k).double().mean())
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = 100.0 * float((t2i_ranks < k).double().mean())
    out["rsum"] = sum(out[f"text_retrieval_recall@{k}"] + out[f"image_retrieval_recall@{k}"] for k in ks)
    return out


def save_ranks(path, ranks: tuple) -> None:
    """Per-query ranks ``(image->text, text->image)`` as one ``.npz`` (``i2t``, ``t2i``), written atomically (two
    processes may write the same ranks)."""
    import io

    from hada.io import write_bytes

    arrays = [r.cpu().numpy() if hasattr(r, "cpu") else np.asarray(r) for r in ranks]
    buffer = io.BytesIO()
    np.savez(buffer, i2t=arrays[0], t2i=arrays[1])
    write_bytes(Path(path), buffer.getbuffer())


def load_ranks(path) -> tuple:
    """The ``(image->text, text->image)`` ranks :func:`save_ranks` wrote, as numpy arrays."""
    with np.load(path) as f:
        return f["i2t"], f["t2i"]


def retrieval_metrics(
    sims,
    caption_image_index,
    n_images: int | None = None,
    max_block_elements: int = 1 << 24,
) -> dict[str, float]:
    """R@1/5/10 both ways and Rsum (percent) of an images x captions similarity.

    ``sims``: a 2-d tensor/array, a :class:`SimilaritySource` (e.g. :class:`EmbeddingSimilarity`,
    so the full matrix never exists), or a callable ``fn(rows: slice, cols: slice)`` with
    ``n_images`` given. ``caption_image_index[j]`` is the row of caption j's image.
    """
    i2t, t2i = retrieval_ranks(sims, caption_image_index, n_images, max_block_elements)
    return metrics_from_ranks(i2t, t2i)


# ------------------------------------------------------------------------------------ paired bootstrap
@dataclass(frozen=True)
class PairedBootstrap:
    """Rsum(a) - Rsum(b) on the test split and its percentile interval over resampled test images.

    ``difference`` is in Rsum points, ``relative`` in percent of b's Rsum (the paper's "+3.6%"), each with its
    ``(low, high)`` interval at ``level``. The point estimates are the full split's, not the resamples' mean.
    """

    difference: float
    difference_interval: tuple[float, float]
    relative: float
    relative_interval: tuple[float, float]
    level: float
    n_boot: int
    seed: int

    @property
    def verdict(self) -> str:
        """``"holds"`` (the interval lies above 0), ``"reversed"`` (below 0) or ``"within noise"`` (contains 0)."""
        low, high = self.difference_interval
        return "holds" if low > 0 else "reversed" if high < 0 else "within noise"


def bootstrap_counts(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n_images]``: how often each image is drawn in each resample of ``n_images`` images with
    replacement (numpy's PCG64 seeded with ``seed``, so the same on every machine)."""
    if n_images < 1 or n_boot < 1:
        raise HadaError(f"a bootstrap needs at least one image and one resample; got {n_images} and {n_boot}")
    draws = np.random.default_rng(seed).integers(0, n_images, size=(n_boot, n_images))
    flat = (draws + n_images * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_images).reshape(n_boot, n_images).astype(np.float64)


def _hits_per_image(system, caption_image_index: np.ndarray, n_images: int, ks) -> tuple[np.ndarray, np.ndarray]:
    """A system's hits summed per image, averaged over its seeds: image->text ``[n_img, len(ks)]`` (0/1 per
    image) and text->image ``[n_img, len(ks)]`` (hits among the image's captions)."""
    i2t_hits = np.zeros((n_images, len(ks)))
    t2i_hits = np.zeros((n_images, len(ks)))
    for i2t, t2i in system:
        i2t, t2i = np.asarray(i2t).reshape(-1), np.asarray(t2i).reshape(-1)
        if i2t.shape != (n_images,) or t2i.shape != caption_image_index.shape:
            raise HadaError(f"ranks of {i2t.size} images and {t2i.size} captions; the split has {n_images} "
                            f"images and {caption_image_index.size} captions")
        thresholds = np.asarray(ks)[None, :]
        i2t_hits += i2t[:, None] < thresholds
        for j, k in enumerate(ks):
            t2i_hits[:, j] += np.bincount(caption_image_index, weights=(t2i < k).astype(np.float64), minlength=n_images)
    return i2t_hits / len(system), t2i_hits / len(system)


def _rsum_of_counts(counts: np.ndarray, i2t_hits: np.ndarray, t2i_hits: np.ndarray,
                    captions_per_image: np.ndarray) -> np.ndarray:
    """Rsum of each resample (a row of ``counts``): recalls are count-weighted means of the per-query hits."""
    i2t = counts @ i2t_hits.sum(axis=1) / counts.sum(axis=1)
    t2i = counts @ t2i_hits.sum(axis=1) / (counts @ captions_per_image)
    return 100.0 * (i2t + t2i)


def paired_bootstrap(a, b, caption_image_index, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                     ks: Sequence[int] = KS) -> PairedBootstrap:
    """How much better system ``a`` is than ``b`` (Rsum), with a paired percentile bootstrap over test images.

    ``a`` and ``b`` are lists of ``(image_to_text, text_to_image)`` rank pairs (:func:`retrieval_ranks`), one
    per seed; a system with several seeds is their mean (its Rsum is the mean of their Rsums). Each resample
    draws the test images with replacement, each with all its captions, and recomputes both directions'
    recalls of both systems from their per-query hits on the same draw: the candidates a query is ranked
    against stay the full split's, so nothing is re-embedded or re-ranked, and 2,000 resamples of 1,000 images
    take a fraction of a second. The interval is over test queries only; seed noise is not in it.
    """
    for system in (a, b):
        if not isinstance(system, (list, tuple)) or not system or any(len(pair) != 2 for pair in system):
            raise HadaError("a system for the bootstrap is a list of (image_to_text, text_to_image) rank pairs, "
                            "one per seed (retrieval_ranks gives one pair)")
    ci = np.asarray(caption_image_index, dtype=np.int64).reshape(-1)
    n_images = int(np.asarray(a[0][0]).size)
    if ci.size == 0 or ci.min() < 0 or ci.max() >= n_images or np.bincount(ci, minlength=n_images).min() == 0:
        raise HadaError(f"caption_image_index must give every one of the {n_images} images at least one caption")
    if not 0 < level < 1:
        raise HadaError(f"the interval level must lie in (0, 1), got {level}")
    hits_a = _hits_per_image(a, ci, n_images, ks)
    hits_b = _hits_per_image(b, ci, n_images, ks)
    per_image = np.bincount(ci, minlength=n_images).astype(np.float64)
    counts = np.vstack([np.ones((1, n_images)), bootstrap_counts(n_images, n_boot, seed)])
    rsum_a = _rsum_of_counts(counts, *hits_a, per_image)
    rsum_b = _rsum_of_counts(counts, *hits_b, per_image)
    difference, relative = rsum_a - rsum_b, 100.0 * (rsum_a - rsum_b) / np.maximum(rsum_b, 1e-12)
    tails = 100.0 * np.array([(1 - level) / 2, (1 + level) / 2])

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values[1:], tails)
        return float(low), float(high)

    return PairedBootstrap(float(difference[0]), interval(difference), float(relative[0]), interval(relative),
                           float(level), int(n_boot), int(seed))


# ------------------------------------------------------------------------------- rows and statistics
#: A result row's numbers: the six recalls and their sum, in the tables' order.
ROW_METRICS = METRIC_KEYS + ("rsum",)


def metric_row(name: str, metrics, **extra) -> dict:
    """A plain result row from a metrics dict (CLIP_benchmark names): ``name``, ``extra`` and the six recalls and
    Rsum as floats. The book renders such rows (``hada.book.tables``); nothing here formats them."""
    row = {"name": name, **extra}
    row.update({key: float(metrics[key]) for key in ROW_METRICS})
    return row


def relative_gain(value: float, reference: float) -> float:
    """Percent change of ``value`` over ``reference`` (the paper's "+3.6% Rsum")."""
    return 100.0 * (value - reference) / reference


def seed_std(values: Sequence[float]) -> float:
    """The seed spread: sample standard deviation (n - 1) of one configuration's values over its seeds; nan with
    one seed. The one place the package computes it."""
    values = [float(v) for v in values]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def seed_band(values: Sequence[float]) -> float:
    """Twice :func:`seed_std`: a difference inside it is not told apart from seed noise."""
    return 2.0 * seed_std(values)


def beyond(delta: float, band: float) -> bool:
    """Whether a difference lies outside a seed band (False when the band is nan: one seed tells nothing)."""
    return abs(delta) > band


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of two sequences (nan with fewer than three values)."""
    if len(x) < 3:
        return float("nan")
    ranks = [np.argsort(np.argsort(np.asarray(v, dtype=float))) for v in (x, y)]
    return float(np.corrcoef(*ranks)[0, 1])


def pick_rows(n_rows: int, wanted: Sequence[tuple[str, np.ndarray, int]], seed: int = 0,
              n_random: int = 0) -> list[tuple[int, str]]:
    """``(row, reason)`` of the examples a chapter shows, the same on every rebuild: in one seeded permutation of
    ``n_rows`` rows, its first ``n_random`` (reason "random"), then for each ``(reason, mask, n)`` of ``wanted``
    the first ``n`` of the remaining rows where ``mask`` holds (fewer if there are fewer). The one example picker
    (``hada.attention.choose_examples``, ``hada.search.choose_queries``)."""
    order = [int(j) for j in np.random.default_rng(seed).permutation(n_rows)]
    chosen = [(j, "random") for j in order[:n_random]]
    for reason, mask, n in wanted:
        mask = np.asarray(mask, dtype=bool)
        chosen += [(j, reason) for j in order[n_random:] if mask[j]][:n]
    return chosen


#: What a result row is: one backbone alone, the backbones' similarity average, the trained concatenation +
#: linear baseline, HADA, or a variant of HADA. Rows are found by their ``kind``, never by their label.
ROW_KINDS = ("backbone", "average", "concat", "hada", "variant")


def row_label(kind: str, backbones: Sequence[str], k: int | None = None) -> str:
    """The one place a result row's label is built: ``backbones[k]`` for a backbone, ``average(A + B)``,
    ``concat(A + B) + linear``, ``HADA (K=2)`` (a variant names itself). ``backbones`` are the backbones' labels
    (:func:`hada.labels.backbone_labels` of the specs: a model's name, never a weights file's path); the callers
    label them, outside the code a run's key covers."""
    if kind == "backbone":
        return backbones[k]
    joined = " + ".join(backbones)
    labels = {"average": f"average({joined})", "concat": f"concat({joined}) + linear",
              "hada": f"HADA (K={len(backbones)})"}
    if kind not in labels:
        raise HadaError(f"no label for a row of kind {kind!r}")
    return labels[kind]
