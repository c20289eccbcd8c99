"""The token feature store: one contiguous fp16 array per (backbone, split, modality), memory-mapped.

Layout of ``features_dir()/<dataset>/<backbone>/<split>/`` (every array a ``.npy`` file, read with ``mmap``):

=======================  ==============  ==================================================================
``image_tokens``         fp16 [N, T, D]  all last-layer image tokens, CLS/pooled first
``image_embeds``         fp16 [N, E]     the backbone's own projected image embedding (not normalised)
``text_tokens``          fp16 [M, L, D]  pooled (EOT) token first, then the other valid tokens; zero-padded
                                         to L = the split's longest caption (not the context length)
``text_lengths``         int64 [M]       valid tokens per caption, including the pooled one
``text_embeds``          fp16 [M, E]     projected text embedding
``image_ids``            int64 [N]       dataset image ids, split order
``caption_ids``          int64 [M]       dataset caption ids, split order (image by image)
``caption_image_index``  int64 [M]       row (0..N-1) of each caption's image
``manifest.json``                        request (model, weights sha256, open_clip version, preprocessing,
                                         dataset json sha256, shapes, dtypes) + per-array sizes and sha256
``progress.json``                        chunks done, while an extraction is unfinished
=======================  ==============  ==================================================================

Why this shape. Extraction writes fixed-size chunks into preallocated memmaps and records progress after each
chunk is flushed, so a killed run resumes where it stopped and ends byte-identical to an uninterrupted one
(chunks are the batches, so every number is computed the same way). A request whose manifest differs from the
stored one is an error naming the difference (``force=True`` rebuilds), never a silent reuse. A store is only
read once complete; its file sizes are checked on every open, and its sha256 whenever a file's mtime changed
since completion (or always with ``verify="full"``), so a truncated or corrupted store is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from hada.errors import HadaError
from hada.io import progress_enabled, write_json
from hada.paths import features_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKEN_DTYPE = "float16"
INT_DTYPE = "int64"
IMAGE_BATCH = 128
TEXT_BATCH = 512
ARRAY_NAMES = ("image_tokens", "image_embeds", "text_tokens", "text_lengths", "text_embeds",
               "image_ids", "caption_ids", "caption_image_index")
# request keys that must agree for a store to be reused; paths and timings are informational only
COMPARED = ("format", "dataset", "dataset_json_sha256", "split", "n_images", "n_captions",
            "backbone.model", "backbone.weights_sha256", "backbone.open_clip_version", "backbone.image_size",
            "backbone.preprocess", "backbone.context_length", "backbone.quick_gelu", "chunks", "arrays")


class _Stop(Exception):
    """Raised by the test hook that stops an extraction after n chunks (simulates a kill)."""


def backbone_slug(spec: str) -> str:
    """A folder name for a backbone spec: embedded names stay; paths get a readable slug + short hash."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", spec):
        return spec
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[-48:]
    return f"{slug}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def store_dir(dataset: str, backbone: str, split: str, root: Path | None = None) -> Path:
    return Path(root or features_dir()) / dataset / backbone_slug(backbone) / split


