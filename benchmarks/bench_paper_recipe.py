"""Training pairs/s of the published recipe (``--recipe paper``) on the dense backend's two GATv2 paths.

The recipe drops 70% of GATv2's attention coefficients in training. Until the fused numba kernels
(``hada.model.fast.kernels``) took that dropout, it sent the recipe from them to the tiled PyTorch ops
(``hada.model.fast.dense.GatV2ClsScores``, softmax, dropout, einsum). Rows:

* ``tiled (before)``: the tiled PyTorch ops, which the recipe ran on before (``FUSED_CPU_ATTENTION`` off);
* ``fused (after)``: the fused kernels with the dropout inside, which ``backend="auto"`` now picks on CPU;
* ``fused, queue at scale`` (book shape only): the fused kernels with the queue the book's ``paper-k2`` run keeps,
  the published 64,000 slots at the share of the embedded train split's captions that they are of Flickr30k's
  (``hada.experiments.queue_at_scale``: 6,621 for 15,000 captions). On Flickr30k itself the queue is 64,000.

One step is what ``hada.train`` runs per batch: the recipe's whole objective (image and text encoders,
their momentum copies, ITC over the batch and the 64,000-slot queue mixed with the main backbone, ITM on hard
negatives), backward, fused AdamW, and the queue update. Random features, with the recipe's batch of 20:

* ``book``: the embedded feature stores the book's ``paper-k2`` run reads (tiny-vit 65 x 128-d and tiny-rn
  10 x 384-d image tokens, captions of 6-51 and 6-24 tokens), the recipe's model (width 512, 4 heads x 512);
* ``paper``: the paper's inputs (577 image tokens of 768-d per backbone, 20-40 caption tokens, embeddings of
  256 and 768), same model.

Both paths run in one process on one torch thread (as ``hada.train``), their steps interleaved so that load
from other users of a shared machine hits both alike; pairs/s from the median step's wall time, and from its
process CPU time (an idle-machine estimate). Before timing, one step of
each path is checked to give the same loss under the same random state (same dropout masks).

    .venv/bin/python benchmarks/bench_paper_recipe.py            # both shapes, 5 timed steps per path
    .venv/bin/python benchmarks/bench_paper_recipe.py --quick    # 2 timed steps per path
    .venv/bin/python benchmarks/bench_paper_recipe.py --shapes book --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import hada.model.fast.dense as dense
from hada.config import recipe
from hada.train import build_objective

from bench_train_step import Shape, random_batch
from tables import markdown_table

#: The two settings as bench_train_step's Shape (image tokens, caption token ranges, token dims, embed dims); the
#: model is the paper recipe's, whatever width the Shape names.
SHAPES = {
    "book": Shape("book", (65, 10), ((6, 51), (6, 24)), (128, 384), (128, 96), (128, 128), 512),
    "paper": Shape("paper", (577, 577), ((20, 40), (20, 40)), (768, 768), (768, 768), (256, 768), 512),
}
PATHS = {"tiled (before)": False, "fused (after)": True}
#: The embedded train split's captions (3,000 images x 5), which size the book's paper-k2 queue.
BOOK_TRAIN_CAPTIONS = 15000


def objective_and_optimiser(shape, queue_size: int | None = None):
    cfg = recipe("paper") if queue_size is None else recipe("paper", **{"loss.queue_size": queue_size})
    dims = {"image_token_dims": shape.image_dims, "text_token_dims": shape.text_dims,
            "image_embed_dims": shape.embed_dims, "text_embed_dims": shape.embed_dims}
    torch.manual_seed(0)
    objective = build_objective(cfg, dims).train()
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    return cfg, objective, opt


def step(objective, opt, batch, fused: bool, update: bool = True) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one training step on ``fused`` or tiled attention."""
    dense.FUSED_CPU_ATTENTION = fused
    image, text, ids = batch
    cpu, start = time.process_time(), time.perf_counter()
    out = objective(image, text, ids)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if update:
        opt.step()
        objective.end_step()
    return time.perf_counter() - start, time.process_time() - cpu, float(out.loss.detach())


def check_paths_agree(objective, opt, batch) -> float:
    """|loss difference| of the two paths on one batch under the same random state (no update)."""
    losses = []
    for fused in PATHS.values():
        torch.manual_seed(1)
        losses.append(step(objective, opt, batch, fused, update=False)[2])
    return abs(losses[0] - losses[1])


def run_shape(name: str, steps: int, warmup: int) -> dict:
    shape = SHAPES[name]
    cfg, objective, opt = objective_and_optimiser(shape)
    gen = torch.Generator().manual_seed(0)
    B = cfg.optim.batch_size
    batches = [(random_batch(shape, B, "image", gen), random_batch(shape, B, "text", gen), torch.arange(B) + i * B)
               for i in range(4)]
    diff = check_paths_agree(objective, opt, batches[0])
    variants = {label: (objective, opt, fused) for label, fused in PATHS.items()}
    if name == "book":
        from hada.experiments import queue_at_scale

        queue = queue_at_scale(cfg.loss.queue_size, BOOK_TRAIN_CAPTIONS)
        _, scaled, scaled_opt = objective_and_optimiser(shape, queue)
        variants[f"fused, queue at scale ({queue:,})"] = (scaled, scaled_opt, True)
    times, cpus = {label: [] for label in variants}, {label: [] for label in variants}
    for i in range(warmup + steps):
        for label, (obj, optimiser, fused) in variants.items():
            seconds, cpu, _ = step(obj, optimiser, batches[i % len(batches)], fused)
            if i >= warmup:
                times[label].append(seconds)
                cpus[label].append(cpu)
    return {"batch": B, "diff": diff, "pairs/s": {label: B / statistics.median(t) for label, t in times.items()},
            "pairs/s (cpu)": {label: B / statistics.median(t) for label, t in cpus.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as hada.train)")
    p.add_argument("--quick", action="store_true", help="< 1 min: 2 timed steps per path")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 2
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f}; recipe paper (attention dropout {recipe('paper').model.attention_dropout})", flush=True)
    rows = []
    for name in args.shapes:
        res = run_shape(name, args.steps, args.warmup)
        before, after = res["pairs/s"]["tiled (before)"], res["pairs/s"]["fused (after)"]
        cpu_before = res["pairs/s (cpu)"]["tiled (before)"]
        for label, value in res["pairs/s"].items():
            cpu = res["pairs/s (cpu)"][label]
            rows.append([name, res["batch"], label, f"{value:.1f}", f"{value / before:.2f}x", f"{cpu:.1f}",
                         f"{cpu / cpu_before:.2f}x"])
        print(f"  done {name}: {before:.1f} -> {after:.1f} pairs/s (loss of the two attention paths agrees to "
              f"{res['diff']:.1e})", flush=True)
    print("\nTraining pairs/s of the paper recipe (whole objective: encoders, momentum encoders, queue, ITM; "
          "backward; fused AdamW)")
    print(markdown_table(["shape", "batch", "path", "pairs/s", "vs before", "pairs/s (cpu)", "vs before (cpu)"],
                         rows))
    load = os.getloadavg()
    print(f"\nload average after {load[0]:.2f}. pairs/s: batch / median wall time of a step; pairs/s (cpu): batch / "
          "median process CPU time of a step, what one thread does with a core to itself (an idle-machine estimate)")
    print("\nshapes: " + "; ".join(
        f"{n} = image tokens {s.image_tokens} x {s.image_dims}-d, caption tokens {s.text_tokens} x {s.text_dims}-d, "
        f"embeds {s.embed_dims}"
        for n, s in SHAPES.items() if n in args.shapes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
