"""The real path at real shapes, on a CPU: a Flickr30k-layout folder and two real open_clip architectures (ViT-B-16
and RN50, random init, local weights files) through `hada features extract` -> `hada train` -> `hada evaluate`, and
through papermill on the training chapter.

The features are extracted once per session (most of this file's time: ViT-B-16 reads 40 images and both text
towers 200 captions at open_clip's 77 positions) and shared by every test; HADA_DATA is a session temp folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fixtures.flickr_layout import ODD_IMAGES, make_flickr_layout, save_random_weights

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODELS = ("ViT-B-16", "RN50")  # the first is the main backbone
SPLITS = {"train": 24, "val": 8, "test": 8}
#: per backbone: image tokens [T, D] at 224 px, text token width, projected embedding width (open_clip's configs:
#: ViT-B-16 = 1 CLS + 14 x 14 patches of 768-d; RN50 = the mean token + 7 x 7 cells of its 2048-d last map)
EXPECTED = {"ViT-B-16": ([197, 768], 512, 512), "RN50": ([50, 2048], 512, 1024)}


@dataclass
class RealData:
    root: Path  # the Flickr30k-layout folder
    hada_data: Path  # HADA_DATA of every command here
    backbones: str  # the --backbones value
    extract: tuple[int, str]  # exit code and stdout of `hada features extract`

    def env(self) -> dict:
        return {"HADA_DATA": str(self.hada_data), "HADA_NO_PROGRESS": "1"}

    def cli(self, *args: str) -> tuple[int, str]:
        """``hada ARGS`` in this process with this session's HADA_DATA: (exit code, stdout)."""
        from hada.cli import main

        out = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
            for key, value in self.env().items():
                mp.setenv(key, value)
            code = main(list(args))
        return code, out.getvalue()

    def data_args(self) -> list[str]:
        return ["--dataset", "flickr30k", "--data-root", str(self.root), "--backbones", self.backbones]

    def manifest(self, spec: str, split: str) -> dict:
        from hada.features.store import store_dir

        path = store_dir("flickr30k", spec, split, self.hada_data / "features") / "manifest.json"
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> RealData:
    """The folder, the weights files and the extracted features of every split, made once per session."""
    base = tmp_path_factory.mktemp("real-shapes")
    root = make_flickr_layout(base / "flickr30k", SPLITS)
    specs = [f"{m}:{save_random_weights(m, base / 'weights' / f'{m}.pt')}" for m in MODELS]
    data = RealData(root, base / "hada-data", ",".join(specs), (0, ""))
    data.extract = data.cli("features", "extract", *data.data_args())
    return data


@pytest.fixture(scope="session")
def trained(real) -> tuple[int, str, Path]:
    """One epoch of the miniature recipe on the CPU: (exit code, stdout, run folder)."""
    code, out = real.cli("train", *real.data_args(), "--epochs", "1", "--device", "cpu")
    runs = [p for p in (real.hada_data / "runs").glob("hada-*") if (p / "metrics.json").exists()]
    return code, out, runs[0] if len(runs) == 1 else None


@pytest.fixture(scope="session")
def trained_bf16(real) -> Path | None:
    """One epoch with precision forced to bfloat16 (autocast runs on any CPU, natively or not), on training's
    default one thread: the run folder."""
    code, out = real.cli("train", *real.data_args(), "--epochs", "1", "--device", "cpu", "--precision", "bf16")
    assert code == 0, out
    runs = [p for p in (real.hada_data / "runs").glob("hada-k2-*") if (p / "metrics.json").exists()
            and json.loads((p / "config.json").read_text())["model"]["precision"] == "bf16"]
    return runs[0] if len(runs) == 1 else None


def _check_recalls(metrics: dict, n_images: int) -> None:
    recalls = [metrics[f"{kind}_retrieval_recall@{k}"] for kind in ("text", "image") for k in (1, 5, 10)]
    assert all(0.0 <= r <= 100.0 for r in recalls), metrics
    for kind in ("text", "image"):
        r1, r5, r10 = (metrics[f"{kind}_retrieval_recall@{k}"] for k in (1, 5, 10))
        assert r1 <= r5 <= r10, metrics
    assert math.isclose(metrics["rsum"], sum(recalls), abs_tol=1e-6)
    if n_images <= 10:  # every image is in a caption's top 10
        assert metrics["image_retrieval_recall@10"] == 100.0


def test_fixture_has_flickr30k_layout_and_odd_images(real):
    from PIL import Image

    from hada.data.datasets import load_dataset

    ds = load_dataset("flickr30k", real.root)
    assert {s: len(ds.split(s)) for s in SPLITS} == SPLITS
    assert all(len(r.captions) == 5 for r in ds.images)
    modes = {}
    for index, mode in ODD_IMAGES.items():
        with Image.open(ds.images[index].path) as im:
            modes[index] = im.mode
    assert modes == ODD_IMAGES


