"""Seconds per training epoch of the default K=2 HADA configuration under each speed lever.

The book trains about a dozen HADA variants on 2 CPU cores, so the time of one epoch of the default
configuration (train split of the embedded data: 15,000 caption-image pairs, batch 64, momentum encoders,
queue and ITM on) decides how long the book takes. Levers, each a setting of :class:`~hada.config.TrainConfig`
or a process setting:

* ``precision``: ``fp32`` or ``bf16`` (the encoders' matrix products under bfloat16 autocast);
* ``head_dim``: channels per GATv2 head; ``W`` = width (the paper: 4 heads x 512 concatenated), or
  width / heads;
* ``threads``: torch CPU threads (``HADA_THREADS``, ``hada train --threads``);
* ``fused``: torch's fused AdamW (``optim.fused``). ``before`` = all levers off (fp32, head_dim =
  width, per-tensor AdamW); the GATv2 kernel itself is the current one in every row.

Method: one worker process per thread count, because OpenMP threads cannot be changed inside a process
without the idle ones spinning into the next measurement. Inside a worker the rows' training steps (batch
building, objective, backward, AdamW) are interleaved round robin on the same batches, so that load from
other users of a shared machine hits every row alike; the workers alternate for ``--rounds`` rounds.
Seconds per epoch = median step time x batches per epoch + the validation pass (embedding the val split
and computing recalls, as ``hada.train`` does after each epoch). The process CPU time of each step is
reported too: with one thread it is what the step takes when the thread has a core to itself (an
idle-machine estimate). Uses the stored features of the embedded data when present, else random features
of the same shapes (the header says which).

    .venv/bin/python benchmarks/bench_epoch.py --quick      # < 1 min
    .venv/bin/python benchmarks/bench_epoch.py              # 3 rounds x 10 steps, the full thread comparison
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from tables import markdown_table

BACKBONES = ("tiny-vit", "tiny-rn")
#: Shapes of the embedded feature stores (train split), used for random features when no store exists:
#: (image tokens, image token dim, text tokens, text token dim, embed dim) per backbone.
STORE_SHAPES = {"tiny-vit": (65, 128, 51, 128, 128), "tiny-rn": (10, 384, 24, 96, 128)}
SPLIT_SIZES = {"train": 3000, "val": 500}  # images; 5 captions each


@dataclass(frozen=True)
class Row:
    """One measured setting."""

    name: str
    threads: int
    fused: bool  # fused AdamW
    precision: str
    head_dim: int | None

    def overrides(self) -> dict:
        return {"precision": self.precision, "head_dim": self.head_dim, "fused": self.fused}


def default_rows(threads: list[int]) -> list[Row]:
    """``before`` and the precision x head_dim grid at one thread; the default config at other counts (a
    second OpenMP thread on a busy machine can make steps tens of times slower: keep those rows few)."""
    rows = [Row("before", 1, False, "fp32", None)]
    for t in threads:
        grid = [("fp32", None), ("bf16", None), ("fp32", 32), ("bf16", 32)] if t == 1 else [("bf16", 32)]
        rows += [Row(f"{p} hd={'W' if h is None else h}", t, True, p, h) for p, h in grid]
    return rows


# ------------------------------------------------------------------------------------------------ data
def random_splits(split: str, seed: int = 0):
    """Random fp16 features with the embedded stores' shapes (zero-padded captions of random length)."""
    import numpy as np

    from hada.features.batching import ArraySplit

    rng = np.random.default_rng(seed)
    n_img = SPLIT_SIZES[split]
    n_cap = 5 * n_img
    cap_img = np.repeat(np.arange(n_img), 5)
    out = []
    for b in BACKBONES:
        t_img, d_img, t_txt, d_txt, e = STORE_SHAPES[b]
        lengths = rng.integers(5, t_txt + 1, size=n_cap)
        text = rng.standard_normal((n_cap, t_txt, d_txt), dtype=np.float32)
        text[np.arange(t_txt)[None, :] >= lengths[:, None]] = 0.0
        out.append(ArraySplit(rng.standard_normal((n_img, t_img, d_img), dtype=np.float32).astype(np.float16),
                              rng.standard_normal((n_img, e), dtype=np.float32).astype(np.float16),
                              text.astype(np.float16), lengths, rng.standard_normal((n_cap, e)).astype(np.float16),
                              np.arange(n_img), np.arange(n_cap), cap_img, {"backbone": f"random-{b}"}))
    return out


def load_splits(split: str, source: str):
    """(splits, description): the embedded stores, or random features of their shapes."""
    if source in ("auto", "store"):
        try:
            from hada.features.store import open_features

            return [open_features("synthetic", b, split) for b in BACKBONES], "stored embedded features"
        except Exception as exc:  # noqa: BLE001 - any missing/broken store: fall back (or fail if asked)
            if source == "store":
                raise
            print(f"  (no usable feature store: {exc}; random features of the same shapes)", file=sys.stderr)
    return random_splits(split), "random features with the stores' shapes"


