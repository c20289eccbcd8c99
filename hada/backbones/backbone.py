"""A frozen open_clip model that returns token features, not only its pooled embedding.

HADA's graph needs every last-layer token of both towers plus the model's own projected embedding. We get both
from ONE forward pass of open_clip's own ``encode_image`` / ``encode_text`` by capturing the last layer's tokens
with forward hooks, so the embedding is exactly the model's (a test checks equality) and no tower code is copied.

Token layouts:

* ViT towers: ``ln_post`` over all tokens, CLS first then patches ([B, 1 + P, width]).
* Convolutional towers (ModifiedResNet, timm CNNs): the last spatial map flattened to tokens, with its mean as
  a pooled token in front ([B, 1 + H*W, C]); the mean is what open_clip's attention pool queries with.
* Text towers: ``ln_final`` over all positions; the pooled position follows the model's own pooling rule
  (argmax = EOT for CLIP). :meth:`Backbone.encode_text_tokens` reorders to pooled first, then the other valid
  tokens in order, and zero-pads (the store layout).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from hada.backbones.spec import (CONFIG_FILE, ResolvedSpec, file_sha256, random_init_expected, register_model_configs,
                                 resolve_spec)
from hada.errors import HadaError


@dataclass
class TokenBatch:
    """Token features of one batch. ``pooled_index`` is the pooled token's position before reordering (text)."""

    tokens: Tensor  # [B, T, D] float32, pooled/CLS token first, zero-padded
    lengths: Tensor  # [B] long, valid tokens incl. the pooled one
    embeds: Tensor  # [B, E] float32, the model's own projected embedding (not normalised)
    pooled_index: Tensor | None = None
    valid: Tensor | None = None  # [B, L] bool, text only: which sequence positions are real tokens


class _Capture:
    """Holds the last tensor a hook saw; one per tower."""

    def __init__(self) -> None:
        self.value: Any = None

    def __call__(self, module, inputs, output=None):  # works as forward hook and forward pre-hook
        self.value = inputs[0] if output is None else output


