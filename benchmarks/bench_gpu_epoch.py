"""One training epoch of a Flickr30k-size split at the paper's shapes, from random features made on the device.

The split is Flickr30k's train split: 29,000 images and 145,000 captions (5 each); the shapes are the ``paper``
shape of ``bench_train_step.py`` (577 image tokens of 768-d per backbone, 20-40 text tokens of 768-d, width 512,
4 heads of 512 channels). The token features (about 69 GB in fp16 for K = 2) are drawn with ``torch.randn`` on the
device itself and handed to hada's own batching (:class:`hada.features.batching.FeatureData`, placement "device")
and :class:`~hada.features.batching.PairLoader`; the epoch is ``hada.train``'s own epoch (objective: ITC + queue +
ITM, fused AdamW, the model's precision "auto" = bfloat16 on CUDA), after a few untimed warm-up steps.
Under torchrun every rank makes the same features and the loader shards each global batch (DDP, as ``hada train``).

Goal: an epoch in at most 15 s on one H200. ``--quick`` is a tiny shape that runs on a CPU in seconds (also with
``torchrun --nproc_per_node 2``, on gloo).

    python benchmarks/bench_gpu_epoch.py                                  # CUDA when present
    python benchmarks/bench_gpu_epoch.py --quick --device cpu
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_gpu_epoch.py --batch-sizes 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_train_step import SHAPES, Shape
from tables import markdown_table

GOAL_SECONDS = 15.0
FLICKR_TRAIN = (29_000, 5)  # images, captions per image
QUICK = Shape("quick", (17, 10), ((4, 8), (4, 8)), (64, 48), (64, 48), (32, 32), width=64, heads=2)


class DeviceRows:
    """Rows of one token array that lives on the device: what FeatureData's resident rows answer to ``take``."""

    def __init__(self, tensor: torch.Tensor):
        self.array, self.shape = tensor, tuple(tensor.shape)

    def take(self, index: np.ndarray, width: int | None = None) -> torch.Tensor:
        src = self.array if width is None else self.array[:, :width]
        return src.index_select(0, torch.from_numpy(index).to(src.device))


def _randn(shape: tuple, device: torch.device, gen: torch.Generator, chunk: int = 1024) -> torch.Tensor:
    """fp16 standard normal drawn on ``device`` in row chunks (no fp32 copy of the whole array)."""
    out = torch.empty(shape, dtype=torch.float16, device=device)
    for s in range(0, shape[0], chunk):
        e = min(shape[0], s + chunk)
        out[s:e] = torch.randn((e - s, *shape[1:]), generator=gen, device=device, dtype=torch.float16)
    return out


def device_features(shape: Shape, n_images: int, per_image: int, device: torch.device, seed: int = 0):
    """A FeatureData of K random backbones whose token arrays are drawn on ``device`` (never on the host)."""
    from hada.features.batching import ArraySplit, FeatureData, FeatureStats, TokenStats

    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_caps = n_images * per_image
    index = np.repeat(np.arange(n_images), per_image)
    splits, tokens = [], []
    for k, (t, d_img, d_txt, e) in enumerate(zip(shape.image_tokens, shape.image_dims, shape.text_dims,
                                                 shape.embed_dims)):
        lo, hi = shape.text_tokens[k]
        lengths = rng.integers(lo, hi + 1, size=n_caps)
        placeholder = lambda *s: np.broadcast_to(np.zeros((1,) * len(s), np.float16), s)  # noqa: E731
        embeds = [torch.randn(n, e).half().numpy() for n in (n_images, n_caps)]
        splits.append(ArraySplit(placeholder(n_images, t, d_img), embeds[0], placeholder(n_caps, hi, d_txt), lengths,
                                 embeds[1], np.arange(n_images), np.arange(n_caps), index, {}))
        text = _randn((n_caps, hi, d_txt), device, gen)
        text.mul_((torch.arange(hi, device=device)[None, :] < torch.from_numpy(lengths).to(device)[:, None])[..., None])
        tokens.append((_randn((n_images, t, d_img), device, gen), text))
    # random unit-variance tokens: after the per-token L2 norm their mean is 0 and their std 1/sqrt(d)
    stats = FeatureStats([TokenStats(0.0, d ** -0.5) for d in shape.image_dims],
                         [TokenStats(0.0, d ** -0.5) for d in shape.text_dims])
    data = FeatureData(splits, stats, with_tokens=False, device=device)
    data.image_tokens = [DeviceRows(i) for i, _ in tokens]
    data.text_tokens = [DeviceRows(t) for _, t in tokens]
    data.with_tokens, data.placement = True, "device"
    data.size_bytes = sum(i.nbytes + t.nbytes for i, t in tokens)
    return data


