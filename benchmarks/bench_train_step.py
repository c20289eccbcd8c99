"""Training throughput of HADA's dense backend vs a per-sample torch_geometric reference (the published graph
sends features only to CLS nodes, so the dense backend computes just the K CLS rows that are read).

One training step = forward of the image and text encoders, a symmetric InfoNCE loss, backward, and the
fused AdamW step hada.train uses. Paths, all on the same model (same parameter tensors) and the same random
features:

* ``reference``: every sample's graph built separately (``hada.model.graph.build_edges``) as a
  ``torch_geometric.data.Data``, collated with ``Batch.from_data_list``, torch_geometric convs on all nodes
  and edges -- the shape of the public code's model step. Timed in float32 and in the run's precision;
  ``x reference`` divides by the faster of the two.
* ``pyg``: hada's batched graph (cached templates, vectorised offsets), same torch_geometric convs.
* ``dense``: hada's dense backend (``hada.model.fast.dense``: attention for the K CLS nodes only, a one-layer model
  never projects every node on its own; on CPU GATv2 maps only the valid nodes, packed per backbone, and its
  scores, softmax and messages are one fused numba kernel each way, ``hada.model.fast.kernels``).

Shapes: ``embedded`` is what the book trains (the tiny-vit + tiny-rn feature stores' token counts and widths,
caption lengths as stored, the book's model: width 128, 4 heads x 32 channels); ``paper`` is the paper's
(577 image tokens of 768-d per backbone, 20-40 text tokens, width 512, 4 heads x 512 channels). Precision
``auto`` (default) is what hada.train picks: bfloat16 autocast on a CUDA GPU, float32 on the CPU.

Before timing, the paths' embeddings are checked to agree (in float32). Steps of the paths are interleaved
and the median step time is reported, so that other users of a shared machine slow every path alike. Prints
a table; ``--quick`` runs in < 1 min (the per-sample reference is skipped at the paper's shapes there).

    .venv/bin/python benchmarks/bench_train_step.py --quick
    .venv/bin/python benchmarks/bench_train_step.py --shapes embedded --batch-sizes 64 256 --steps 7
    .venv/bin/python benchmarks/bench_train_step.py --shapes embedded --threads 1 2 --steps 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hada.config import ModelConfig, has_bf16, recipe
from hada.model.graph import build_edges
from hada.model.encoder import FeatureDims, HadaEncoder, HadaPair, ModalityBatch

from tables import markdown_table


@dataclass(frozen=True)
class Shape:
    """Node counts and widths of one benchmark setting, and the HADA model trained on it."""

    name: str
    image_tokens: tuple[int, ...]  # per backbone (CLS included)
    text_tokens: tuple[tuple[int, int], ...]  # per backbone (min, max) valid text tokens, CLS included
    image_dims: tuple[int, ...]  # token widths per backbone
    text_dims: tuple[int, ...]
    embed_dims: tuple[int, ...]
    width: int
    heads: int = 4
    head_dim: int | None = None  # None: the paper's width channels per head

    def config(self, gnn: str = "gatv2", precision: str = "fp32") -> tuple[ModelConfig, FeatureDims]:
        model = ModelConfig(width=self.width, out_dim=self.width, heads=self.heads, head_dim=self.head_dim, gnn=gnn,
                            dropout=0.0, precision=precision)
        return model, FeatureDims(self.image_dims, self.text_dims, self.embed_dims, self.embed_dims)

    def describe(self) -> str:
        text = ", ".join(f"{lo}-{hi}" for lo, hi in self.text_tokens)
        return (f"{self.name} = K={len(self.image_dims)}, image tokens {self.image_tokens} x {self.image_dims}-d, "
                f"text tokens {text} x {self.text_dims}-d, embed dims {self.embed_dims}, width {self.width}, "
                f"{self.heads} heads x {self.head_dim or self.width} channels")


BOOK = recipe("miniature").model  # the model the book trains

SHAPES = {
    # the embedded default as the book trains it: the feature stores of tiny-vit and tiny-rn (hada.features.store;
    # caption lengths 6 to 51 and 6 to 24 tokens) and the book's model (the miniature recipe of hada.config: width 128,
    # 4 heads x 32 channels)
    "embedded": Shape("embedded", (65, 10), ((6, 51), (6, 24)), (128, 384), (128, 96), (128, 128),
                      BOOK.width, BOOK.heads, BOOK.head_dim),
    # the paper: ViT-B/16 at 384 px = 577 tokens of 768-d per backbone, ~30 text tokens,
    # width 512, 4 heads x 512 channels
    "paper": Shape("paper", (577, 577), ((20, 40), (20, 40)), (768, 768), (768, 768), (256, 768), 512),
}


def random_batch(shape: Shape, batch: int, modality: str, gen: torch.Generator) -> ModalityBatch:
    """Random standardised features in the feature store's layout (zero padding, CLS first), trimmed to the
    batch's longest caption as hada.features.batching does."""
    tokens, lengths, embeds = [], [], []
    dims = shape.image_dims if modality == "image" else shape.text_dims
    for k, (d, e) in enumerate(zip(dims, shape.embed_dims)):
        if modality == "image":
            length = torch.full((batch,), shape.image_tokens[k])
        else:
            lo, hi = shape.text_tokens[k]
            length = torch.randint(lo, hi + 1, (batch,), generator=gen)
        n = int(length.max())
        valid = torch.arange(n)[None, :, None] < length[:, None, None]
        tokens.append(torch.randn(batch, n, d, generator=gen) * valid)
        lengths.append(length)
        embeds.append(torch.randn(batch, e, generator=gen))
    return ModalityBatch(tokens, lengths, embeds)