# ------------------------------------------------------------------------------------------ reading
@dataclass
class FeatureSplit:
    """One complete store, memory-mapped read-only. Arrays are numpy memmaps (fp16 tokens, int64 indices)."""

    path: Path
    manifest: dict
    image_tokens: np.ndarray
    image_embeds: np.ndarray
    text_tokens: np.ndarray
    text_lengths: np.ndarray
    text_embeds: np.ndarray
    image_ids: np.ndarray
    caption_ids: np.ndarray
    caption_image_index: np.ndarray

    @property
    def n_images(self) -> int:
        return int(self.image_tokens.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.text_tokens.shape[0])

    def nbytes(self) -> dict[str, int]:
        return {n: int(getattr(self, n).nbytes) for n in ARRAY_NAMES}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_store(path: Path, manifest: dict, full: bool = False) -> None:
    """Raise HadaError unless every array file has its recorded size (and sha256 if changed or ``full``)."""
    sums = manifest.get("checksums")
    if not manifest.get("complete") or not sums:
        raise HadaError(f"feature store {path} is unfinished; run `hada features extract` to complete it")
    for name in ARRAY_NAMES:
        f = path / f"{name}.npy"
        rec = sums[name]
        if not f.is_file():
            raise HadaError(f"feature store {path} is damaged: {f.name} is missing; rebuild with --force")
        st = f.stat()
        if st.st_size != rec["bytes"]:
            raise HadaError(f"feature store {path} is damaged: {f.name} has {st.st_size} bytes, "
                            f"expected {rec['bytes']}; rebuild with --force")
        if full or st.st_mtime_ns != rec["mtime_ns"]:
            if _sha256(f) != rec["sha256"]:
                raise HadaError(f"feature store {path} is damaged: {f.name} sha256 differs from the manifest; "
                                "rebuild with --force")


def open_features(dataset: str, backbone: str, split: str, root: Path | None = None,
                  verify: str = "auto") -> FeatureSplit:
    """Memory-map one complete store read-only; ``verify``: "auto" (sizes, sha256 if touched) or "full"."""
    path = store_dir(dataset, backbone, split, root)
    manifest = _read_json(path / MANIFEST)
    if manifest is None:
        raise HadaError(f"no features for {dataset}/{backbone}/{split} at {path}; run "
                        f"`hada features extract --dataset {dataset} --backbones {backbone} --split {split}`")
    verify_store(path, manifest, full=(verify == "full"))
    arrays = {}
    for name in ARRAY_NAMES:
        arr = np.load(path / f"{name}.npy", mmap_mode="r")
        want = manifest["arrays"][name]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise HadaError(f"feature store {path}: {name} has shape {list(arr.shape)} {arr.dtype}, "
                            f"manifest says {want['shape']} {want['dtype']}; rebuild with --force")
        arrays[name] = arr
    return FeatureSplit(path=path, manifest=manifest, **arrays)


# ------------------------------------------------------------------------------------------ writing
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in ("backbone",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def manifest_differences(stored: dict, request: dict) -> list[str]:
    """Human-readable differences between a stored manifest and a request, on the compared keys only."""
    a, b = _flatten(stored), _flatten(request)
    diffs = []
    for key in COMPARED:
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: store has {_short(a.get(key))}, request has {_short(b.get(key))}")
    return diffs


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def build_request(backbone, dataset, split: str, text_length: int, image_tokens: tuple[int, int],
                  text_dim: int, embed_dim: int, image_batch: int, text_batch: int) -> dict:
    """The manifest a store for (backbone, dataset, split) must have; computed before any extraction."""
    import torch

    records = dataset.split(split)
    n, m = len(records), sum(len(r.captions) for r in records)
    t, d = image_tokens
    arrays = {
        "image_tokens": {"shape": [n, t, d], "dtype": TOKEN_DTYPE},
        "image_embeds": {"shape": [n, embed_dim], "dtype": TOKEN_DTYPE},
        "text_tokens": {"shape": [m, text_length, text_dim], "dtype": TOKEN_DTYPE},
        "text_lengths": {"shape": [m], "dtype": INT_DTYPE},
        "text_embeds": {"shape": [m, embed_dim], "dtype": TOKEN_DTYPE},
        "image_ids": {"shape": [n], "dtype": INT_DTYPE},
        "caption_ids": {"shape": [m], "dtype": INT_DTYPE},
        "caption_image_index": {"shape": [m], "dtype": INT_DTYPE},
    }
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "dataset_root": str(dataset.root),
        "dataset_json_sha256": dataset.json_sha256,
        "split": split,
        "n_images": n,
        "n_captions": m,
        "backbone": backbone.describe(),
        "chunks": {"images": image_batch, "captions": text_batch},
        "arrays": arrays,
        "torch_version": torch.__version__,
        "complete": False,
    }