def build_run(shape: Shape, data, batch: int, device: torch.device, limit: int | None = None):
    """hada.train's own epoch state (objective, fused AdamW, schedule, PairLoader) for the paper's recipe."""
    from hada import distributed
    from hada.config import recipe
    from hada.features.batching import PairLoader
    from hada.train import _Run, _data_parallel, build_objective

    config = recipe("default", **{"model.width": shape.width, "model.out_dim": shape.width,
                                  "model.heads": shape.heads, "model.head_dim": shape.head_dim,
                                  "model.precision": "auto", "optim.batch_size": batch,
                                  "data.backbones": ["random-0", "random-1"], "device": str(device)}).resolved()
    dims = {"image_token_dims": list(shape.image_dims), "text_token_dims": list(shape.text_dims),
            "image_embed_dims": list(shape.embed_dims), "text_embed_dims": list(shape.embed_dims)}
    torch.manual_seed(0)
    objective = build_objective(config, dims).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                  fused=True if config.optim.fused else None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=config.optim.epochs)
    order_rng = np.random.default_rng(0)
    loader = PairLoader(data, batch, shuffle=True, rng=order_rng, limit=limit, rank=distributed.rank(),
                        world_size=distributed.world_size())
    return _Run(config, Path("."), device, {"train": data}, data.stats, dims, objective, optimizer, scheduler,
                loader, order_rng, {}, model=_data_parallel(objective))


def time_epoch(shape: Shape, data, batch: int, device: torch.device, warmup_steps: int = 5) -> dict:
    from hada.train import _train_epoch

    warm = build_run(shape, data, batch, device, limit=batch * warmup_steps)
    _train_epoch(warm, 1, show=False)  # CUDA context, kernels, autotuning; untimed (epochs count from 1)
    run = build_run(shape, data, batch, device)
    entry = _train_epoch(run, 1, show=False)
    return {"seconds": entry["train_time_s"], "pairs": entry["pairs"], "pairs_s": entry["pairs_per_s"],
            "loss": entry["loss"], "steps": len(run.loader)}


#: Tensor methods that wait for the device when the tensor is on a GPU: counted on the CPU, where CUDA's sync
#: debug mode has nothing to report (tests/test_faults.py counts the same, with boolean-mask indexing too).
HOST_SYNCS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy", "nonzero")
SYNC_GOAL = 2


def count_syncs(shape: Shape, data, batch: int, device: torch.device, steps: int) -> list[int]:
    """Host synchronisations in each of ``steps`` training steps of hada.train's epoch: on CUDA the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising call the CUDA runtime sees), elsewhere the
    calls of HOST_SYNCS."""
    import warnings

    import hada.train as ht

    run = build_run(shape, data, batch, device, limit=batch * steps)
    counts: list[int] = []
    step, cuda = ht._train_step, device.type == "cuda"
    saved = {name: getattr(torch.Tensor, name) for name in HOST_SYNCS}
    live = {"n": None}

    def counted(fn):
        def wrapper(*a, **kw):
            if live["n"] is not None:
                live["n"] += 1
            return fn(*a, **kw)
        return wrapper

    def counting_step(*a, **kw):
        if cuda:
            torch.cuda.synchronize(device)  # the step's own syncs only
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return step(*a, **kw)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    counts.append(sum("synchroniz" in str(w.message) for w in caught))
        live["n"] = 0
        try:
            return step(*a, **kw)
        finally:
            counts.append(live["n"])
            live["n"] = None

    import hada.model.fast.dense as dense

    fused = dense.FUSED_CPU_ATTENTION
    ht._train_step = counting_step
    if not cuda:  # the path a GPU takes: the tiled ops, not the CPU's numba kernels (which read numpy arrays)
        dense.FUSED_CPU_ATTENTION = False
        for name, fn in saved.items():
            setattr(torch.Tensor, name, counted(fn))
    try:
        ht._train_epoch(run, 1, show=False)
    finally:
        ht._train_step, dense.FUSED_CPU_ATTENTION = step, fused
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return counts


