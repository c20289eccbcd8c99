"""Contrastive pretraining of the embedded backbones on the synthetic ``pretrain`` split only.

This plays the role web-pretrained CLIP plays for Flickr30k: the backbones learn from coarse alt-text-like
captions (colour + shape) and never see the train/val/test splits or their detailed captions. Each backbone is
then frozen and saved as an open_clip ``local-dir`` folder under ``backbones_dir()/<name>/``:

* ``open_clip_config.json``: ``model_cfg`` + ``preprocess_cfg`` (+ a ``hada`` block: grayscale input, recipe)
* ``open_clip_model.safetensors``: the frozen weights
* ``hada_backbone.json``: recipe, seed, dataset hash, fingerprint, loss curve, wall time
* ``snapshots/epoch<N>/``: the same two open_clip files after epoch N of the recipe's ``snapshots`` (weaker
  backbones along the way, read as the spec ``<name>@<N>``; saving them changes nothing in the training)

A rerun with the same fingerprint (model config + recipe + seed + dataset json sha256) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from hada.backbones.spec import (
    CONFIG_FILE,
    MODEL_CONFIG_DIR,
    RECORD_FILE,
    SNAPSHOT_DIR,
    WEIGHTS_FILE,
    load_recipes,
    random_init_expected,
    register_model_configs,
)
from hada.errors import HadaError
from hada.io import progress_enabled, replace_folder
from hada.paths import backbones_dir

PRETRAIN_SPLIT = "pretrain"


@dataclass
class Recipe:
    """How one embedded backbone is pretrained (values come from ``embedded.json``)."""

    model: str
    grayscale: bool = False
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    hflip: bool = False  # coarse captions carry no position, so a flip keeps the pair true
    seed: int = 0
    threads: int = 2  # torch threads; part of the recipe because it can change float summation order
    snapshots: list = field(default_factory=list)  # epochs after which the weights are kept as well

    @classmethod
    def for_backbone(cls, name: str, **overrides) -> "Recipe":
        recipes = load_recipes()
        if name not in recipes:
            raise HadaError(f"unknown embedded backbone '{name}' (known: {', '.join(recipes)})")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in recipes[name].items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def model_config(model: str) -> dict:
    path = MODEL_CONFIG_DIR / f"{model}.json"
    return json.loads(path.read_text())


#: How pretraining computes, where that rounds differently from open_clip's plain forward: the text tower cut at
#: the batch's last end-of-text token (:func:`encode_text_trimmed`), images and convolutions in channels-last layout.
PRETRAIN_COMPUTE = ("text cut after the last end-of-text token", "channels-last images")


def fingerprint(name: str, recipe: Recipe, dataset_sha256: str, max_steps: int | None = None,
                device_type: str = "cpu") -> str:
    """What decides the weights: if this is unchanged, a rerun would reproduce the same backbone. A GPU draws and
    rounds differently, so its device type counts (the CPU's fingerprint is what it always was)."""
    values = {"name": name, "model_cfg": model_config(recipe.model), "recipe": asdict(recipe),
              "dataset": dataset_sha256, "max_steps": max_steps,
              "compute": PRETRAIN_COMPUTE}
    if device_type != "cpu":
        values["device"] = device_type
    blob = json.dumps(values, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_record(name: str) -> dict | None:
    path = backbones_dir() / name / RECORD_FILE
    if not path.is_file() or not (backbones_dir() / name / WEIGHTS_FILE).is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------------------- data
def _pil_steps(transform):
    """The PIL part of open_clip's eval transform (resize, crop, RGB), without ToTensor/Normalize."""
    from torchvision import transforms as T

    steps = [t for t in transform.transforms if not isinstance(t, (T.ToTensor, T.Normalize))]
    return T.Compose(steps)


def load_pretrain_arrays(records, transform, grayscale: bool, tokenizer):
    """All pretrain images as uint8 [N, H, W, 3] at the model's input size and all captions tokenised.

    Uses the model's own eval resize/crop so pretraining and feature extraction see the same pixels; the
    /255 and normalisation happen per batch (same as ToTensor + Normalize).
    """
    from PIL import Image

    pil = _pil_steps(transform)
    images, caps, owner = [], [], []
    for i, rec in enumerate(records):
        with Image.open(rec.path) as im:
            im = im.convert("RGB")
            if grayscale:
                im = im.convert("L").convert("RGB")
            images.append(np.asarray(pil(im), dtype=np.uint8))
        for c in rec.captions:
            caps.append(c)
            owner.append(i)
    ids = tokenizer(caps)
    return np.stack(images), ids, np.asarray(owner)


# --------------------------------------------------------------------------------------- training
def _lr_at(step: int, total: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class _PretrainData:
    """The pretrain split in memory: uint8 pixels [N, 3, H, W], token ids of every caption, each image's
    caption rows, and the model's pixel normalisation."""

    pixels: "torch.Tensor"
    ids: "torch.Tensor"
    caps_of: list[np.ndarray]
    mean: "torch.Tensor"
    std: "torch.Tensor"
    n_captions: int

    @classmethod
    def load(cls, records, recipe: Recipe, preprocess_cfg: dict) -> "_PretrainData":
        import open_clip
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2

        transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
        tokenizer = open_clip.get_tokenizer(recipe.model)
        images, ids, owner = load_pretrain_arrays(records, transform, recipe.grayscale, tokenizer)
        return cls(pixels=torch.from_numpy(images).permute(0, 3, 1, 2),  # uint8 NCHW
                   ids=ids, caps_of=[np.flatnonzero(owner == i) for i in range(len(images))],
                   mean=torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1),
                   std=torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), n_captions=int(len(owner)))

    @property
    def n_images(self) -> int:
        return len(self.caps_of)

    def batch(self, idx, recipe: Recipe, gen, rng) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Normalised pixels (randomly flipped when the recipe says so) and one random caption per image."""
        import torch

        x = self.pixels[idx].float().div_(255)
        if recipe.hflip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
        x = (x - self.mean) / self.std
        caps_of = self.caps_of
        cap = torch.from_numpy(np.array([caps_of[i][rng.integers(len(caps_of[i]))] for i in idx.tolist()]))
        return x, self.ids[cap]


def encode_text_trimmed(model, text, normalize: bool = True):
    """open_clip's ``CLIP.encode_text`` on ``text`` cut after the batch's last end-of-text token. The text tower is
    causal and pools at that token, so the padding behind it reaches nothing a caption's embedding depends on: the
    same embeddings and gradients (to float rounding). The pretraining captions are a few tokens in a context of
    24 to 64, so the cut skips most of the text tower's work. A model that pools otherwise runs open_clip's own."""
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        return model.encode_text(text, normalize=normalize)
    length = int(text.argmax(dim=-1).max()) + 1
    text = text[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, text, "argmax")
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Module) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x


def _optimizer(model, recipe: Recipe):
    """AdamW with weight decay on matrices only (not on embeddings, norms, biases or the logit scale)."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6, fused=True,
    )