def _probe_shapes(backbone, records) -> tuple[tuple[int, int], int, int]:
    """Token counts/widths from one real image and caption (exact, whatever the tower)."""
    from PIL import Image

    with Image.open(records[0].path) as im:
        tb = backbone.encode_image_tokens([im.convert("RGB")])
    tt = backbone.encode_text_tokens(records[0].captions[:1])
    return (tb.tokens.shape[1], tb.tokens.shape[2]), tt.tokens.shape[2], tb.embeds.shape[1]


def _load_images(backbone, records):
    import torch
    from PIL import Image

    out = []
    for r in records:
        with Image.open(r.path) as im:
            out.append(backbone.preprocess(im.convert("RGB")))
    return torch.stack(out)


def extract_split(
    backbone,
    dataset,
    split: str,
    spec: str | None = None,
    root: Path | None = None,
    *,
    force: bool = False,
    image_batch: int = IMAGE_BATCH,
    text_batch: int = TEXT_BATCH,
    progress: bool = True,
    checkpoint_seconds: float = 2.0,
    _stop_after_chunks: int | None = None,
) -> FeatureSplit:
    """Extract (or resume, or reuse) one store; returns it opened read-only."""
    import torch

    spec = spec or backbone.name
    records = dataset.split(split)
    if not records:
        raise HadaError(f"split '{split}' of {dataset.name} at {dataset.root} has no images")
    path = store_dir(dataset.name, spec, split, root)
    captions = [c for r in records for c in r.captions]
    lengths_all = torch.cat([backbone.text_lengths(captions[s:s + 4096]) for s in range(0, len(captions), 4096)])
    img_shape, text_dim, embed_dim = _probe_shapes(backbone, records)
    request = build_request(backbone, dataset, split, int(lengths_all.max()), img_shape, text_dim, embed_dim,
                            image_batch, text_batch)
    stored = _read_json(path / MANIFEST)
    if stored is not None and not force:
        diffs = manifest_differences(stored, request)
        if diffs:
            raise HadaError(f"feature store {path} was built for a different request ({'; '.join(diffs)}); "
                            "rerun with --force to rebuild it")
        if stored.get("complete"):
            return open_features(dataset.name, spec, split, root)
    if force and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    writer = _StoreWriter.open(path, request, resume=stored is not None, records=records,
                               lengths=lengths_all.numpy(), checkpoint_seconds=checkpoint_seconds,
                               stop_after_chunks=_stop_after_chunks)
    hide = not progress_enabled(progress)
    with torch.no_grad():
        timing = _extract_images(backbone, records, writer, image_batch, f"{spec} {split} images", hide)
        timing.update(_extract_captions(backbone, captions, writer, text_batch, int(lengths_all.max()), spec,
                                        f"{spec} {split} captions", hide))
    writer.close()
    _finish(path, request, timing)
    return open_features(dataset.name, spec, split, root)


