"""Feature-store benchmarks (printed tables, not timed tests).

1. Extraction images/s of ``hada.features.store.extract_split`` against a bare open_clip loop (PIL load + the model's
   own preprocessing + ``encode_image`` under ``no_grad``) on the same model, batch, split and machine, in one
   run, alternating the two so they share any background load; median and best of ``--rounds``, one caption
   per image in the timed runs (the ratio is about images). Goal: ratio >= 0.9. On a shared machine single
   rounds vary by +-30%: read the median.
2. Bytes on disk per image and per caption of each embedded backbone's store (all arrays counted).
3. The projected store size of Flickr30k with ViT-B/16 at 224 px.

Run: ``.venv/bin/python benchmarks/bench_features.py [--split test] [--rounds 5] [--threads 1] [--vitb32]``.
Embedded backbones without pretrained weights are measured with random weights of the same architecture
(speed and size do not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tables import markdown_table  # noqa: E402

from hada.backbones import EMBEDDED_BACKBONES, load_backbone, register_model_configs  # noqa: E402
from hada.backbones.spec import load_recipes  # noqa: E402
from hada.data.datasets import load_dataset  # noqa: E402
from hada.errors import HadaError  # noqa: E402
from hada.features.store import ARRAY_NAMES, extract_split  # noqa: E402


def _spec_for(name: str, tmp: Path) -> tuple[str, str]:
    """The embedded backbone if pretrained, else random weights of its architecture saved to a temp file."""
    try:
        load_backbone(name)
        return name, "pretrained"
    except HadaError:
        import open_clip
        from safetensors.torch import save_file

        model = load_recipes()[name]["model"]
        torch.manual_seed(0)
        m = open_clip.create_model(model)
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
        return f"{model}:{path}", "random weights"


def bare_loop(backbone, records, batch: int) -> float:
    """images/s of the loop a user would write with open_clip alone."""
    from PIL import Image

    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(records), batch):
            xs = []
            for r in records[s:s + batch]:
                with Image.open(r.path) as im:
                    xs.append(backbone.preprocess(im.convert("RGB")))
            backbone.model.encode_image(torch.stack(xs))
    return len(records) / (time.perf_counter() - t0)


def ours(backbone, dataset, split: str, spec: str, root: Path, batch: int) -> tuple[float, Path]:
    fs = extract_split(backbone, dataset, split, spec, root, force=True, image_batch=batch, progress=False)
    t = fs.manifest["timing"]
    return t["images"] / t["image_seconds"], fs.path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="synthetic dataset folder (default: data/synthetic)")
    ap.add_argument("--split", default="test", help="split to extract (default: test)")
    ap.add_argument("--batch", type=int, default=128, help="images per batch for both loops (default: 128)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--backbone", action="append", default=None, help="only these embedded backbones (repeatable)")
    ap.add_argument("--vitb32", action="store_true", help="also ViT-B-32 at 224 px, random weights, 256 images")
    ap.add_argument("--quick", action="store_true", help="2 rounds on the val split (what `make bench` runs)")
    args = ap.parse_args()
    if args.quick:
        args.split, args.rounds = "val", 2
    os.environ.setdefault("HADA_NO_PROGRESS", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    register_model_configs()
    dataset = load_dataset("synthetic", args.root)
    records = dataset.split(args.split)
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"split {args.split}: {len(records)} images, {sum(len(r.captions) for r in records)} captions")

    speed_rows, size_rows = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        targets = [(n, *_spec_for(n, tmp)) for n in (args.backbone or EMBEDDED_BACKBONES)]
        if args.vitb32:
            import open_clip

            torch.manual_seed(0)
            m = open_clip.create_model("ViT-B-32")
            torch.save(m.state_dict(), tmp / "vitb32.bin")
            targets.append(("ViT-B-32 @224", f"ViT-B-32:{tmp / 'vitb32.bin'}", "random weights"))
        from dataclasses import replace

        from hada.data.datasets import Dataset

        for label, spec, weights in targets:
            backbone = load_backbone(spec)
            big = label.startswith("ViT-B-32")
            # timing view: one caption per image (the ratio is about images; captions would only add time)
            recs = records[:256] if big else records
            recs = [replace(r, captions=r.captions[:1], caption_ids=r.caption_ids[:1]) for r in recs]
            view = Dataset(dataset.name, dataset.root, recs, dataset.json_sha256)
            bare_loop(backbone, recs[: args.batch], args.batch)  # warm-up
            bare, mine = [], []
            for _ in range(args.rounds):
                bare.append(bare_loop(backbone, recs, args.batch))
                mine.append(ours(backbone, view, args.split, spec, tmp / "timing", args.batch)[0])
            med = lambda v: sorted(v)[len(v) // 2]
            speed_rows.append([label, weights, args.batch, f"{med(bare):.0f} ({max(bare):.0f})",
                               f"{med(mine):.0f} ({max(mine):.0f})", f"{med(mine) / med(bare):.2f}",
                               f"{max(mine) / max(bare):.2f}"])
            if big:
                continue  # the size table is about the embedded backbones' full stores
            fs = extract_split(backbone, dataset, args.split, spec, tmp / "full", progress=False)
            sizes = {n: (fs.path / f"{n}.npy").stat().st_size for n in ARRAY_NAMES}
            n_img, n_cap = fs.n_images, fs.n_captions
            img_b = sizes["image_tokens"] + sizes["image_embeds"] + sizes["image_ids"]
            cap_b = sum(sizes[n] for n in ARRAY_NAMES if n.startswith(("text_", "caption_")))
            t, L = fs.image_tokens.shape, fs.text_tokens.shape
            size_rows.append([label, f"{t[1]} x {t[2]}", f"{L[1]} x {L[2]}", f"{img_b / n_img / 1024:.1f}",
                              f"{cap_b / n_cap / 1024:.1f}", f"{(img_b + cap_b) / 2**20:.1f}"])
            del fs

    print(f"\nExtraction throughput, images/s of the image phase: median (best) of {args.rounds} alternating rounds;")
    print("same model, batch, images and machine. hada = extract_split (tokens + embeds, fp16 memmap, checkpoints)")
    print(markdown_table(["backbone", "weights", "batch", "bare open_clip", "hada extract", "ratio (median)", "ratio (best)"],
                speed_rows))
    print(f"\nBytes on disk, {args.split} split (fp16 tokens + embeddings, int64 ids/lengths)")
    print(markdown_table(["backbone", "image tokens", "text tokens (split max)", "KiB/image", "KiB/caption", "MiB total"],
                size_rows))

    # Flickr30k with ViT-B/16 at 224 px: 1 + 14*14 = 197 image tokens of 768; text tokens 512-d, padded to 77
    from hada.book import projected_store_size  # the size as a table (hada.features.store computes it)

    print("\nProjected store for Flickr30k with ViT-B/16 @224 px (text padded to the split's longest caption,")
    print("which on Flickr30k reaches the 77-token context; a 20-token padding shown for comparison)")
    print(projected_store_size("flickr30k", ("ViT-B-16",), n_images=31_783))
    print(projected_store_size("flickr30k", ("ViT-B-16",), n_images=31_783, text_length=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