# ---------------------------------------------------------------------------------------------- worker
def worker(spec: dict) -> dict:
    """Interleaved steps of the rows of one thread count; returns their timings."""
    import torch

    torch.set_num_threads(spec["threads"])
    import numpy as np

    from hada.features.batching import FeatureData, PairLoader, compute_stats
    from hada.config import recipe
    from hada.train import TrainedModel, build_objective, feature_dims

    train_splits, source = load_splits("train", spec["source"])
    val_splits, _ = load_splits("val", spec["source"])
    stats = compute_stats(train_splits)
    train_data, val_data = FeatureData(train_splits, stats), FeatureData(val_splits, stats)
    dims = feature_dims(train_splits)
    base = recipe("miniature", backbones=list(BACKBONES))
    rows = []
    for r in spec["rows"]:
        cfg = base.override(**Row(**r).overrides())
        torch.manual_seed(0)
        objective = build_objective(cfg, dims)
        params = [p for p in objective.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                fused=True if cfg.optim.fused else None)
        loader = PairLoader(train_data, cfg.optim.batch_size, rng=np.random.default_rng(0))
        rows.append({"row": r, "cfg": cfg, "objective": objective, "opt": opt, "batches": iter(loader),
                     "n_batches": len(loader), "steps": [], "cpu": []})

    def step(row) -> tuple[float, float]:
        """(wall s, process CPU s) of one training step."""
        cpu, start = time.process_time(), time.perf_counter()
        image, text, index = next(row["batches"])
        out = row["objective"](image, text, index)
        row["opt"].zero_grad(set_to_none=True)
        out.loss.backward()
        row["opt"].step()
        row["objective"].end_step()
        return time.perf_counter() - start, time.process_time() - cpu

    for _ in range(spec["warmup"]):
        for row in rows:
            step(row)
    for _ in range(spec["steps"]):
        for row in rows:
            wall, cpu = step(row)
            row["steps"].append(wall)
            row["cpu"].append(cpu)
    result = []
    for row in rows:
        row["objective"].eval()
        start = time.perf_counter()
        TrainedModel(row["objective"], None, row["cfg"]).evaluate(val_data)
        result.append({"row": row["row"], "steps": row["steps"], "cpu": row["cpu"],
                       "eval_s": time.perf_counter() - start, "n_batches": row["n_batches"],
                       "batch_size": row["cfg"].optim.batch_size})
    return {"source": source, "pairs": train_data.n_captions, "results": result, "load": os.getloadavg()}


def run_worker(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "HADA_NO_PROGRESS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="< 1 min on an idle machine: 4 timed steps per row, "
                   "one warm-up step, one round")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts to compare (default: 1 and min(2, cpu count))")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row and round (default 10; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over the worker processes (default 3; quick 1)")
    p.add_argument("--features", choices=("auto", "store", "random"), default="auto",
                   help="stored embedded features (store), random ones of the same shapes, or auto (default)")
    p.add_argument("--json", default=None, help="also write the raw timings to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    threads = args.threads or sorted({1, min(2, os.cpu_count() or 1)})
    steps = args.steps or (4 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 3)
    rows = default_rows(threads)
    groups: dict[int, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.threads, []).append(r)
    load_before = os.getloadavg()
    from hada.config import cpu_has_bf16

    native = "natively (AMX or AVX512-BF16)" if cpu_has_bf16() else "by emulation"
    print(f"{os.cpu_count()} CPUs, multiplying bfloat16 {native}; load average before {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f}; {rounds} round(s) x {steps} steps per row", flush=True)
    times: dict[Row, list[float]] = {r: [] for r in rows}
    cpus: dict[Row, list[float]] = {r: [] for r in rows}
    evals: dict[Row, list[float]] = {r: [] for r in rows}
    source, pairs, n_batches, batch = "?", 0, 0, 0
    started = time.perf_counter()
    for rnd in range(rounds):
        for t, members in groups.items():
            spec = {"threads": t, "rows": [asdict(r) for r in members], "steps": steps,
                    "warmup": warmup, "source": args.features}
            out = run_worker(spec)
            source, pairs = out["source"], out["pairs"]
            for res in out["results"]:
                r = Row(**res["row"])
                times[r] += res["steps"]
                cpus[r] += res["cpu"]
                evals[r].append(res["eval_s"])
                n_batches, batch = res["n_batches"], res["batch_size"]
            print(f"  round {rnd + 1}: threads={t} done "
                  f"({time.perf_counter() - started:.0f} s, load average {out['load'][0]:.2f})", flush=True)
    load_after = os.getloadavg()
    base = statistics.median(times[rows[0]]) * n_batches + statistics.median(evals[rows[0]])
    table = []
    for r in rows:
        step = statistics.median(times[r])
        ev = statistics.median(evals[r])
        epoch = step * n_batches + ev
        cpu = statistics.median(cpus[r])
        table.append([r.name, r.threads, "yes" if r.fused else "no", r.precision,
                      "W" if r.head_dim is None else r.head_dim, f"{step * 1000:.1f}", f"{cpu * 1000:.1f}",
                      f"{step * n_batches:.1f}", f"{ev:.2f}", f"{epoch:.1f}",
                      f"{cpu * n_batches + ev:.1f}" if r.threads == 1 else "-", f"{batch / step:.0f}",
                      f"{base / epoch:.2f}x"])
    print(f"\nSeconds per epoch, default K=2 config ({' + '.join(BACKBONES)}, width 128, 4 heads, batch {batch}, "
          f"{pairs} pairs = {n_batches} batches, momentum + queue + ITM) on {source}")
    print(markdown_table(["row", "threads", "fused", "precision", "head_dim", "step ms", "cpu ms", "train s",
                          "val s", "epoch s", "epoch s (cpu)", "pairs/s", "vs before"], table))
    print(f"\nload average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
          f"(1/5/15 min; {os.cpu_count()} CPUs). step / cpu ms = median wall / process CPU time of "
          f"{rounds} x {steps} interleaved steps; epoch s = step x batches + val s; epoch s (cpu) = the same "
          "from CPU time, what one thread takes when it has a core to itself (an idle-machine estimate, 1 thread "
          "only); fused = fused AdamW; W = head_dim equal to the width (the paper). Rows of different thread "
          "counts ran in different processes at different times: compare them only when the load was steady.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "load_before": load_before, "load_after": load_after,
                       "rows": [{**asdict(r), "steps": times[r], "cpu": cpus[r], "eval_s": evals[r]}
                                for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
