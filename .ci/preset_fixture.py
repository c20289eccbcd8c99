"""A shipped preset (book/params/*.yaml) pointed at a miniature of its dataset, for papermill reruns in CI.

    python .ci/preset_fixture.py book/params/flickr30k.yaml OUT [--epochs 1]

writes under OUT the miniature in the preset's dataset layout (Flickr30k's or COCO's Karpathy json and image
folders; tests/fixtures/flickr_layout.py, the tests' real-layout fixture), each backbone the preset names as its
open_clip architecture at a seeded random init in a local weights file, and OUT/params.yaml: the preset with
data_root and the weights paths replaced by those, the device set to the CPU and the budget set by --epochs.
Every other parameter is the preset's, so a page and a preset cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.flickr_layout import make_flickr_layout, save_random_weights  # noqa: E402

SPLITS = {"train": 24, "val": 8, "test": 8}


def make_coco_layout(root: Path, splits: dict[str, int]) -> Path:
    """COCO's Karpathy layout: dataset_coco.json, each image under the folder its ``filepath`` names
    (train2014 / val2014), a quarter of the training images in the ``restval`` split as in the real file."""
    flickr = make_flickr_layout(root / "_flickr", splits)
    doc = json.loads((flickr / "dataset_flickr30k.json").read_text())
    train = [e for e in doc["images"] if e["split"] == "train"]
    for i, entry in enumerate(doc["images"]):
        folder = "train2014" if entry["split"] == "train" else "val2014"
        name = f"COCO_{folder}_{int(entry['filename'].split('.')[0]) % 10**12:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.move(flickr / "flickr30k-images" / entry["filename"], root / folder / name)
        entry.update(filepath=folder, filename=name, cocoid=i)
        if entry["split"] == "train" and train.index(entry) % 4 == 3:
            entry["split"] = "restval"
    (root / "dataset_coco.json").write_text(json.dumps({"images": doc["images"], "dataset": "coco"}))
    shutil.rmtree(flickr)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=1, help="training budget of every run (default: 1)")
    args = parser.parse_args()

    params = yaml.safe_load(args.preset.read_text())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = params["dataset"]
    folder = out / dataset
    if dataset == "flickr30k":
        make_flickr_layout(folder, SPLITS)
    elif dataset == "coco":
        make_coco_layout(folder, SPLITS)
    else:
        raise SystemExit(f"{args.preset}: no miniature for dataset {dataset!r}")
    specs = []
    for seed, spec in enumerate(str(params["backbones"]).split(",")):
        model = spec.split(":", 1)[0].strip()
        weights = save_random_weights(model, out / "weights" / f"{model}.pt", seed=seed)
        specs.append(f"{model}:{weights}")
    params.update(data_root=str(folder), backbones=",".join(specs), epochs=args.epochs, device="cpu")
    (out / "params.yaml").write_text(f"# {args.preset.name}, pointed at the miniature under {out}\n"
                                     + yaml.safe_dump(params, sort_keys=False))
    print(out / "params.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
