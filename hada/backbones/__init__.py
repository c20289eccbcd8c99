"""Frozen open_clip backbones: loading any open_clip model offline, token features, and the embedded tiny ones.

``load_backbone(spec)`` accepts an embedded name (``tiny-vit``), ``MODEL:TAG`` (local cache only),
``MODEL:/path/to/weights`` or ``local-dir:/path``; it never downloads. ``hada backbones pretrain`` writes the
embedded backbones under ``hada.paths.backbones_dir()``.
"""

from hada.backbones.backbone import Backbone, TokenBatch, load_backbone, text_token_order
from hada.backbones.spec import EMBEDDED_BACKBONES, ResolvedSpec, register_model_configs, resolve_spec

__all__ = [
    "EMBEDDED_BACKBONES",
    "Backbone",
    "ResolvedSpec",
    "TokenBatch",
    "load_backbone",
    "register_model_configs",
    "resolve_spec",
    "text_token_order",
]