def _with_outputs(run, *modules) -> tuple:
    """``run()`` with a forward hook on each of ``modules``: (its result, each module's last output)."""
    caps = [_Capture() for _ in modules]
    hooks = [m.register_forward_hook(c) for m, c in zip(modules, caps)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return (out, *(c.value for c in caps))


def _grayscale_to_rgb(image):
    """Colour-blind input: luminance copied to three channels (the model still sees RGB-shaped input)."""
    return image.convert("L").convert("RGB")


def preprocess_image(image, transform, grayscale: bool = False) -> Tensor:
    """One RGB PIL image -> model input tensor; a module-level function so DataLoader workers can run it."""
    return transform(_grayscale_to_rgb(image) if grayscale else image)


@dataclass
class Backbone:
    """A frozen open_clip model plus its preprocessing and tokenizer; build with :func:`load_backbone`."""

    name: str
    resolved: ResolvedSpec
    model: torch.nn.Module
    transform: Any  # PIL image -> tensor [3, H, W], the model's own eval preprocessing (+ grayscale if asked)
    tokenizer: Any
    preprocess_cfg: dict
    info: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- properties used by the feature store
    @property
    def grayscale(self) -> bool:
        return bool(self.resolved.hada.get("grayscale", False))

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def preprocess(self, image) -> Tensor:
        """One PIL image -> model input tensor, using the model's own eval transform."""
        return preprocess_image(image, self.transform, self.grayscale)

    def autocast(self):
        """Mixed precision for inference on CUDA (bfloat16 where supported, else float16); nothing elsewhere,
        so CPU numbers stay those of float32."""
        import contextlib

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(texts))

    def describe(self) -> dict:
        """What a feature manifest records about this backbone (weights hash, preprocessing, versions)."""
        import open_clip

        weights = self.resolved.weights
        return {
            "spec": self.resolved.spec,
            "model": self.info["model"],
            "weights_source": self.resolved.source,
            "weights_sha256": file_sha256(weights) if weights is not None else None,
            "open_clip_version": open_clip.__version__,
            "image_size": list(self.image_size),
            "preprocess": {**_jsonable(self.preprocess_cfg), "grayscale": self.grayscale},
            "context_length": self.context_length,
            "quick_gelu": self.resolved.quick_gelu,
        }

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def encode_image_tokens(self, images) -> TokenBatch:
        """All last-layer image tokens (CLS/pooled first) and the projected embedding, in one forward pass."""
        x = self._image_input(images)
        visual = self.model.visual
        kind = self.info["image_tower"]
        if kind == "vit":
            embeds, seq, ln = _with_outputs(lambda: self.model.encode_image(x), visual.transformer, visual.ln_post)
            if isinstance(ln, Tensor) and ln.ndim == 3 and ln.shape[:2] == seq.shape[:2]:
                tokens = ln  # the standard path: ln_post over all tokens, exactly what the model pooled from
            elif visual.ln_post.normalized_shape[0] == seq.shape[-1]:
                tokens = visual.ln_post(seq)  # final_ln_after_pool / attentional pool: normalise tokens the same way
            else:
                tokens = seq
        elif kind == "resnet":
            cap = _Capture()
            hook = visual.attnpool.register_forward_pre_hook(cap)
            try:
                embeds = self.model.encode_image(x)
            finally:
                hook.remove()
            tokens = _spatial_to_tokens(cap.value)
        elif kind == "timm":
            trunk = visual.trunk
            cap = _Capture()
            original = trunk.forward_features

            def forward_features(*args, **kwargs):
                out = original(*args, **kwargs)
                cap.value = out
                return out

            trunk.forward_features = forward_features
            try:
                embeds = self.model.encode_image(x)
            finally:
                del trunk.forward_features
            feats = cap.value
            if feats.ndim == 4:
                tokens = _spatial_to_tokens(feats)
            elif getattr(trunk, "num_prefix_tokens", 0) >= 1:
                tokens = feats
            else:  # no class token (e.g. SigLIP's MAP pooling): put the mean in front
                tokens = torch.cat([feats.mean(1, keepdim=True), feats], 1)
        else:  # pragma: no cover - guarded in load_backbone
            raise HadaError(f"{self.name}: unsupported image tower")
        tokens = tokens.float()
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
        return TokenBatch(tokens=tokens, lengths=lengths, embeds=embeds.float())

    def _image_input(self, images) -> Tensor:
        if isinstance(images, Tensor):
            x = images
        else:
            x = torch.stack([self.preprocess(im) for im in images])
        return x.to(self.device, non_blocking=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text_raw(self, texts_or_ids) -> TokenBatch:
        """Text tokens in sequence order ([B, L, D], L = context), valid lengths and the pooled position."""
        ids = texts_or_ids if isinstance(texts_or_ids, Tensor) else self.tokenize(texts_or_ids)
        ids = ids.to(self.device)
        kind = self.info["text_tower"]
        owner = self.model if kind == "clip" else self.model.text
        embeds, seq, ln = _with_outputs(lambda: self.model.encode_text(ids), owner.transformer, owner.ln_final)
        B, L = ids.shape
        cls_emb = getattr(owner, "cls_emb", None)
        if cls_emb is not None:  # CoCa-style: a class token appended after the sequence, normed after pooling
            tokens = torch.cat([owner.ln_final(seq[:, :-1]), owner.ln_final(seq[:, -1:])], 1)
            pooled = torch.full((B,), L, dtype=torch.long, device=ids.device)
            valid = torch.cat([ids != self.info["pad_id"], torch.ones(B, 1, dtype=torch.bool, device=ids.device)], 1)
        else:
            tokens = ln
            pooled = _pooled_position(ids, self.info["text_pool"], self.info["eos_id"])
            valid = ids != self.info["pad_id"]
        valid[torch.arange(B, device=ids.device), pooled] = True
        lengths = valid.sum(1)
        return TokenBatch(tokens=tokens.float(), lengths=lengths.long(), embeds=embeds.float(), pooled_index=pooled,
                          valid=valid)

    @torch.no_grad()
    def encode_text_tokens(self, texts_or_ids, max_length: int | None = None) -> TokenBatch:
        """Text tokens reordered to pooled first, then the other valid tokens in order; zero-padded.

        ``max_length`` pads/cuts to a fixed width (the store pads to the split's longest caption); by default the
        batch's longest caption.
        """
        raw = self.encode_text_raw(texts_or_ids)
        order = text_token_order(raw.valid, raw.pooled_index)
        tokens = torch.gather(raw.tokens, 1, order[..., None].expand(-1, -1, raw.tokens.shape[-1]))
        width = int(raw.lengths.max()) if max_length is None else int(max_length)
        if width > tokens.shape[1]:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, width - tokens.shape[1]))
        tokens = tokens[:, :width]
        keep = torch.arange(width, device=tokens.device)[None, :] < raw.lengths[:, None]
        tokens = tokens * keep[..., None]
        lengths = raw.lengths.clamp(max=width)
        return TokenBatch(tokens=tokens, lengths=lengths, embeds=raw.embeds, pooled_index=raw.pooled_index)

    def text_lengths(self, texts: Sequence[str]) -> Tensor:
        """Valid token counts from the tokenizer alone (no model), to size the store before extraction."""
        ids = self.tokenize(texts)
        B = ids.shape[0]
        valid = ids != self.info["pad_id"]
        if self.info["text_tower"] != "clip" and getattr(self.model.text, "cls_emb", None) is not None:
            return valid.sum(1) + 1
        pooled = _pooled_position(ids, self.info["text_pool"], self.info["eos_id"])
        valid[torch.arange(B), pooled] = True
        return valid.sum(1)