def _train_steps(model, data: _PretrainData, recipe: Recipe, total: int, steps_per_epoch: int, bar,
                 device=None, snapshots: dict | None = None) -> list[float]:
    """``total`` contrastive steps over shuffled epochs on ``device`` (the model's; batches are drawn on the host
    with the seeded generators and copied there); returns the loss of every step. After each epoch named in
    ``recipe.snapshots`` a CPU copy of the weights goes into ``snapshots[epoch]``."""
    import torch
    from open_clip.loss import ClipLoss

    # oneDNN's convolutions run faster on NHWC: a tiny-rn step 0.252 -> 0.234 s with the pretraining captions
    model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, recipe)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < total:
        perm = torch.randperm(data.n_images, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            x, text = data.batch(perm[b * recipe.batch_size:(b + 1) * recipe.batch_size], recipe, gen, rng)
            x = x.contiguous(memory_format=torch.channels_last)
            if device is not None:
                x, text = x.to(device, non_blocking=True), text.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, recipe)
            img_f = model.encode_image(x, normalize=True)
            txt_f = encode_text_trimmed(model, text)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(round(loss.item(), 5))
            step += 1
            if snapshots is not None and step % steps_per_epoch == 0 and step // steps_per_epoch in recipe.snapshots \
                    and step < total:
                snapshots[step // steps_per_epoch] = _cpu_state(model)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{step * recipe.batch_size / elapsed:.0f}",
                            epoch=step // steps_per_epoch)
            bar.update(1)
    model.eval()
    return losses


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def train_backbone(name: str, recipe: Recipe, records, *, max_steps: int | None = None, progress: bool = True,
                   position: int = 0, device: str = "cpu"):
    """Pretrain one model from scratch on ``device``; returns (model, preprocess_cfg, record dict). Deterministic
    for a seed on one device type. The record's ``snapshots`` maps each snapshot epoch to its weights (popped by
    :func:`save_backbone`)."""
    import torch
    import open_clip
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    from hada.devices import resolve_device

    device = resolve_device(device)
    register_model_configs()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        torch.manual_seed(recipe.seed)
        with random_init_expected():  # pretraining starts from a random init
            model = open_clip.create_model(recipe.model, pretrained=None)
        preprocess_cfg = dict(model.visual.preprocess_cfg)
        data = _PretrainData.load(records, recipe, preprocess_cfg)
        steps_per_epoch = data.n_images // recipe.batch_size
        if steps_per_epoch == 0:
            raise HadaError(f"the pretrain split has {data.n_images} images, fewer than one batch of "
                            f"{recipe.batch_size}")
        total = steps_per_epoch * recipe.epochs
        if max_steps is not None:
            total = min(total, max_steps)
        t0 = time.perf_counter()
        bar = tqdm(total=total, desc=f"pretrain {name}", unit="step", disable=not progress_enabled(progress),
                   dynamic_ncols=True, position=position, leave=True)
        if device.type != "cpu":
            model.to(device)
        snapshots: dict = {}
        losses = _train_steps(model, data, recipe, total, steps_per_epoch, bar,
                              device if device.type != "cpu" else None, snapshots)
        bar.close()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
    record = {
        "name": name,
        "model": recipe.model,
        "recipe": asdict(recipe),
        "steps": total,
        "steps_per_epoch": steps_per_epoch,
        "pretrain_images": data.n_images,
        "pretrain_captions": data.n_captions,
        "loss_curve": losses,
        "final_loss": float(np.mean(losses[-max(1, steps_per_epoch // 4):])),
        "train_seconds": round(seconds, 2),
        "logit_scale": model.logit_scale.exp().item(),
        "torch_version": torch.__version__,
        "open_clip_version": open_clip.__version__,
    }
    if device.type != "cpu":  # a CPU record stays what it was
        record["device"] = device.type
    record["snapshots"] = snapshots
    return model.cpu(), preprocess_cfg, record


def save_backbone(name: str, model, preprocess_cfg: dict, recipe: Recipe, record: dict) -> Path:
    """Write the folder atomically: build it under a temporary name, then swap it into place."""
    from safetensors.torch import save_file

    root = backbones_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    snapshots = record.pop("snapshots", {})
    cfg = {
        "model_cfg": model_config(recipe.model),
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()},
        "hada": {"model": recipe.model, "grayscale": recipe.grayscale, "name": name},
    }
    save_file(_cpu_state(model), str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    spe = record.get("steps_per_epoch", 1)
    record["snapshot_epochs"] = sorted(snapshots)
    for epoch, state in sorted(snapshots.items()):
        folder = tmp / SNAPSHOT_DIR / f"epoch{epoch}"
        folder.mkdir(parents=True)
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps({**cfg, "hada": {**cfg["hada"], "name": f"{name}@{epoch}"}},
                                                     indent=2))
        losses = record["loss_curve"][max(0, epoch * spe - max(1, spe // 4)):epoch * spe]
        (folder / RECORD_FILE).write_text(json.dumps({"name": f"{name}@{epoch}", "epoch": epoch, "step": epoch * spe,
                                                      "loss": float(np.mean(losses))}, indent=1))
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return replace_folder(tmp, final)


def _train_and_save(name: str, recipe: dict, root: str, fp: str, dataset_sha: str, max_steps, progress: bool,
                    device: str, position: int) -> dict:
    """One backbone end to end; runs in a worker process when several train at once."""
    from hada.data.datasets import load_dataset

    records = load_dataset("synthetic", Path(root)).split(PRETRAIN_SPLIT)
    rec = Recipe(**recipe)
    model, pcfg, record = train_backbone(name, rec, records, max_steps=max_steps, progress=progress,
                                         position=position, device=device)
    record.update({"fingerprint": fp, "dataset_json_sha256": dataset_sha, "dataset_root": str(root),
                   "max_steps": max_steps})
    save_backbone(name, model, pcfg, rec, record)
    return record


def pretrain(
    names,
    data_root: Path | None = None,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    force: bool = False,
    workers: int = 2,
    progress: bool = True,
    log=print,
    device: str = "auto",
) -> dict[str, dict]:
    """Pretrain (or skip if up to date) each named embedded backbone on ``device``; returns their records.

    ``workers`` > 1 trains that many backbones at once in separate processes, each single-threaded (the
    recipe's ``threads``): on 2 shared cores this beats one process with 2 threads by 2-3x, and the weights
    do not depend on it.
    """
    from hada.data.datasets import load_dataset
    from hada.devices import resolve_device
    from hada.paths import synthetic_root

    device_type = resolve_device(device).type
    root = Path(data_root) if data_root is not None else synthetic_root()
    dataset = load_dataset("synthetic", root)
    if not dataset.split(PRETRAIN_SPLIT):
        raise HadaError(f"{root}: the dataset has no '{PRETRAIN_SPLIT}' split; run `hada data synth` first")
    out: dict[str, dict] = {}
    jobs = []
    for name in names:
        recipe = Recipe.for_backbone(name, epochs=epochs, batch_size=batch_size)
        fp = fingerprint(name, recipe, dataset.json_sha256, max_steps, device_type)
        have = existing_record(name)
        if have is not None and have.get("fingerprint") == fp and not force:
            log(f"{name}: up to date ({backbones_dir() / name}), skipped")
            out[name] = have
            continue
        if have is not None and not force:
            log(f"{name}: model config, recipe, seed or dataset changed since the stored one; pretraining again")
        jobs.append((name, asdict(recipe), str(root), fp, dataset.json_sha256, max_steps, progress, device))
    t0 = time.perf_counter()
    if len(jobs) > 1 and workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from hada.workers import end_with_parent

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn"),
                                 initializer=end_with_parent) as pool:
            futures = {job[0]: pool.submit(_train_and_save, *job, i) for i, job in enumerate(jobs)}
            for name, fut in futures.items():
                out[name] = fut.result()
    else:
        for i, job in enumerate(jobs):
            out[job[0]] = _train_and_save(*job, 0)
    for job in jobs:
        r = out[job[0]]
        log(f"{job[0]}: pretrained in {r['train_seconds']:.1f}s ({r['steps']} steps), "
            f"final loss {r['final_loss']:.3f} -> {backbones_dir() / job[0]}")
    if jobs:
        log(f"pretraining took {time.perf_counter() - t0:.1f}s wall for {len(jobs)} backbone(s)")
    return out
