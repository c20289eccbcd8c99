"""How a page or a table names a backbone: by its model, never by the path of a weights file.

A spec (``hada.backbones.spec``) may hold a path of the machine it runs on (``ViT-B-16:/weights/vit_b_16.bin``,
``local-dir:/models/clip``); a result row, a figure's legend or a chapter's sentence names the backbone by its
model name (``ViT-B-16``), an open_clip folder by the folder's name, and only where two backbones of one table
would then share a name adds what tells them apart: the weights file's stem or the pretrained tag
(``ViT-B-16 (vit_b_16_openai)``). Embedded names (``tiny-vit``, ``tiny-vit@1``) are already names.

Outside the code that computes a run's result (:data:`hada.runs.RESULT_ENTRY_POINTS` does not reach it), so a
label changes no run's key.
"""

from __future__ import annotations

from collections import Counter
from pathlib import PurePath
from typing import Sequence

LOCAL_DIR = "local-dir:"


def _parts(spec: str) -> tuple[str, str]:
    """``(model name, what tells two specs of that model apart)``: the weights file's stem, the pretrained tag, or
    nothing."""
    spec = str(spec)
    if spec.startswith(LOCAL_DIR):
        folder = PurePath(spec[len(LOCAL_DIR):].rstrip("/\\"))
        return folder.name or "local-dir", folder.parent.name
    model, sep, rest = spec.partition(":")
    if not sep:
        return spec, ""
    if "/" in rest or "\\" in rest or rest.startswith("~"):
        return model, PurePath(rest.replace("\\", "/")).stem
    return model, rest  # an open_clip pretrained tag


def backbone_labels(specs: Sequence[str]) -> list[str]:
    """The label of each of ``specs`` (the backbones of one table or figure), in order: its model name, with the
    weights file's stem or the tag where two share the model name, and a number where even that is shared."""
    parts = [_parts(s) for s in specs]
    models = Counter(model for model, _ in parts)
    labels = [model if models[model] == 1 or not extra else f"{model} ({extra})" for model, extra in parts]
    counts, seen = Counter(labels), Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return out