def text_token_order(valid: Tensor, pooled: Tensor) -> Tensor:
    """Per row, the positions: pooled first, then the other valid ones in order, then the invalid ones."""
    B, L = valid.shape
    pos = torch.arange(L, device=valid.device).expand(B, L)
    key = torch.where(valid, pos, pos + L)
    key = torch.where(pos == pooled[:, None], torch.full_like(pos, -1), key)
    return torch.argsort(key, dim=1, stable=True)


def _pooled_position(ids: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """The position open_clip's ``text_global_pool`` takes, per row."""
    B, L = ids.shape
    if pool_type == "argmax":
        return ids.argmax(dim=-1)
    if pool_type == "first":
        return torch.zeros(B, dtype=torch.long, device=ids.device)
    if pool_type == "last":
        return torch.full((B,), L - 1, dtype=torch.long, device=ids.device)
    if pool_type == "eos":
        return (ids == eos_id).int().argmax(dim=-1)
    raise HadaError(f"text pooling '{pool_type}' has no single pooled token; not supported")


def _spatial_to_tokens(fmap: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 1 + H*W, C] with the spatial mean as the pooled token in front."""
    flat = fmap.flatten(2).transpose(1, 2)
    return torch.cat([flat.mean(1, keepdim=True), flat], 1)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _tower_kinds(model) -> tuple[str, str]:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import TextTransformer, VisionTransformer

    visual = model.visual
    if isinstance(visual, VisionTransformer):
        image = "vit"
    elif isinstance(visual, ModifiedResNet):
        image = "resnet"
    elif isinstance(visual, TimmModel):
        image = "timm"
    else:
        raise HadaError(f"image tower {type(visual).__name__} is not supported for token features")
    if hasattr(model, "transformer") and hasattr(model, "ln_final"):
        text = "clip"
    elif isinstance(getattr(model, "text", None), TextTransformer):
        text = "text-transformer"
    else:
        raise HadaError(
            f"text tower {type(getattr(model, 'text', None)).__name__} is not supported for token features "
            "(Hugging Face text towers need the transformers package, which this environment does not have)"
        )
    return image, text


def load_backbone(spec: str, device: str = "cpu") -> Backbone:
    """Build a frozen backbone from a spec (see :mod:`hada.backbones.spec`); never downloads."""
    register_model_configs()
    import open_clip

    resolved = resolve_spec(spec)
    try:
        # random weights ("MODEL:random", for tests and sizes) are seeded so that every load is the same model
        quiet = random_init_expected() if resolved.kind == "random" else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[]), quiet:
            torch.manual_seed(0)
            model = open_clip.create_model(
                resolved.model_name,
                pretrained=str(resolved.weights) if resolved.weights is not None and resolved.kind != "local-dir"
                else None,
                load_weights=resolved.weights is not None,
                force_quick_gelu=resolved.quick_gelu,
                force_preprocess_cfg=resolved.preprocess_overrides or None,
                device=device,
            )
    except HadaError:
        raise
    except Exception as exc:  # a text file, random bytes, a junk .safetensors, another model's weights
        raise HadaError(f"{spec}: {resolved.weights or resolved.source} is not a weights file of {resolved.model_name} "
                        f"({_first_line(exc)}); give this model's own weights") from None
    return wrap_model(model, resolved, spec)


def _first_line(exc: Exception) -> str:
    """An exception's kind and the first line of its message (a pickle error's advice to load unsafely is left out)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch checkpoint of plain tensors"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


