"""Image extraction throughput: hada's store path vs a bare ``encode_image`` loop fed by the same DataLoader.

ViT-B-16 at 224 px (open_clip's config, random init: throughput does not depend on the weights) reads a few
thousand generated JPEGs of Flickr30k's typical size (500 x 333) written in Flickr30k's layout. Two paths:

* ``hada``: ``hada.features.store.extract_split`` with DataLoader workers (``jobs``), the backbone on the device
  under its autocast, every token written to the fp16 store. Images per second from the manifest's
  ``timing.image_seconds`` (the image loop only: not the decode check, the captions or the checksums).
* ``bare``: the same loader (the store's own when it exposes one, else an equal DataLoader), the same batch size,
  workers and autocast, and nothing but ``model.encode_image`` on each batch; the ceiling for the store path.

The goal is hada >= 0.9 x bare. A missing piece (open_clip, or a store without DataLoader workers) prints
``skipped: <reason>`` instead of failing. ``--quick`` (8 images, in-process decoding) runs on a CPU in seconds.

    python benchmarks/bench_gpu_extract.py                 # 6144 images on CUDA when present
    python benchmarks/bench_gpu_extract.py --quick --device cpu
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from tables import markdown_table

GOAL = 0.9
SIZE = (500, 333)  # a typical Flickr30k photo


def _write_jpeg(args: tuple[Path, int]) -> None:
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    w, h = SIZE
    smooth = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(smooth, dtype=np.int16) + rng.integers(-24, 25, (h, w, 3))  # photo-like entropy
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def make_images(root: Path, n: int, procs: int) -> Path:
    """``n`` JPEGs and a Karpathy json (one caption each, all in the test split) under ``root``."""
    folder = root / "flickr30k-images"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"{1_000_000_000 + i}.jpg" for i in range(n)]
    jobs = [(folder / name, i) for i, name in enumerate(names)]
    if procs > 1:
        with Pool(procs) as pool:
            pool.map(_write_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_jpeg(job)
    images = [{"imgid": i, "filename": name, "split": "test",
               "sentences": [{"raw": "a photo of something .", "sentid": i}]} for i, name in enumerate(names)]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def _autocast(backbone, device: torch.device):
    """The backbone's own inference autocast where it has one, else bfloat16 on CUDA and nothing on a CPU."""
    if hasattr(backbone, "autocast"):
        return backbone.autocast()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _loader(backbone, records, batch: int, jobs: int, device: torch.device):
    """The store's own image loader when it has one (the very same decoding and batching), else an equal one."""
    from hada.features import store

    batches = [(s, min(len(records), s + batch)) for s in range(0, len(records), batch)]
    if hasattr(store, "_image_loader"):
        return store._image_loader(backbone, records, batches, jobs), "the store's DataLoader"
    from PIL import Image
    from torch.utils.data import DataLoader

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            with Image.open(records[i].path) as im:
                return backbone.preprocess(im.convert("RGB"))

    extra = {"prefetch_factor": 2} if jobs > 0 else {}
    return (DataLoader(Files(), batch_sampler=[list(range(s, e)) for s, e in batches], num_workers=jobs,
                       pin_memory=device.type == "cuda", **extra), "an equal DataLoader (the store has none)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(backbone, records, batch: int, jobs: int, device: torch.device, limit: int | None = None) -> float:
    """Images per second of ``encode_image`` alone on the loader's batches (``limit``: batches, for a warm-up)."""
    loader, _ = _loader(backbone, records, batch, jobs, device)
    _sync(device)
    t0, done = time.perf_counter(), 0
    with torch.no_grad():
        for i, pixels in enumerate(loader):
            if limit is not None and i >= limit:
                break
            with _autocast(backbone, device):
                backbone.model.encode_image(pixels.to(device, non_blocking=True))
            done += len(pixels)
    _sync(device)
    return done / (time.perf_counter() - t0)


def hada_path(backbone, dataset, spec: str, batch: int, jobs: int, root: Path) -> tuple[float | None, str]:
    """Images per second of ``extract_split`` (from its manifest's timing), or None and why it was skipped."""
    from hada.features import store

    params = inspect.signature(store.extract_split).parameters
    if "jobs" not in params:
        return None, "skipped: hada.features.store.extract_split takes no `jobs` (no DataLoader workers here)"
    fs = store.extract_split(backbone, dataset, "test", spec, root, image_batch=batch, jobs=jobs, progress=False)
    timing = fs.manifest.get("timing", {})
    if not timing.get("image_seconds"):
        return None, "skipped: the store's manifest records no image timing"
    return timing["images"] / timing["image_seconds"], "extract_split"


def run(args) -> list[dict]:
    """The rows of the table (also what ``--json`` appends, one json object per line)."""
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return [{"check": "extraction", "result": "skipped: open_clip is not installed"}]
    from hada.backbones import load_backbone
    from hada.data.datasets import load_dataset
    from hada.devices import resolve_device

    device = resolve_device(args.device)
    jobs = args.jobs if args.jobs is not None else (0 if device.type == "cpu" else min(8, (os.cpu_count() or 2) - 1))
    batch = args.batch or (4 if device.type == "cpu" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_images(Path(tmp) / "flickr30k", args.images, os.cpu_count() or 1)
        made = time.perf_counter() - t0
        dataset = load_dataset("flickr30k", root)
        records = dataset.split("test")
        spec = "ViT-B-16:random"
        try:
            backbone = load_backbone(spec, device=str(device))
        except TypeError:  # a load_backbone without a device
            backbone = load_backbone(spec)
            backbone.model.to(device)
        bare_loop(backbone, records, batch, jobs, device, limit=2)  # warm-up: CUDA context, kernels
        hada, how = hada_path(backbone, dataset, spec, batch, jobs, Path(tmp) / "features")
        bare = bare_loop(backbone, records, batch, jobs, device)
        _, feeding = _loader(backbone, records, batch, jobs, device)
    base = {"check": "extraction", "device": str(device), "images": args.images, "batch": batch, "workers": jobs,
            "jpeg_seconds": round(made, 1)}
    rows = [dict(base, path=f"bare encode_image, {feeding}", img_s=round(bare, 1))]
    if hada is None:
        rows.append(dict(base, path="hada extract_split", result=how))
    else:
        ratio = hada / bare
        rows.append(dict(base, path="hada extract_split", img_s=round(hada, 1), ratio=round(ratio, 2),
                         goal=f">= {GOAL}x bare", result="ok" if ratio >= GOAL else "below goal"))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 images (a CPU check of the code)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (default 6144; --quick 8)")
    p.add_argument("--batch", type=int, default=None, help="images per forward pass (default 256 on CUDA, 4 on CPU)")
    p.add_argument("--jobs", type=int, default=None,
                   help="DataLoader workers (default: cores - 1 up to 8 on CUDA, 0 on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="append the rows to this file, one json object per line")
    args = p.parse_args(argv)
    args.images = args.images or (8 if args.quick else 6144)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    header = ["path", "device", "images", "batch", "workers", "img/s", "x bare", "result"]
    print(markdown_table(header, [[r.get("path", "-"), r.get("device", "-"), r.get("images", "-"), r.get("batch", "-"),
                                   r.get("workers", "-"), r.get("img_s", "-"), r.get("ratio", "-"),
                                   r.get("result", "-")] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
