"""What verifying a feature store's content costs: xxh3-128 and sha256 throughput, and the seconds it adds per
process at the book's shapes.

A store is hashed once per process per file (:func:`hada.features.store.verify_store`), not trusted from its
timestamps (xxh3-128; sha256 under ``hada features verify``). This prints (1) the GB/s of both on this machine,
read from the page cache (a store being trained on is there) and cold where the platform can drop one file's cache
(``posix_fadvise``); (2) the bytes of every store one book run reads (the embedded backbones on the default
synthetic set: train, val and test; text padded to the context length, an upper bound) and the seconds their hash
adds to a process; (3) that as a share of a training epoch, given ``--epoch-seconds`` or taken from the finished
runs under ``data/runs``.

    .venv/bin/python benchmarks/bench_integrity.py [--mb 256] [--rounds 3] [--epoch-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hada.features.store import _sha256, _xxh3, store_shapes  # noqa: E402


def hash_rate(path: Path, rounds: int, cold: bool, digest=_sha256) -> float:
    """Median GB/s (1e9 bytes) of ``digest`` over ``path`` whole."""
    size, rates = path.stat().st_size, []
    for _ in range(rounds):
        if cold and hasattr(os, "posix_fadvise"):
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        digest(path)
        rates.append(size / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def book_store_bytes(backbones=("tiny-vit", "tiny-rn")) -> int:
    """Bytes of the stores one book run reads: each backbone's train, val and test split of the default set."""
    from hada.data.synthetic import CAPTIONS_PER_IMAGE, SIZE_PRESETS

    sizes = SIZE_PRESETS["default"]
    n_img = sizes.train + sizes.val + sizes.test
    total = 0
    for spec in backbones:
        s = store_shapes(spec)
        (t, d), e = s["image_tokens"], s["embed_dim"]
        total += n_img * (t * d * 2 + e * 2 + 8)
        total += n_img * CAPTIONS_PER_IMAGE * (s["context_length"] * s["text_dim"] * 2 + e * 2 + 3 * 8)
    return total


def recorded_epoch_seconds() -> float | None:
    """Median seconds of an epoch over the finished runs' histories under data/runs, if any."""
    from hada.paths import runs_dir

    times = [h["time_s"] for f in runs_dir().glob("*/history.json") for h in json.loads(f.read_text())]
    return statistics.median(times) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the hashed test file (MB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.npy"
        path.write_bytes(os.urandom(args.mb * 10**6))
        rates = {name: (hash_rate(path, args.rounds, False, digest), hash_rate(path, args.rounds, True, digest))
                 for name, digest in (("sha256", _sha256), ("xxh3_128", _xxh3))}
    for name, (warm, cold) in rates.items():
        print(f"{name} of a {args.mb} MB file: {warm:.2f} GB/s from the page cache, {cold:.2f} GB/s after dropping it")
    nbytes = book_store_bytes()
    seconds = nbytes / (rates["xxh3_128"][0] * 1e9)
    print(f"stores one book run reads (tiny-vit + tiny-rn, default synthetic set, train/val/test): "
          f"{nbytes / 1e9:.3f} GB -> {seconds:.2f} s of xxh3 per process (the check on every open; "
          f"{nbytes / (rates['sha256'][0] * 1e9):.2f} s with sha256, `hada features verify`)")
    epoch = args.epoch_seconds or recorded_epoch_seconds()
    if epoch:
        print(f"a training epoch: {epoch:.1f} s -> verification is {100 * seconds / epoch:.1f}% of one epoch, "
              "once per process (a run trains several epochs)")
    else:
        print("no epoch time: pass --epoch-seconds (benchmarks/bench_epoch.py measures one)")


if __name__ == "__main__":
    main()