_TOKENIZERS: dict = {}


def _tokenizer(model_name: str, context_length: int):
    """open_clip's tokenizer for a model, built once per process (reading the BPE vocabulary takes ~0.5 s)."""
    import open_clip

    key = (model_name, context_length)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = open_clip.get_tokenizer(model_name, context_length=context_length)
    return _TOKENIZERS[key]


def caption_token_counts(spec: str, texts: Sequence[str]) -> tuple[list[int], int]:
    """Tokens each text needs under a backbone's tokenizer (start and end tokens included), and the backbone's
    context length: longer texts are cut when extracted. Reads the tokenizer only, never the weights.

    Tokenizers without ``encode`` (Hugging Face ones) count a text that fills the context as its length."""
    import open_clip

    from hada.backbones.spec import EMBEDDED_BACKBONES, load_recipes

    register_model_configs()
    name = load_recipes()[spec]["model"] if spec in EMBEDDED_BACKBONES else resolve_spec(spec).model_name
    cfg = open_clip.get_model_config(name)
    context = int(cfg["text_cfg"].get("context_length", 77)) if cfg else load_backbone(spec).context_length
    tok = _tokenizer(name, context)
    if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):
        return [len(tok.encode(t)) + 2 for t in texts], context
    counts = []
    for s in range(0, len(texts), 4096):
        ids = tok(list(texts[s:s + 4096]))
        counts += ((ids != 0).sum(1) + (ids[:, -1] != 0).long()).tolist()
    return counts, context


def wrap_model(model, resolved: ResolvedSpec, name: str | None = None) -> Backbone:
    """A :class:`Backbone` around an already built open_clip model (frozen, eval mode)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    tokenizer = _tokenizer(resolved.model_name, int(model.context_length))
    image_kind, text_kind = _tower_kinds(model)
    text_owner = model if text_kind == "clip" else model.text
    info = {
        "model": resolved.model_name,
        "image_tower": image_kind,
        "text_tower": text_kind,
        "text_pool": getattr(model, "text_pool_type", None) or getattr(text_owner, "pool_type", "argmax"),
        "eos_id": getattr(model, "text_eos_id", None) or getattr(text_owner, "eos_id", None),
        "pad_id": getattr(text_owner, "pad_id", 0),
    }
    if resolved.local_dir is not None and resolved.kind == "local-dir":
        cfg = json.loads((resolved.local_dir / CONFIG_FILE).read_text())
        info["model"] = cfg.get("hada", {}).get("model", resolved.model_name)
    return Backbone(name=name or resolved.spec, resolved=resolved, model=model, transform=transform,
                    tokenizer=tokenizer, preprocess_cfg=preprocess_cfg, info=info)
