"""The feature store: layout, resumable byte-identical extraction, manifest checks, corruption detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hada.errors import HadaError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[str, str]:
    """Two different weight files of the small tiny-vit architecture (random init, seeds 0 and 1)."""
    import open_clip
    from safetensors.torch import save_file

    from hada.backbones import register_model_configs

    register_model_configs()
    folder = tmp_path_factory.mktemp("fweights")
    specs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny-vit")
        path = folder / f"tiny-vit-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        specs.append(f"tiny-vit:{path}")
    return specs[0], specs[1]


@pytest.fixture(scope="module")
def backbone(weights):
    from hada.backbones import load_backbone

    return load_backbone(weights[0])


@pytest.fixture(scope="module")
def dataset(tiny_synthetic):
    from hada.data.datasets import load_dataset

    return load_dataset("synthetic", tiny_synthetic)


def _bytes(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.npy"))}


def test_store_layout_and_values(backbone, dataset, weights, tmp_path):
    from PIL import Image

    from hada.features.store import open_features

    from hada.features.store import extract_split

    fs = extract_split(backbone, dataset, "val", weights[0], tmp_path, progress=False)
    recs = dataset.split("val")
    caps = [c for r in recs for c in r.captions]
    assert fs.image_tokens.dtype == np.float16 and fs.image_tokens.shape == (20, 65, 128)
    assert fs.image_embeds.shape == (20, 128) and fs.text_embeds.shape == (len(caps), 128)
    lengths = backbone.text_lengths(caps).numpy()
    assert fs.text_tokens.shape == (len(caps), lengths.max(), 128) and lengths.max() < 64  # split max, not context
    assert np.array_equal(fs.text_lengths, lengths)
    assert fs.image_ids.tolist() == [r.image_id for r in recs]
    assert fs.caption_ids.tolist() == [c for r in recs for c in r.caption_ids]
    assert np.array_equal(fs.caption_image_index, np.repeat(np.arange(20), [len(r.captions) for r in recs]))
    assert isinstance(fs.text_tokens, np.memmap) and not fs.text_tokens.flags.writeable
    for j in (0, len(caps) - 1):  # padding is zero
        assert not fs.text_tokens[j, fs.text_lengths[j]:].any()

    with Image.open(recs[3].path) as im:
        tb = backbone.encode_image_tokens([im.convert("RGB")])
    assert np.allclose(fs.image_tokens[3], tb.tokens[0].numpy(), atol=2e-2, rtol=1e-2)
    tt = backbone.encode_text_tokens(caps[7:8])
    assert np.allclose(fs.text_embeds[7], tt.embeds[0].numpy(), atol=1e-2, rtol=1e-2)
    n = int(fs.text_lengths[7])
    assert np.allclose(fs.text_tokens[7, :n], tt.tokens[0, :n].numpy(), atol=2e-2, rtol=1e-2)

    m = fs.manifest
    assert m["complete"] and m["dataset_json_sha256"] == dataset.json_sha256
    assert m["backbone"]["model"] == "tiny-vit" and m["backbone"]["open_clip_version"]
    assert m["backbone"]["weights_sha256"] and m["backbone"]["image_size"] == [64, 64]
    assert m["arrays"]["text_tokens"] == {"shape": list(fs.text_tokens.shape), "dtype": "float16"}
    again = open_features("synthetic", weights[0], "val", tmp_path)
    assert np.array_equal(again.image_tokens, fs.image_tokens)


def test_interrupted_extraction_resumes_to_identical_bytes(backbone, dataset, weights, tmp_path):
    """A kill inside the images or the captions, resumed with other batch sizes (the store keeps its own)."""
    from hada.features.store import _Stop, extract_split, open_features, store_dir

    kw = dict(progress=False, checkpoint_seconds=0)
    whole = extract_split(backbone, dataset, "test", weights[0], tmp_path / "a", image_batch=8, text_batch=32, **kw)
    assert whole.manifest["batch"] == {"images": 8, "captions": 32}
    for stop, rows in ((2, {"images": [[0, 16]], "captions": []}), (4, {"images": [[0, 20]], "captions": [[0, 32]]})):
        with pytest.raises(_Stop):
            extract_split(backbone, dataset, "test", weights[0], tmp_path / f"b{stop}", image_batch=8, text_batch=32,
                          _stop_after_batches=stop, **kw)
        path = store_dir("synthetic", weights[0], "test", tmp_path / f"b{stop}")
        assert json.loads((path / "progress-0.json").read_text()) == rows
        with pytest.raises(HadaError, match="unfinished"):
            open_features("synthetic", weights[0], "test", tmp_path / f"b{stop}")
        done = extract_split(backbone, dataset, "test", weights[0], tmp_path / f"b{stop}", image_batch=5,
                             text_batch=12, jobs=1, **kw)
        assert _bytes(done.path) == _bytes(whole.path)
        assert done.manifest["batch"] == {"images": 8, "captions": 32}
        assert not list(path.glob("progress*.json"))


def test_a_store_started_in_chunks_resumes_in_rows(backbone, dataset, weights, tmp_path):
    """Stores from before row progress: manifest "chunks" and progress.json in chunks."""
    from hada.features.store import _Stop, extract_split, store_dir

    kw = dict(progress=False, checkpoint_seconds=0)
    whole = extract_split(backbone, dataset, "test", weights[0], tmp_path / "a", image_batch=8, text_batch=32, **kw)
    with pytest.raises(_Stop):
        extract_split(backbone, dataset, "test", weights[0], tmp_path, image_batch=8, text_batch=32,
                      _stop_after_batches=2, **kw)
    path = store_dir("synthetic", weights[0], "test", tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["chunks"] = manifest.pop("batch")
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "progress-0.json").unlink()
    (path / "progress.json").write_text(json.dumps({"image_chunks": 1, "caption_chunks": 0}))
    done = extract_split(backbone, dataset, "test", weights[0], tmp_path, **kw)
    assert _bytes(done.path) == _bytes(whole.path)


def test_a_different_request_is_an_error_naming_the_difference(dataset, weights, tmp_path):
    from hada.backbones import load_backbone
    from hada.features.store import extract_split, store_dir

    a, b = load_backbone(weights[0]), load_backbone(weights[1])
    extract_split(a, dataset, "val", "store", tmp_path, progress=False)
    with pytest.raises(HadaError, match=r"weights_sha256: store has .*--force"):
        extract_split(b, dataset, "val", "store", tmp_path, progress=False)
    same = extract_split(a, dataset, "val", "store", tmp_path, image_batch=4, progress=False)  # batch: not compared
    assert same.manifest["batch"]["images"] == 128
    fs = extract_split(b, dataset, "val", "store", tmp_path, force=True, progress=False)
    assert fs.manifest["backbone"]["weights_sha256"] == b.describe()["weights_sha256"]
    assert store_dir("synthetic", "store", "val", tmp_path) == fs.path


def test_corrupt_or_truncated_stores_are_refused(backbone, dataset, weights, tmp_path):
    from hada.features.store import extract_split, open_features

    fs = extract_split(backbone, dataset, "val", weights[0], tmp_path, progress=False)
    path = fs.path
    del fs
    f = path / "text_tokens.npy"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(HadaError, match="text_tokens.npy does not hold the bytes it was written with"):
        open_features("synthetic", weights[0], "val", tmp_path)
    f.write_bytes(bytes(data[:-100]))
    with pytest.raises(HadaError, match=r"text_tokens.npy has \d+ bytes, expected"):
        open_features("synthetic", weights[0], "val", tmp_path)
    with pytest.raises(HadaError, match="damaged"):  # extraction does not reuse it silently either
        extract_split(backbone, dataset, "val", weights[0], tmp_path, progress=False)
    fs = extract_split(backbone, dataset, "val", weights[0], tmp_path, force=True, progress=False)
    assert open_features("synthetic", weights[0], "val", tmp_path, verify="full").n_images == 20


def test_cli_extract_verify_and_ensure_features(hada_data, tiny_synthetic, weights, capsys):
    from hada.cli import main
    from hada.features.store import ensure_features

    args = ["--data-root", str(tiny_synthetic), "--backbones", weights[0], "--split", "val"]
    assert main(["features", "extract", *args]) == 0
    assert "20 images x 65 tokens" in capsys.readouterr().out
    assert main(["features", "verify", *args]) == 0
    stores = ensure_features("synthetic", [weights[0]], ["val"], tiny_synthetic)
    assert stores[weights[0]]["val"].n_images == 20
    assert main(["features", "extract", "--data-root", str(tiny_synthetic), "--backbones", weights[1], "--split", "val",
                 "--image-batch", "7"]) == 0
    assert main(["features", "extract", *args, "--image-batch", "5", "--device", "cpu", "--jobs", "0"]) == 0
    code = main(["features", "extract", *args, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"])
    assert code == 2 and "CUDA device" in capsys.readouterr().err


def test_projected_store_size_for_flickr30k_with_vit_b16():
    from hada.book.views import store_size_table
    from hada.features.store import projected_store_size

    size = projected_store_size("flickr30k", ("ViT-B-16",), n_images=31_783)
    row = size.rows[0]
    assert row["image_tokens"] == "197 x 768" and row["text_tokens"] == "77 x 512"
    per_image = 197 * 768 * 2 + 512 * 2 + 8
    assert abs(row["image_gb"] - 31_783 * per_image / 1e9) < 1e-9
    assert "31,783 images, 158,915 captions" in str(store_size_table(size))


def test_augmented_views_record_their_policy(backbone, dataset, weights, tmp_path):
    from hada.features.batching import FeatureData, compute_stats
    from hada.features.store import AUGMENT_DIR, MANIFEST, extract_augmented, extract_split

    extract_split(backbone, dataset, "val", weights[0], tmp_path, progress=False)
    views = {}
    for policy in ("albef", "randaugment"):
        fs = extract_augmented(backbone, dataset, "val", 1, weights[0], tmp_path, policy=policy, progress=False)
        assert fs.augment_policy == policy
        assert json.loads((fs.path / AUGMENT_DIR / MANIFEST).read_text())["policy"] == policy
        views[policy] = np.array(fs.augmented[1])
        assert not np.array_equal(views[policy], fs.image_embeds[None])  # the views differ from the plain image
    assert not np.array_equal(views["albef"], views["randaugment"])  # another policy: made again
    with pytest.raises(HadaError, match="made with the randaugment policy"):
        FeatureData([fs], compute_stats([fs]), augment_p=0.5, augment_policy="albef")
    FeatureData([fs], compute_stats([fs]), augment_p=0.5, augment_policy="randaugment")