class _StoreWriter:
    """An unfinished store's arrays (writable memmaps) and its progress: the chunks done of each modality.

    Progress is recorded only after the arrays are flushed, so a killed run resumes where it stopped and ends
    byte-identical to an uninterrupted one."""

    def __init__(self, path: Path, mms: dict, prog: dict, checkpoint_seconds: float, stop_after_chunks):
        self.path, self.mms, self.prog = path, mms, prog
        self.checkpoint_seconds, self.budget = checkpoint_seconds, stop_after_chunks
        self.last = time.perf_counter()

    @classmethod
    def open(cls, path: Path, request: dict, resume: bool, records, lengths: np.ndarray, **kw) -> "_StoreWriter":
        """Reopen an unfinished store's arrays (``resume``, when they are intact), else create them afresh
        with the ids and caption lengths filled in."""
        arrays = request["arrays"]
        prog = _read_json(path / PROGRESS) if resume else None
        mms = _open_partial(path, arrays) if prog is not None else None
        if mms is not None:
            return cls(path, mms, prog, **kw)
        write_json(path / MANIFEST, request, indent=1)
        mms = {name: np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=arrays[name]["dtype"],
                                               shape=tuple(arrays[name]["shape"])) for name in ARRAY_NAMES}
        mms["image_ids"][:] = [r.image_id for r in records]
        mms["caption_ids"][:] = [c for r in records for c in r.caption_ids]
        mms["caption_image_index"][:] = np.repeat(np.arange(len(records)), [len(r.captions) for r in records])
        mms["text_lengths"][:] = lengths
        for name in ("image_ids", "caption_ids", "caption_image_index", "text_lengths"):
            mms[name].flush()
        prog = {"image_chunks": 0, "caption_chunks": 0}
        write_json(path / PROGRESS, prog, indent=1)
        return cls(path, mms, prog, **kw)

    def save(self) -> None:
        for mm in self.mms.values():
            mm.flush()
        write_json(self.path / PROGRESS, self.prog, indent=1)
        self.last = time.perf_counter()

    def write_chunk(self, modality: str, k: int, start: int, batch) -> None:
        """Write chunk k of ``modality`` ("image" / "text"), rows from ``start``: a TokenBatch's tokens and
        embeddings as fp16. Every ``checkpoint_seconds``, flush the arrays and then record the chunks done, so
        a kill loses at most that much work (a flush per chunk would cost ~10% of the throughput)."""
        import torch

        for part in ("tokens", "embeds"):
            rows = getattr(batch, part).to(torch.float16).cpu().numpy()
            self.mms[f"{modality}_{part}"][start:start + len(rows)] = rows
        self.prog["image_chunks" if modality == "image" else "caption_chunks"] = k + 1
        if time.perf_counter() - self.last >= self.checkpoint_seconds:
            self.save()
        if self.budget is not None:  # test hook: simulate a kill after n chunks
            self.budget -= 1
            if self.budget <= 0:
                raise _Stop()

    def close(self) -> None:
        for mm in self.mms.values():
            mm.flush()
        self.mms = None


def _bar(total: int, initial: int, unit: str, desc: str, hide: bool):
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    return tqdm(total=total, initial=min(total, initial), unit=unit, desc=desc, disable=hide, dynamic_ncols=True)


def _extract_images(backbone, records, writer: _StoreWriter, image_batch: int, desc: str, hide: bool) -> dict:
    """Image chunks not done yet; the next chunk is decoded and preprocessed in a thread while the model runs
    on this one (PIL releases the GIL)."""
    n_img = len(records)
    bar = _bar(n_img, writer.prog["image_chunks"] * image_batch, "img", desc, hide)
    t0, done = time.perf_counter(), 0
    todo = [(k, s) for k, s in enumerate(range(0, n_img, image_batch)) if k >= writer.prog["image_chunks"]]
    loader = ThreadPoolExecutor(max_workers=1)
    pending = loader.submit(_load_images, backbone, records[todo[0][1]:todo[0][1] + image_batch]) if todo else None
    try:
        for i, (k, s) in enumerate(todo):
            chunk = records[s:s + image_batch]
            pixels = pending.result()
            if i + 1 < len(todo):
                nxt = todo[i + 1][1]
                pending = loader.submit(_load_images, backbone, records[nxt:nxt + image_batch])
            writer.write_chunk("image", k, s, backbone.encode_image_tokens(pixels))
            done += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.0f}")
    finally:
        loader.shutdown(wait=False, cancel_futures=True)
    bar.close()
    writer.save()
    return {"image_seconds": round(time.perf_counter() - t0, 3), "images": done}


