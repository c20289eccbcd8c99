"""Training throughput of HADA's dense backend vs a per-sample torch_geometric reference (DESIGN 2b).

One training step = forward of the image and text encoders, a symmetric InfoNCE loss, backward, AdamW step.
Paths, all on the same model (same parameter tensors) and the same random features:

* ``reference``: every sample's graph built separately (``hada.graph.build_edges``) as a
  ``torch_geometric.data.Data``, collated with ``Batch.from_data_list``, torch_geometric convs on all nodes
  and edges -- the shape of the public code's model step.
* ``pyg``: hada's batched graph (cached templates, vectorised offsets), same torch_geometric convs.
* ``dense``: hada's dense backend (attention for the K CLS nodes only).

Before timing, the paths' embeddings are checked to agree. Steps of the paths are interleaved and the median
step time is reported, so that other users of a shared machine slow every path alike. Prints a table;
``--quick`` runs in < 1 min (the per-sample reference is skipped at the paper's shapes there).

    .venv/bin/python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hada.graph import build_edges
from hada.model import HadaConfig, HadaEncoder, HadaPair, ModalityBatch


@dataclass(frozen=True)
class Shape:
    """Node counts and widths of one benchmark setting."""

    name: str
    image_tokens: tuple[int, ...]  # per backbone (CLS included)
    text_tokens: tuple[int, int]  # (min, max) valid text tokens per caption and backbone, CLS included
    token_dims: tuple[int, ...]
    embed_dims: tuple[int, ...]
    width: int
    heads: int = 4

    def config(self, gnn: str = "gatv2") -> HadaConfig:
        return HadaConfig(token_dims=self.token_dims, embed_dims=self.embed_dims, width=self.width,
                          out_dim=self.width, heads=self.heads, gnn=gnn, dropout=0.0)


SHAPES = {
    # the embedded miniature (DESIGN 2a): 64 px images in 8 px patches, short captions, width 128
    "mini": Shape("mini", (65, 65), (8, 20), (192, 256), (128, 128), 128),
    # the paper (DESIGN 2b): ViT-B/16 at 384 px = 577 tokens of 768-d per backbone, ~30 text tokens
    "paper": Shape("paper", (577, 577), (20, 40), (768, 768), (256, 768), 512),
}


def random_batch(shape: Shape, batch: int, modality: str, gen: torch.Generator) -> ModalityBatch:
    """Random standardised features in the feature store's layout (zero padding, CLS first)."""
    tokens, lengths, embeds = [], [], []
    for k, (d, e) in enumerate(zip(shape.token_dims, shape.embed_dims)):
        if modality == "image":
            n = shape.image_tokens[k]
            length = torch.full((batch,), n)
        else:
            lo, hi = shape.text_tokens
            n = hi
            length = torch.randint(lo, hi + 1, (batch,), generator=gen)
        valid = torch.arange(n)[None, :, None] < length[:, None, None]
        tokens.append(torch.randn(batch, n, d, generator=gen) * valid)
        lengths.append(length)
        embeds.append(torch.randn(batch, e, generator=gen))
    return ModalityBatch(tokens, lengths, embeds)


def reference_forward(enc: HadaEncoder, batch: ModalityBatch) -> torch.Tensor:
    """The public code's shape of computation: per-sample Data objects, Batch.from_data_list, pyg convs."""
    from torch_geometric.data import Batch, Data

    projected = [proj(t) for proj, t in zip(enc.proj, batch.tokens)]
    lengths = torch.stack(batch.lengths, 1).tolist()
    data = []
    for b, counts in enumerate(lengths):
        x = torch.cat([p[b, :n] for p, n in zip(projected, counts)])
        edge_index, edge_weight, _ = build_edges(counts, enc.edge_weights)
        data.append(Data(x=x, edge_index=edge_index.to(x.device), edge_attr=edge_weight.to(x.device)[:, None],
                         cls=torch.tensor([sum(counts[:k]) for k in range(len(counts))], device=x.device)))
    graph = Batch.from_data_list(data)
    h = graph.x
    for layer, conv in enumerate(enc.convs):
        if enc.config.gnn == "gcn":
            out = conv(h, graph.edge_index, graph.edge_attr.view(-1))
        else:
            out = conv(h, graph.edge_index, graph.edge_attr)
        h = enc._block(layer, out, h)
    cls_index = graph.cls.view(len(data), -1) + graph.ptr[:-1, None]
    return enc._readout(h[cls_index], batch.embeds)