def reference_forward(enc: HadaEncoder, batch: ModalityBatch, precision: str) -> torch.Tensor:
    """The public code's shape of computation: per-sample Data objects, Batch.from_data_list, pyg convs on
    every node and edge; under the same autocast as HadaEncoder.forward (readout in float32)."""
    from torch_geometric.data import Batch, Data

    device = batch.tokens[0].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        projected = [proj(t) for proj, t in zip(enc.proj, batch.tokens)]
        lengths = torch.stack(batch.lengths, 1).tolist()
        data = []
        for b, counts in enumerate(lengths):
            x = torch.cat([p[b, :n] for p, n in zip(projected, counts)])
            edge_index, edge_weight, _ = build_edges(counts, enc.edge_weights)
            data.append(Data(x=x, edge_index=edge_index.to(device), edge_attr=edge_weight.to(device)[:, None],
                             cls=torch.tensor([sum(counts[:k]) for k in range(len(counts))], device=device)))
        graph = Batch.from_data_list(data)
        h = graph.x
        for layer, conv in enumerate(enc.convs):
            if enc.config.gnn == "gcn":
                out = conv(h, graph.edge_index, graph.edge_attr.view(-1))
            else:
                out = conv(h, graph.edge_index, graph.edge_attr)
            h = enc._block(layer, out, h)
        cls = h[graph.cls.view(len(data), -1) + graph.ptr[:-1, None]]
    with torch.autocast(device.type, enabled=False):
        return enc._readout(cls, batch.embeds)


@dataclass(frozen=True)
class Path:
    """One way of computing the same training step: ``kind`` reference / pyg / dense, in ``precision``."""

    kind: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.kind} ({self.precision})"