def test_extract_stores_real_shapes(real):
    code, out = real.extract
    assert code == 0, out
    from hada.features.store import open_features, store_shapes

    for spec in real.backbones.split(","):
        model = spec.split(":", 1)[0]
        tokens, text_dim, embed_dim = EXPECTED[model]
        projected = store_shapes(spec)  # what the book's size table computes from the config alone
        assert list(projected["image_tokens"]) == tokens and projected["embed_dim"] == embed_dim
        for split, n in SPLITS.items():
            manifest = real.manifest(spec, split)
            arrays = {name: a["shape"] for name, a in manifest["arrays"].items()}
            m = 5 * n
            width = arrays["text_tokens"][1]
            assert arrays["image_tokens"] == [n, *tokens], (model, split)
            assert arrays["image_embeds"] == [n, embed_dim]
            assert arrays["text_tokens"] == [m, width, text_dim] and 5 < width <= 77
            assert arrays["text_embeds"] == [m, embed_dim]
            assert manifest["complete"] and manifest["backbone"]["model"] == model
            assert manifest["backbone"]["image_size"] == [224, 224]
        fs = open_features("flickr30k", spec, "train", real.hada_data / "features")
        assert int(fs.text_lengths.max()) == fs.text_tokens.shape[1]
        odd = np.asarray(fs.image_tokens[sorted(ODD_IMAGES)], dtype=np.float32)  # grayscale, CMYK, RGBA
        assert np.isfinite(odd).all() and (np.abs(odd).sum(axis=(1, 2)) > 0).all()


def test_train_one_epoch_on_cpu(real, trained):
    code, out, run_dir = trained
    assert code == 0 and run_dir is not None, out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert metrics["epochs_run"] == 1 and len(history) == 1
    assert history[0]["pairs"] == 5 * SPLITS["train"] and math.isfinite(history[0]["loss"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["device"] == "cpu" and config["data"]["backbones"] == real.backbones.split(",")
    for split in ("val", "test"):
        _check_recalls(metrics[split], SPLITS[split])


def test_evaluate_scores_backbones_average_and_the_run(real, trained, tmp_path):
    from hada.evaluate import percent_metrics

    _, _, run_dir = trained
    out = tmp_path / "eval"
    code, text = real.cli("evaluate", *real.data_args(), "--run", str(run_dir), "--device", "cpu", "--out", str(out))
    assert code == 0, text
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert len(records) == 4  # two backbones, their average and the run: one CLIP_benchmark file each
    assert {r["model"] for r in records} >= {"ViT-B-16", "RN50"}
    for record in records:
        _check_recalls(percent_metrics(record), SPLITS["test"])
    # the run scored by `hada evaluate` is the run `hada train` scored
    (run,) = [r for r in records if r["pretrained"] == str(run_dir) or r["model"] == run_dir.name]
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert percent_metrics(run) == pytest.approx({k: test[k] for k in percent_metrics(run)}, abs=1e-6)


def test_train_and_evaluate_score_a_bf16_run_to_the_last_digit(real, trained_bf16, tmp_path):
    """`hada train`'s own test scores and `hada evaluate --run` on two threads are the same numbers, and the run's
    embeddings do not follow the caller's thread count (the rounding of bfloat16 products does, on CPUs that
    multiply it natively)."""
    import torch

    from hada.evaluate import embed_split, percent_metrics
    from hada.train import load_trained

    assert trained_bf16 is not None
    assert json.loads((trained_bf16 / "config.json").read_text())["model"]["precision"] == "bf16"
    model = load_trained(trained_bf16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HADA_DATA", str(real.hada_data))
        data = model.load_data("test")
    before = torch.get_num_threads()
    try:
        embeddings = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            embeddings.append(embed_split(model.pair, data, model.config.data.eval_batch_size))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*embeddings))
    out = tmp_path / "eval"
    code, text = real.cli("evaluate", *real.data_args(), "--run", str(trained_bf16), "--device", "cpu",
                          "--no-baselines", "--jobs", "2", "--out", str(out))
    assert code == 0, text
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    test = json.loads((trained_bf16 / "metrics.json").read_text())["test"]
    evaluated = percent_metrics(record)
    assert {k: round(v, 9) for k, v in evaluated.items()} == {k: round(test[k], 9) for k in evaluated}


@pytest.mark.book
def test_training_chapter_through_papermill_on_flickr30k_layout(real, tmp_path):
    """book/04_training.md on the real-shape data with one epoch: no error in any cell, and the run it trained."""
    def finished_runs() -> set[Path]:
        return {p for p in (real.hada_data / "runs").glob("hada-k2-*") if (p / "metrics.json").exists()}

    before = finished_runs()
    nb = tmp_path / "04_training.ipynb"
    res = subprocess.run([str(BIN / "jupytext"), "--to", "ipynb", str(ROOT / "book" / "04_training.md"), "-o",
                          str(nb)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out.ipynb"
    env = {**os.environ, **real.env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                   os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([str(BIN / "papermill"), str(nb), str(out), "-p", "dataset", "flickr30k",
                          "-p", "data_root", str(real.root), "-p", "backbones", real.backbones,
                          "-p", "epochs", "1", "-p", "device", "cpu", "--cwd", str(ROOT / "book")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    cells = json.loads(out.read_text())["cells"]
    errors = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors == []
    # the chapter trained one run, or found the identical one `hada train` made (a run's name is its settings)
    trained = finished_runs() - before
    assert len(trained) <= 1 and finished_runs()
    assert all(json.loads((p / "config.json").read_text())["data"]["dataset"] == "flickr30k" for p in trained)
