"""Images that cannot be decoded are named in one line (exit 2) by `features extract` and `data check --decode`;
grayscale, palette, CMYK and RGBA images are fine; `data check` counts empty and too long captions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from hada.cli import main

MODES = ("RGB", "L", "P", "CMYK", "RGBA")


def _jpeg(mode: str, seed: int) -> bytes:
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    im = rgb.convert(mode)
    out = io.BytesIO()
    im.save(out, "PNG" if mode in ("P", "RGBA") else "JPEG")  # read by content, whatever the name says
    return out.getvalue()


def _dataset(root: Path, bad: dict[int, bytes] | None = None) -> Path:
    """Flickr30k layout: 5 train images of every mode, 1 val; caption 1 of image 0 empty, caption 2 long."""
    folder = root / "flickr30k-images"
    folder.mkdir(parents=True)
    images = []
    for i in range(6):
        raws = [f"a picture number {i} caption {j}" for j in range(5)]
        if i == 0:
            raws[1], raws[2] = "  ", " ".join(["a very long caption"] * 10)
        images.append({"filename": f"{100 + i}.jpg", "imgid": i, "split": "train" if i < 5 else "val",
                       "sentences": [{"raw": r, "sentid": i * 10 + j} for j, r in enumerate(raws)]})
        (folder / f"{100 + i}.jpg").write_bytes(_jpeg(MODES[i % len(MODES)], i))
    for i, data in (bad or {}).items():
        (folder / f"{100 + i}.jpg").write_bytes(data)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def _broken() -> dict[int, bytes]:
    good = _jpeg("RGB", 7)
    return {2: good[: len(good) // 2], 4: b"not an image at all"}


def test_data_check_decode_counts_captions_and_names_bad_images(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    good = _dataset(tmp_path / "good")
    args = ["data", "check", "--dataset", "flickr30k", "--decode"]
    assert main([*args, "--data-root", str(good), "--backbones", "tiny-rn:random,tiny-vit:random"]) == 0
    out = capsys.readouterr().out
    assert "image files all decoded" in out and "empty captions: 1 (train 1)" in out
    assert "tiny-rn:random's context of 24 tokens: 1 (train 1), cut" in out
    assert "tiny-vit:random's context of 64 tokens: none" in out

    bad = _dataset(tmp_path / "bad", _broken())
    assert main([*args, "--data-root", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "2 of 6 images of flickr30k" in err and "102.jpg, 104.jpg" in err and "truncated" in err


def test_extract_stops_before_writing_and_odd_modes_extract(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "hada-data"))
    args = ["features", "extract", "--dataset", "flickr30k", "--backbones", "tiny-vit:random", "--split", "train",
            "--device", "cpu"]
    bad = _dataset(tmp_path / "bad", _broken())
    assert main([*args, "--data-root", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "2 of 5 images of flickr30k train" in err
    assert "102.jpg, 104.jpg" in err and "hada data check --decode" in err
    written = [p for p in (tmp_path / "hada-data").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not written  # nothing but the store's lock file (held while a command writes it)

    good = _dataset(tmp_path / "good")
    assert main([*args, "--data-root", str(good), "--jobs", "1"]) == 0
    assert "5 images x 65 tokens" in capsys.readouterr().out