def encode(pair: HadaPair, images: ModalityBatch, texts: ModalityBatch, path: Path):
    if path.kind == "reference":
        return (reference_forward(pair.image, images, path.precision),
                reference_forward(pair.text, texts, path.precision))
    for enc in (pair.image, pair.text):
        enc.config = replace(enc.config, precision=path.precision)
    return pair(images, texts, backend=path.kind)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (pair i is the positive of row/column i)."""
    logits = img @ txt.t() / tau
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(pair: HadaPair, opt, images: ModalityBatch, texts: ModalityBatch, path: Path, device: str) -> float:
    """One timed optimisation step (seconds)."""
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = contrastive_loss(*encode(pair, images, texts, path))
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def pairs_per_second(pair, opt, images, texts, paths: list[Path], steps: int, warmup: int,
                     device: str) -> dict[Path, float]:
    """Steps of the paths interleaved (round robin), so that load from other users of a shared machine hits
    every path alike; pairs/s from the median step time."""
    for path in paths:
        for _ in range(warmup):
            train_step(pair, opt, images, texts, path, device)
    times = {path: [] for path in paths}
    for _ in range(steps):
        for path in paths:
            times[path].append(train_step(pair, opt, images, texts, path, device))
    return {path: images.batch_size / statistics.median(t) for path, t in times.items()}


def check_paths_agree(pair: HadaPair, images: ModalityBatch, texts: ModalityBatch, kinds: list[str]) -> float:
    """Max abs difference of the embeddings across path kinds, in float32 (they must compute the same
    function; bfloat16 rounding would hide a real difference)."""
    with torch.no_grad():
        outs = [torch.cat(encode(pair, images, texts, Path(kind, "fp32"))) for kind in kinds]
    return max(float((o - outs[0]).abs().max()) for o in outs)


def resolve_precision(precision: str, device: str) -> str:
    """"auto": what hada.train picks (:func:`hada.config.has_bf16`): bf16 on a CUDA GPU, fp32 on the CPU."""
    if precision != "auto":
        return precision
    return "bf16" if has_bf16(device) else "fp32"


def run_setting(shape: Shape, batch: int, device: str, paths: list[Path], steps: int, warmup: int,
                gnn: str = "gatv2", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pair = HadaPair(*shape.config(gnn)).to(device)
    images = random_batch(shape, batch, "image", gen).to(device)
    texts = random_batch(shape, batch, "text", gen).to(device)
    diff = check_paths_agree(pair, images, texts, sorted({p.kind for p in paths}))
    if diff > 1e-4:
        raise AssertionError(f"paths disagree by {diff:.2e}")
    # the optimiser hada.train uses (fused AdamW) for every path
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-4, weight_decay=0.02, fused=True)
    result = pairs_per_second(pair, opt, images, texts, paths, steps, warmup, device)
    result["max_abs_diff"] = diff
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small run (< 1 min): the embedded comparison, paper shapes at batch 20 without reference")
    p.add_argument("--shapes", nargs="+", default=["embedded", "paper"], choices=sorted(SHAPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes (default: 64 for embedded, hada.train's default; 20 and 40 for paper)")
    p.add_argument("--gnn", nargs="+", default=["gatv2"], choices=["gatv2", "gcn", "transformer"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="precision of the batched paths (default auto: bf16 where the device multiplies bfloat16 "
                        "natively, as hada.train picks). The reference runs in fp32 and in this precision; "
                        "'x reference' compares with the faster of the two")
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path (default 1)")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch CPU threads, one table block each (default 1: hada.train's default, and stable "
                        "timings on a shared machine; the fused numba kernels stay single-threaded)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="cpu and/or cuda (default: cpu, plus cuda when available)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow per-sample reference path")
    args = p.parse_args(argv)
    if min(args.batch_sizes or [1]) < 1 or args.steps < 1 or args.warmup < 0 or min(args.threads) < 1:
        p.error("--batch-sizes, --steps and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, CPU threads {args.threads}, devices {devices}")
    header = ["device", "threads", "shape", "gnn", "batch", "path", "pairs/s", "x reference", "x pyg"]
    rows = []
    runs = [(device, threads) for device in devices
            for threads in (args.threads if device == "cpu" else args.threads[:1])]
    for device, threads in runs:
        torch.set_num_threads(threads)
        precision = resolve_precision(args.precision, device)
        for name in (["embedded", "paper"] if args.quick else args.shapes):
            shape = SHAPES[name]
            quick_paper = args.quick and name == "paper" and device == "cpu"
            batches = args.batch_sizes or ([64] if name == "embedded" else [20] if quick_paper else [20, 40])
            references = [] if quick_paper or args.no_reference else \
                [Path("reference", p) for p in dict.fromkeys(["fp32", precision])]
            batched = [Path("dense", precision)] if quick_paper else [Path("pyg", precision), Path("dense", precision)]
            paths = references + batched
            steps, warmup = (2, 1) if quick_paper else (args.steps, args.warmup)
            for gnn in args.gnn:
                for batch in batches:
                    res = run_setting(shape, batch, device, paths, steps, warmup, gnn)
                    best_reference = max((res[p] for p in references), default=None)
                    for path in paths:
                        ref = f"{res[path] / best_reference:.1f}x" if best_reference else "-"
                        pyg = f"{res[path] / res[batched[0]]:.1f}x" if batched[0].kind == "pyg" else "-"
                        rows.append([device, threads, name, gnn, batch, path.label, f"{res[path]:.1f}", ref, pyg])
                    print(f"  done {device} x{threads} {name} {gnn} batch {batch} "
                          f"(paths agree to {res['max_abs_diff']:.1e})", flush=True)
    print("\nTraining pairs/s (forward + backward + fused AdamW, image + text encoders); "
          "x reference: over the faster reference row")
    print(markdown_table(header, rows))
    print("\nshapes: " + "; ".join(s.describe() for s in SHAPES.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