def encode(pair: HadaPair, images: ModalityBatch, texts: ModalityBatch, path: str):
    if path == "reference":
        return reference_forward(pair.image, images), reference_forward(pair.text, texts)
    return pair(images, texts, backend=path)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE over the batch (pair i is the positive of row/column i)."""
    logits = img @ txt.t() / tau
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(pair: HadaPair, opt, images: ModalityBatch, texts: ModalityBatch, path: str, device: str) -> float:
    """One timed optimisation step (seconds)."""
    sync(device)
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = contrastive_loss(*encode(pair, images, texts, path))
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - start


def pairs_per_second(pair, opt, images, texts, paths: list[str], steps: int, warmup: int,
                     device: str) -> dict[str, float]:
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


def check_paths_agree(pair: HadaPair, images: ModalityBatch, texts: ModalityBatch, paths: list[str]) -> float:
    """Max abs difference of the embeddings across paths (they must compute the same function)."""
    with torch.no_grad():
        outs = [torch.cat(encode(pair, images, texts, p)) for p in paths]
    return max(float((o - outs[0]).abs().max()) for o in outs)


def run_setting(shape: Shape, batch: int, device: str, paths: list[str], steps: int, warmup: int,
                gnn: str = "gatv2", seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pair = HadaPair(shape.config(gnn)).to(device)
    images = random_batch(shape, batch, "image", gen).to(device)
    texts = random_batch(shape, batch, "text", gen).to(device)
    diff = check_paths_agree(pair, images, texts, paths)
    if diff > 1e-4:
        raise AssertionError(f"paths disagree by {diff:.2e}")
    opt = torch.optim.AdamW(pair.parameters(), lr=1e-4, weight_decay=0.02)
    result = pairs_per_second(pair, opt, images, texts, paths, steps, warmup, device)
    result["max_abs_diff"] = diff
    return result


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(f"\n{title}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small run (< 1 min): miniature comparison, paper shapes at batch 20 without reference")
    p.add_argument("--shapes", nargs="+", default=["mini", "paper"], choices=sorted(SHAPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="batch sizes (default: 64 for mini, 20 and 40 for paper)")
    p.add_argument("--gnn", nargs="+", default=["gatv2"], choices=["gatv2", "gcn", "transformer"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path (default 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the machine is shared, and one thread gives stable timings)")
    p.add_argument("--devices", nargs="+", default=None,
                   help="cpu and/or cuda (default: cpu, plus cuda when available)")
    p.add_argument("--no-reference", action="store_true", help="skip the slow per-sample reference path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices {devices}")
    header = ["device", "shape", "gnn", "batch", "path", "pairs/s", "x reference", "x pyg"]
    rows = []
    for device in devices:
        for name in (["mini", "paper"] if args.quick else args.shapes):
            shape = SHAPES[name]
            quick_paper = args.quick and name == "paper" and device == "cpu"
            batches = args.batch_sizes or ([64] if name == "mini" else [20] if quick_paper else [20, 40])
            paths = ["dense"] if quick_paper else (["pyg", "dense"] if args.no_reference else
                                                    ["reference", "pyg", "dense"])
            steps, warmup = (2, 1) if quick_paper else (args.steps, args.warmup)
            for gnn in args.gnn:
                for batch in batches:
                    res = run_setting(shape, batch, device, paths, steps, warmup, gnn)
                    for path in paths:
                        ref = f"{res[path] / res['reference']:.1f}x" if "reference" in res else "-"
                        pyg = f"{res[path] / res['pyg']:.1f}x" if "pyg" in res else "-"
                        rows.append([device, name, gnn, batch, path, f"{res[path]:.1f}", ref, pyg])
                    print(f"  done {device} {name} {gnn} batch {batch} (paths agree to {res['max_abs_diff']:.1e})",
                          flush=True)
    print_table("Training pairs/s (forward + backward + AdamW, image + text encoders)", header, rows)
    print("\nshapes: " + "; ".join(
        f"{s.name} = K={len(s.token_dims)}, image tokens {s.image_tokens}, text tokens {s.text_tokens[0]}-"
        f"{s.text_tokens[1]}, token dims {s.token_dims}, embed dims {s.embed_dims}, width {s.width}, "
        f"{s.heads} heads" for s in SHAPES.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
