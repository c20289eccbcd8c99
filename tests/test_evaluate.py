"""Recalls against a brute-force reference (ties, 4-6 captions per image), chunking, COCO-sized splits, and the
CLIP_benchmark records and files they are written to."""

import json

import numpy as np
import pytest
import torch

from hada.book.tables import metrics_table
from hada.errors import HadaError
from hada.io import write_json
from hada.evaluate import (backbone_identity, clip_benchmark_record, percent_metrics, read_record,
                           write_records)
from hada.metrics import EmbeddingSimilarity, metrics_from_ranks, retrieval_metrics, retrieval_ranks


def brute_force(sims: np.ndarray, ci: np.ndarray) -> dict:
    """Straight from the definitions, one loop per query; a tie goes to the positive."""
    n_img, n_cap = sims.shape
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(n_img):
            caps = [j for j in range(n_cap) if ci[j] == i]
            hits += any(sum(sims[i, c] > sims[i, j] for c in range(n_cap)) < k for j in caps)
        out[f"text_retrieval_recall@{k}"] = 100.0 * hits / n_img
    for k in (1, 5, 10):
        hits = 0
        for j in range(n_cap):
            hits += sum(sims[r, j] > sims[ci[j], j] for r in range(n_img)) < k
        out[f"image_retrieval_recall@{k}"] = 100.0 * hits / n_cap
    out["rsum"] = sum(out[f"text_retrieval_recall@{k}"] + out[f"image_retrieval_recall@{k}"] for k in (1, 5, 10))
    return out


def uneven_index(rng, n_img):
    counts = rng.choice([4, 5, 6], size=n_img)
    ci = np.repeat(np.arange(n_img), counts)
    return rng.permutation(ci)  # captions need not be grouped by image


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    n_img = 23
    ci = uneven_index(rng, n_img)
    if ties:
        sims = rng.integers(0, 4, size=(n_img, len(ci))).astype(np.float32)  # many exact ties
    else:
        sims = rng.standard_normal((n_img, len(ci))).astype(np.float32)
        sims[ci, np.arange(len(ci))] += 1.0  # make the recalls non-trivial
    ref = brute_force(sims, ci)
    for block in (1 << 23, 7, 64):  # one block, and stripes of one row/column or a few
        got = retrieval_metrics(torch.from_numpy(sims), ci, max_block_elements=block)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key] == pytest.approx(ref[key], abs=1e-9), (key, block)


