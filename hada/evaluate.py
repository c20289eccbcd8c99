"""Scoring trained encoders: embed a split, and record results the way CLIP_benchmark does.

The recalls themselves (and the similarity sources they read) live in :mod:`hada.metrics`, the one recall
function every caller uses.
"""

from __future__ import annotations

import torch
from torch import Tensor



# ------------------------------------------------------------------------------- embedding a split
@torch.no_grad()
def embed_split(pair, data, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """L2-normalised (image [n_img, d], text [n_cap, d]) embeddings of a whole split, in split order.

    ``pair`` has ``.image``/``.text`` encoders; ``data`` is a :class:`hada.features.batching.FeatureData`.
    The encoders are put in eval mode for the call and restored afterwards. Batches go to the encoders' device
    (a no-op when the data is already there), so the embeddings stay on it for the ranking.
    """
    device = next(pair.parameters()).device
    modes = [(m, m.training) for m in (pair.image, pair.text)]
    for m, _ in modes:
        m.eval()
    try:
        img = torch.cat([pair.image(b.to(device, non_blocking=True)) for b in data.iter_images(batch_size)])
        txt = torch.cat([pair.text(b.to(device, non_blocking=True)) for b in data.iter_texts(batch_size)])
    finally:
        for m, mode in modes:
            m.train(mode)
    return img, txt


# -------------------------------------------------------------------------------- CLIP_benchmark IO
def clip_benchmark_record(metrics: dict, dataset: str, model: str, pretrained: str | None = None, **extra) -> dict:
    """One result in CLIP_benchmark's json shape (recalls in percent here)."""
    record = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": "zeroshot_retrieval",
        "metrics": {k: float(v) for k, v in metrics.items()},
        "language": "en",
    }
    record.update(extra)
    return record