def _extract_captions(backbone, captions: list[str], writer: _StoreWriter, text_batch: int, text_length: int,
                      spec: str, desc: str, hide: bool) -> dict:
    """Caption chunks not done yet, padded to the split's longest caption."""
    n_cap = len(captions)
    bar = _bar(n_cap, writer.prog["caption_chunks"] * text_batch, "cap", desc, hide)
    t0, done = time.perf_counter(), 0
    for k, s in enumerate(range(0, n_cap, text_batch)):
        if k < writer.prog["caption_chunks"]:
            continue
        texts = captions[s:s + text_batch]
        tt = backbone.encode_text_tokens(texts, max_length=text_length)
        if not np.array_equal(tt.lengths.cpu().numpy(), writer.mms["text_lengths"][s:s + len(texts)]):
            raise HadaError(f"{spec}: token lengths changed between sizing and extraction")  # pragma: no cover
        writer.write_chunk("text", k, s, tt)
        done += len(texts)
        bar.update(len(texts))
        bar.set_postfix(cap_s=f"{done / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"caption_seconds": round(time.perf_counter() - t0, 3), "captions": done}


def _open_partial(path: Path, arrays: dict) -> dict | None:
    """The unfinished arrays opened for writing, or None if any is missing or not the expected shape."""
    mms = {}
    for name in ARRAY_NAMES:
        try:
            mm = np.lib.format.open_memmap(path / f"{name}.npy", mode="r+")
        except (OSError, ValueError):
            return None
        if list(mm.shape) != arrays[name]["shape"] or str(mm.dtype) != arrays[name]["dtype"]:
            return None
        mms[name] = mm
    return mms


def _finish(path: Path, request: dict, timing: dict | None = None) -> None:
    """Record sizes, sha256 and mtimes of every array, mark complete, drop the progress file."""
    sums = {}
    for name in ARRAY_NAMES:
        f = path / f"{name}.npy"
        st = f.stat()
        sums[name] = {"bytes": st.st_size, "sha256": _sha256(f), "mtime_ns": st.st_mtime_ns}
    manifest = dict(request, complete=True, checksums=sums)
    if timing:  # the last (or only) run's share; informational
        manifest["timing"] = timing
    write_json(path / MANIFEST, manifest, indent=1)
    (path / PROGRESS).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ many stores
def ensure_features(
    dataset,
    backbones: Iterable[str],
    splits: Iterable[str],
    data_root: Path | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, FeatureSplit]]:
    """Extract whatever is missing (resuming unfinished stores) and return ``{backbone: {split: FeatureSplit}}``.

    ``dataset`` is a name ("synthetic", "flickr30k", "coco") or a loaded :class:`hada.data.datasets.Dataset`;
    ``data_root`` its folder (default: the dataset's folder under ``data/``).
    """
    from hada.backbones import load_backbone
    from hada.data.datasets import load_dataset

    ds = load_dataset(dataset, data_root) if isinstance(dataset, str) else dataset
    splits = list(splits)
    out: dict[str, dict[str, FeatureSplit]] = {}
    for spec in backbones:
        backbone = load_backbone(spec)
        out[spec] = {}
        for split in splits:
            if not force:
                try:
                    fs = open_features(ds.name, spec, split, root)
                except HadaError:
                    fs = None  # missing, unfinished or damaged: extract_split resumes or says why
                if fs is not None:
                    _check_matches(backbone, ds, split, fs)
                    out[spec][split] = fs
                    continue
            out[spec][split] = extract_split(backbone, ds, split, spec, root, force=force, progress=progress)
    return out


def _check_matches(backbone, dataset, split: str, fs: FeatureSplit) -> None:
    """A cheap request check for a complete store (no image forward): backbone + dataset keys only."""
    request = {"format": FORMAT_VERSION, "dataset": dataset.name, "dataset_json_sha256": dataset.json_sha256,
               "split": split, "backbone": backbone.describe()}
    records = dataset.split(split)
    request["n_images"] = len(records)
    request["n_captions"] = sum(len(r.captions) for r in records)
    stored = fs.manifest
    diffs = [d for d in manifest_differences(stored, {**stored, **request})]
    if diffs:
        raise HadaError(f"feature store {fs.path} was built for a different request ({'; '.join(diffs)}); "
                        "rerun `hada features extract` with --force to rebuild it")


