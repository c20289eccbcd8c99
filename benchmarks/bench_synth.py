"""Time `hada data synth` on this machine and print the trivial-baseline recalls of its test split.

Usage: .venv/bin/python benchmarks/bench_synth.py [--size default|tiny] [--workers N] [--seed N]

Generates into a temporary folder (deleted afterwards), so it never touches data/. The budget is
under 60 s for the default size on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hada.data import synthetic as synth
from tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(synth.SIZE_PRESETS), default="default")
    parser.add_argument("--workers", type=int, default=None, help="rendering processes (default: up to 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="--size tiny (what `make bench` runs)")
    args = parser.parse_args()
    if args.quick:
        args.size = "tiny"
    sizes = synth.SIZE_PRESETS[args.size]

    start = time.perf_counter()
    items = synth.sample_items(sizes, args.seed)
    sampled = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synthetic"
        result = synth.generate(root, size=args.size, seed=args.seed, workers=args.workers, progress=False)
        start = time.perf_counter()
        baselines = synth.trivial_baseline_recalls(root, split="test")
        scored = time.perf_counter() - start

    n = len(items)
    print(f"hada data synth --size {args.size} (cpu count {os.cpu_count()}, workers {args.workers or 'auto'})")
    print(markdown_table(["step", "images", "seconds", "images/s"],
                        [["sample scenes + captions", f"{n:,}", f"{sampled:.1f}", f"{n / sampled:,.0f}"],
                         ["generate (all, written)", f"{n:,}", f"{result.seconds:.1f}", f"{n / result.seconds:,.0f}"]]))
    print(f"\ntrivial baselines on the test split ({sizes.test:,} images, {sizes.test * 5:,} captions; {scored:.1f} s)")
    keys = ["text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10",
            "image_retrieval_recall@1", "image_retrieval_recall@5", "image_retrieval_recall@10", "rsum"]
    rows = [["matcher", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "Rsum"]]
    rows += [[name] + [f"{m[k]:.1f}" for k in keys] for name, m in baselines.items()]
    print(markdown_table(rows[0], rows[1:]))


if __name__ == "__main__":
    main()