def run(args):
    """The table's rows, one per batch size, each as soon as its epoch is done (a timeout keeps the earlier ones)."""
    from hada import distributed
    from hada.devices import resolve_device

    from hada.train import train_threads

    device = resolve_device(args.device)
    if distributed.launched():
        distributed.init_from_env(device)
    if device.type == "cpu":
        torch.set_num_threads(train_threads())  # as hada.train: HADA_THREADS, else 1
    shape = QUICK if args.quick else SHAPES["paper"]
    n_images = args.images or (64 if args.quick else FLICKR_TRAIN[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    data = device_features(shape, n_images, FLICKR_TRAIN[1], device)
    made = time.perf_counter() - t0
    for batch in args.batch_sizes:
        try:
            res = time_epoch(shape, data, batch, device)
        except Exception as exc:  # a failure, not a skip (a TypeError was once DDP's unknown keyword on torch 2.11)
            import traceback

            traceback.print_exc()
            yield {"check": "epoch", "result": f"failed: {type(exc).__name__}: {exc}"}
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        goal = args.quick is False  # the goal is for the paper's shape at Flickr30k's size
        result = ("ok" if res["seconds"] <= GOAL_SECONDS else "above goal") if goal else "-"
        yield {"check": "epoch", "device": str(device), "processes": distributed.world_size(),
                     "shape": shape.name, "images": n_images, "captions": data.n_captions, "batch": batch,
                     "steps": res["steps"], "seconds": round(res["seconds"], 2), "pairs_s": round(res["pairs_s"], 1),
                     "loss": round(res["loss"], 4), "features_gb": round(data.size_bytes / 1e9, 1),
                     "features_seconds": round(made, 1), "peak_gib": None if peak is None else round(peak, 1),
                     "goal": f"<= {GOAL_SECONDS:.0f} s" if goal else "-", "result": result}
    if args.sync_steps:
        batch = args.batch_sizes[0]
        try:
            per_step = count_syncs(shape, data, batch, device, args.sync_steps)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            yield {"check": "host syncs", "result": f"failed: {type(exc).__name__}: {exc}"}
            return
        how = "cuda sync debug mode" if device.type == "cuda" else "Tensor methods that sync on a GPU"
        yield {"check": "host syncs", "device": str(device), "processes": distributed.world_size(), "batch": batch,
               "steps": len(per_step), "per_step": per_step, "how": how, "goal": f"<= {SYNC_GOAL} per step",
               "result": "ok" if per_step and max(per_step) <= SYNC_GOAL else "above goal"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny shape and 64 images (a CPU check, in seconds)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present; under torchrun the rank's GPU), cpu, "
                                                    "cuda or cuda:N")
    p.add_argument("--images", type=int, default=None, help="images of the split (default 29,000; --quick 64)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="pairs per batch and process, one epoch each (default: 64, hada's default; --quick 16)")
    p.add_argument("--sync-steps", type=int, default=0,
                   help="then count the host synchronisations in this many steps (CUDA: its sync debug mode)")
    p.add_argument("--json", type=Path, default=None, help="append the rows to this file, one json object per line")
    args = p.parse_args(argv)
    args.batch_sizes = args.batch_sizes or ([16] if args.quick else [64])
    return args


def main(argv=None) -> int:
    from hada import distributed

    args = parse_args(argv)
    rows = []
    for row in run(args):
        rows.append(row)
        if args.json and distributed.is_main():
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    if not distributed.is_main():
        return 0
    header = ["device", "processes", "shape", "captions", "batch", "steps", "epoch s", "pairs/s", "peak GiB", "result"]
    keys = ["device", "processes", "shape", "captions", "batch", "steps", "seconds", "pairs_s", "peak_gib", "result"]
    print(markdown_table(header, [[r.get(k) if r.get(k) is not None else "-" for k in keys] for r in rows
                                  if r["check"] != "host syncs"]))
    for r in rows:
        if r["check"] == "host syncs":
            print(f"host syncs per step ({r.get('how', '-')}): {r.get('per_step', '-')}; {r['result']}")
    return int(any(str(r.get("result", "")).startswith("failed") for r in rows))


if __name__ == "__main__":
    sys.exit(main())