# ------------------------------------------------------------------------------------------ size projection
FULL_SPLIT_IMAGES = {"flickr30k": 31_014, "coco": 123_287}  # Karpathy train + val + test (COCO incl. restval)


def store_shapes(spec: str) -> dict:
    """Image tokens (T, D), text width, context length and embedding width of a backbone, from its config.

    No weights are needed: ViT and ModifiedResNet shapes follow from the open_clip config; other towers are
    probed with one forward pass of a randomly initialised model.
    """
    from hada.backbones.spec import EMBEDDED_BACKBONES, load_recipes, register_model_configs
    import open_clip

    register_model_configs()
    model = load_recipes()[spec]["model"] if spec in EMBEDDED_BACKBONES else spec.split(":", 1)[0]
    cfg = open_clip.get_model_config(model.replace("/", "-"))
    if cfg is None:
        raise HadaError(f"unknown open_clip model '{model}'")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    if "timm_model_name" in v or "hf_model_name" in t:
        from hada.backbones import load_backbone

        bb = load_backbone(f"{model}:random")
        from PIL import Image

        tb = bb.encode_image_tokens([Image.new("RGB", bb.image_size)])
        tt = bb.encode_text_tokens(["a"])
        return {"image_tokens": tuple(tb.tokens.shape[1:]), "text_dim": tt.tokens.shape[2],
                "context_length": bb.context_length, "embed_dim": tb.embeds.shape[1]}
    if isinstance(v["layers"], (list, tuple)):  # ModifiedResNet: stride 32, 32x the stem width
        tokens = (1 + (size // 32) ** 2, v.get("width", 64) * 32)
    else:
        tokens = (1 + (size // v["patch_size"]) ** 2, v["width"])
    return {"image_tokens": tokens, "text_dim": t.get("width", 512), "context_length": t.get("context_length", 77),
            "embed_dim": cfg["embed_dim"]}


def projected_store_size(dataset: str = "flickr30k", backbones=("ViT-B-16",), n_images: int | None = None,
                         captions_per_image: int = 5, text_length: int | None = None):
    """Disk size of the feature store for a dataset (all Karpathy splits) and backbones, in this layout.

    Text is padded to the split's longest caption; on Flickr30k/COCO that reaches the context length, which
    is the default ``text_length``. Returns a :class:`hada.book.tables.Table` (GB = 1e9 bytes).
    """
    from hada.book.tables import Table

    n_img = n_images or FULL_SPLIT_IMAGES.get(dataset)
    if n_img is None:
        raise HadaError(f"give n_images for dataset '{dataset}'")
    n_cap = n_img * captions_per_image
    rows = []
    for spec in backbones:
        s = store_shapes(spec)
        (t, d), e = s["image_tokens"], s["embed_dim"]
        L = text_length or s["context_length"]
        per_img = t * d * 2 + e * 2 + 8
        per_cap = L * s["text_dim"] * 2 + e * 2 + 3 * 8
        rows.append({"name": spec, "image_tokens": f"{t} x {d}", "text_tokens": f"{L} x {s['text_dim']}",
                     "image_gb": n_img * per_img / 1e9, "caption_gb": n_cap * per_cap / 1e9,
                     "total_gb": (n_img * per_img + n_cap * per_cap) / 1e9})
    if len(rows) > 1:
        rows.append({"name": "total", **{k: sum(r[k] for r in rows) for k in ("image_gb", "caption_gb", "total_gb")}})
    cols = (("name", "backbone"), ("image_tokens", "image tokens"), ("text_tokens", "text tokens (padded)"),
            ("image_gb", "images GB"), ("caption_gb", "captions GB"), ("total_gb", "total GB"))
    return Table(rows, columns=cols, caption=f"{dataset}: {n_img:,} images, {n_cap:,} captions, fp16 tokens")
