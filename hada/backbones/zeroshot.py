"""Zero-shot retrieval of a backbone's own embeddings, overall and per attribute.

Overall: R@1/5/10 both ways and Rsum on a split (image -> text is a hit if any of the image's captions is in the
top k). Per attribute: the synthetic splits are built from near-duplicate groups whose members differ from the
group's base scene by one edit (colour, shape, size, pattern, position, swap, count). For every (base, variant)
pair we ask, for each caption of either image, whether the backbone scores the caption's own image above the
other one: the share of correct answers per edit kind (chance 50%) says which attributes a backbone can see.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from hada.metrics import retrieval_metrics


@torch.no_grad()
def embed_split(backbone, records, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """L2-normalised image and caption embeddings of a split and each caption's image row."""
    from PIL import Image

    img, txt, owner = [], [], []
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        pics = []
        for r in chunk:
            with Image.open(r.path) as im:
                pics.append(backbone.preprocess(im.convert("RGB")))
        img.append(backbone.model.encode_image(torch.stack(pics).to(backbone.device)).float().cpu())
    caps = []
    for i, r in enumerate(records):
        caps += r.captions
        owner += [i] * len(r.captions)
    for s in range(0, len(caps), batch_size):
        ids = backbone.tokenize(caps[s:s + batch_size]).to(backbone.device)
        txt.append(backbone.model.encode_text(ids).float().cpu())
    return F.normalize(torch.cat(img), dim=-1), F.normalize(torch.cat(txt), dim=-1), np.asarray(owner)


def attribute_pairs(dataset, split: str) -> list[tuple[int, int, str]]:
    """(base row, variant row, edit kind) for every edited image of a synthetic split, rows in split order."""
    doc = json.loads((dataset.root / "dataset_flickr30k.json").read_text())
    rows = {r.image_id: i for i, r in enumerate(dataset.split(split))}
    base_of: dict[int, int] = {}
    edited = []
    for entry in doc["images"]:
        if entry.get("split") != split or "group" not in entry:
            continue
        row = rows[entry["imgid"]]
        if entry.get("edit") is None:
            base_of[entry["group"]] = row
        else:
            edited.append((entry["group"], row, entry["edit"]["kind"]))
    return [(base_of[g], row, kind) for g, row, kind in edited if g in base_of]


def attribute_accuracy(sims: torch.Tensor, caption_image_index, pairs) -> dict[str, float]:
    """Per edit kind: % of captions of a (base, variant) pair that score their own image above the other."""
    owner = np.asarray(caption_image_index)
    caps_of = defaultdict(list)
    for j, i in enumerate(owner):
        caps_of[int(i)].append(j)
    hits, totals = defaultdict(float), defaultdict(int)
    for a, b, kind in pairs:
        for own, other in ((a, b), (b, a)):
            cols = caps_of[own]
            hits[kind] += float((sims[own, cols] > sims[other, cols]).sum())
            totals[kind] += len(cols)
    return {k: 100.0 * hits[k] / totals[k] for k in sorted(totals)}


def zero_shot(backbone, dataset, split: str = "test", batch_size: int = 256) -> dict:
    """Recalls and per-attribute pair accuracy of one backbone on one split."""
    records = dataset.split(split)
    img, txt, owner = embed_split(backbone, records, batch_size)
    sims = img @ txt.T
    out = {"recalls": retrieval_metrics(sims, owner)}
    pairs = attribute_pairs(dataset, split) if dataset.name == "synthetic" else []
    if pairs:
        out["attributes"] = attribute_accuracy(sims, owner, pairs)
    return out