def test_sources_agree():
    """Dense matrix, numpy array, callable and embedding terms give identical ranks."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(11, 8, generator=g), torch.randn(40, 8, generator=g)
    img2, txt2 = torch.randn(11, 5, generator=g), torch.randn(40, 5, generator=g)
    ci = np.arange(40) % 11
    sims = 0.3 * img @ txt.T + 0.7 * img2 @ txt2.T
    src = EmbeddingSimilarity([(0.3, img, txt), (0.7, img2.numpy(), txt2.numpy())])
    ref = retrieval_metrics(sims, ci)
    assert retrieval_metrics(sims.numpy(), ci) == pytest.approx(ref)
    assert retrieval_metrics(src, ci, max_block_elements=50) == pytest.approx(ref)
    assert retrieval_metrics(lambda r, c: sims[r, c], ci, n_images=11) == pytest.approx(ref)


def test_perfect_and_ranges():
    ci = np.repeat(np.arange(6), 5)
    sims = torch.full((6, 30), -1.0)
    sims[torch.from_numpy(ci), torch.arange(30)] = 1.0
    m = retrieval_metrics(sims, ci)
    assert m["rsum"] == pytest.approx(600.0)
    assert retrieval_metrics(-sims, ci)["text_retrieval_recall@1"] == 0.0


def test_coco_sized_split_not_truncated():
    """5,000 images with 25,010 captions (some images with 6): every caption is scored."""
    n_img, n_cap = 5000, 25010
    ci = np.concatenate([np.repeat(np.arange(n_img), 5), np.arange(10)])  # images 0..9 get a 6th caption
    assert len(ci) == n_cap
    d = 16
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=1)
    txt = img[torch.from_numpy(ci)].clone()
    txt[-10:] = -txt[-10:]  # the ten extra captions point away from their images
    i2t, t2i = retrieval_ranks(EmbeddingSimilarity([(1.0, img, txt)]), ci)
    assert i2t.shape == (n_img,) and t2i.shape == (n_cap,)
    m = metrics_from_ranks(i2t, t2i)
    # random 16-d images are distinct enough that the exact caption ranks its own image first
    assert m["image_retrieval_recall@1"] == pytest.approx(100.0 * 25000 / 25010)
    assert m["text_retrieval_recall@1"] == pytest.approx(100.0)


def test_bad_inputs_raise():
    with pytest.raises(HadaError):
        retrieval_metrics(torch.zeros(3, 4), [0, 1, 2])  # 4 columns, 3 captions
    with pytest.raises(HadaError):
        retrieval_metrics(torch.zeros(3, 3), [0, 1, 1])  # image 2 has no caption
    with pytest.raises(HadaError):
        retrieval_metrics(torch.full((2, 2), float("nan")), [0, 1])
    with pytest.raises(HadaError):
        retrieval_metrics(lambda r, c: None, [0, 1])  # a function without n_images


def test_clip_benchmark_record_is_exactly_what_clip_benchmark_writes(tmp_path):
    """The keys and order of clip_benchmark/cli.py's dump, recalls as fractions under its names, no Rsum."""
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    m["text_retrieval_recall@1"], m["rsum"] = 100.0 / 3, m["rsum"] - 200.0 / 3  # one of three images found
    rec = clip_benchmark_record(m, dataset="coco", model="ViT-B-16", pretrained="openai")
    assert list(rec) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert rec["dataset"] == "mscoco_captions" and rec["task"] == "zeroshot_retrieval" and rec["language"] == "en"
    assert list(rec["metrics"]) == [f"{way}_retrieval_recall@{k}" for k in (1, 5, 10) for way in ("image", "text")]
    assert rec["metrics"]["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert rec["metrics"]["image_retrieval_recall@10"] == 1.0
    assert clip_benchmark_record(m, "synthetic", "hada", "/runs/x", split="val")["dataset"] == "synthetic/val"
    back = read_record(write_json(tmp_path / "r.json", rec))
    assert back == rec
    assert percent_metrics(back) == pytest.approx(m)
    assert "ViT-B-16" in str(metrics_table([("ViT-B-16", percent_metrics(back))]))


def test_clip_benchmark_record_names_its_weights(tmp_path):
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    for missing in (None, ""):
        with pytest.raises(HadaError, match="weights"):
            clip_benchmark_record(m, "synthetic", "hada", missing)
    with pytest.raises(HadaError, match="recall"):
        clip_benchmark_record({"rsum": 1.0}, "synthetic", "hada", "x")
    assert backbone_identity("ViT-B-16:/no/such/file.bin") == ("ViT-B-16", "ViT-B-16:/no/such/file.bin")


def test_result_files_one_per_row(tmp_path):
    m = retrieval_metrics(torch.eye(3), [0, 1, 2])
    records = [clip_benchmark_record(m, "flickr30k", "ViT-B-16", "openai"),
               clip_benchmark_record(m, "flickr30k", "average(a + b)", "/w/a/model.bin + /w/b/model.bin"),
               clip_benchmark_record(m, "flickr30k", "hada(a + b)", "/data/runs/hada-k2-0123456789ab")]
    paths = write_records(records, tmp_path / "eval")
    assert [p.name for p in paths] == [
        "flickr30k_openai_ViT-B-16_en_zeroshot_retrieval.json",
        "flickr30k_model.bin-+-model.bin_average-a-+-b_en_zeroshot_retrieval.json",
        "flickr30k_hada-k2-0123456789ab_hada-a-+-b_en_zeroshot_retrieval.json"]
    assert [read_record(p) for p in paths] == records
    with pytest.raises(HadaError, match="share"):
        write_records(records[:1] * 2, tmp_path / "twice")
    with pytest.raises(HadaError, match="is a file"):
        write_records(records, paths[0])
    (tmp_path / "list.json").write_text(json.dumps(records))  # the old format: a list of records
    with pytest.raises(HadaError, match="not one CLIP_benchmark record"):
        read_record(tmp_path / "list.json")
