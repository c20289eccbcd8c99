"""The Karpathy-json loader and `hada data check`: real layouts read right, every bad input is one line + exit 2."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest

from hada.cli import main
from hada.data.datasets import ImageRecord, load_dataset
from hada.errors import HadaError


def _image(imgid: int, split: str, n_captions: int = 5, **extra) -> dict:
    sentids = [imgid * 10 + j for j in range(n_captions)]
    sentences = [{"tokens": ["a", "dog"], "raw": f"A dog {imgid}-{j}. ", "imgid": imgid, "sentid": s}
                 for j, s in enumerate(sentids)]
    return {"filename": f"{1000 + imgid}.jpg", "imgid": imgid, "split": split, "sentids": sentids,
            "sentences": sentences, **extra}


def _write(root: Path, doc: dict, name: str, folder_of) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(doc))
    for entry in doc["images"]:
        path = root / folder_of(entry) / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8")  # the loader never decodes images
    return root


FLICKR = {"images": [_image(0, "train"), _image(1, "train"), _image(2, "val"), _image(3, "test"),
                     _image(4, "train")], "dataset": "flickr30k"}
COCO = {"images": [_image(0, "train", filepath="train2014"), _image(1, "restval", filepath="val2014"),
                   _image(2, "val", filepath="val2014"), _image(3, "test", n_captions=7, filepath="val2014")],
        "dataset": "coco"}


def make_flickr(root: Path, doc: dict | None = None) -> Path:
    return _write(root, doc or FLICKR, "dataset_flickr30k.json", lambda e: "flickr30k-images")


def make_coco(root: Path, doc: dict | None = None) -> Path:
    return _write(root, doc or COCO, "dataset_coco.json", lambda e: e["filepath"])


def _check(capsys, *args) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# --- reading ---------------------------------------------------------------------------------------------
def test_flickr_records_in_file_order(tmp_path):
    root = make_flickr(tmp_path / "f30k")
    ds = load_dataset("flickr30k", root)
    assert ds.name == "flickr30k" and ds.root == root
    assert [r.image_id for r in ds.split("train")] == [0, 1, 4]
    rec = ds.split("val")[0]
    assert rec == ImageRecord(2, root / "flickr30k-images" / "1002.jpg", "val",
                              [f"A dog 2-{j}." for j in range(5)], [20, 21, 22, 23, 24])
    assert ds.counts() == {"train": {"images": 3, "captions": 15}, "val": {"images": 1, "captions": 5},
                           "test": {"images": 1, "captions": 5}}
    assert ds.json_sha256 == hashlib.sha256((root / "dataset_flickr30k.json").read_bytes()).hexdigest()


def test_a_rewritten_json_is_read_again_even_at_the_same_size(tmp_path):
    """Loads reuse the parsed json while its bytes are unchanged; an edit of the same length still counts."""
    root = make_flickr(tmp_path / "f30k")
    first = load_dataset("flickr30k", root)
    assert load_dataset("flickr30k", root).images == first.images
    path = root / "dataset_flickr30k.json"
    before = path.stat().st_size
    path.write_text(path.read_text().replace('"split": "val"', '"split": "tes"'))
    assert path.stat().st_size == before
    with pytest.raises(HadaError, match="split 'tes'"):
        load_dataset("flickr30k", root)
    make_flickr(root)
    assert load_dataset("flickr30k", root).images == first.images


def test_coco_restval_is_train_paths_follow_filepath_and_no_caption_is_dropped(tmp_path):
    root = make_coco(tmp_path / "coco")
    ds = load_dataset("coco", root)
    assert [r.image_id for r in ds.split("train")] == [0, 1]
    assert ds.split("train")[1].path == root / "val2014" / "1001.jpg"
    assert ds.split("train")[0].path == root / "train2014" / "1000.jpg"
    assert len(ds.split("test")[0].captions) == 7
    assert ds.counts()["test"] == {"images": 1, "captions": 7}


def test_synthetic_default_root_and_pretrain_split(tiny_synthetic, monkeypatch):
    monkeypatch.setenv("HADA_DATA", str(tiny_synthetic.parent))
    ds = load_dataset("synthetic")
    assert ds.root == tiny_synthetic
    assert {s: c["images"] for s, c in ds.counts().items()} == {"pretrain": 40, "train": 40, "val": 20, "test": 20}
    assert all(len(r.captions) == 5 and r.path.exists() for r in ds.images)


def test_unknown_split_name_lists_the_allowed_ones(tmp_path):
    ds = load_dataset("flickr30k", make_flickr(tmp_path / "f"))
    with pytest.raises(HadaError, match="allowed: train, val, test"):
        ds.split("pretrain")
    with pytest.raises(HadaError, match="choose one of: flickr30k, coco, synthetic"):
        load_dataset("imagenet", tmp_path)


# --- hada data check ------------------------------------------------------------------------------------------
def test_check_prints_counts_and_karpathy_sizes(tmp_path, capsys):
    code, out, err = _check(capsys, "--dataset", "flickr30k", "--data-root", make_flickr(tmp_path / "f"))
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0].split() == ["split", "images", "captions", "expected", "images"]
    assert lines[2].split()[:4] == ["train", "3", "15", "29,000"]
    assert lines[5].split() == ["total", "5", "25"]
    assert "all present" in out


def test_check_synthetic(tiny_synthetic, capsys):
    code, out, _ = _check(capsys, "--data-root", tiny_synthetic)
    assert code == 0 and out.splitlines()[2].split() == ["pretrain", "40", "200"]


def test_no_images_skips_the_file_check(tmp_path, capsys):
    root = make_flickr(tmp_path / "f")
    (root / "flickr30k-images" / "1003.jpg").unlink()
    assert _check(capsys, "--dataset", "flickr30k", "--data-root", root)[0] == 2
    code, out, _ = _check(capsys, "--dataset", "flickr30k", "--data-root", root, "--no-images")
    assert code == 0 and "not checked" in out


# --- every bad input: one line, exit 2 ------------------------------------------------------------------------
def _mutated(change) -> dict:
    doc = copy.deepcopy(FLICKR)
    change(doc)
    return doc


BAD_DOCS = {
    "missing imgid": (lambda d: d["images"][1].pop("imgid"), "image 1 (1001.jpg) lacks key 'imgid'"),
    "missing filename": (lambda d: d["images"][2].pop("filename"), "image 2 lacks key 'filename'"),
    "missing sentences": (lambda d: d["images"][0].pop("sentences"), "image 0 (1000.jpg) lacks key 'sentences'"),
    "missing raw": (lambda d: d["images"][3]["sentences"][2].pop("raw"),
                    "image 3 (1003.jpg), sentence 2 lacks key 'raw'"),
    "missing sentid": (lambda d: d["images"][3]["sentences"][0].pop("sentid"), "sentence 0 lacks key 'sentid'"),
    "imgid not int": (lambda d: d["images"][1].update(imgid="1"), "'imgid' should be an integer"),
    "no captions": (lambda d: d["images"][4].update(sentences=[]), "image 4 (1004.jpg) has no captions"),
    "duplicate imgid": (lambda d: d["images"][4].update(imgid=0), "duplicate image id 0 (images 0 and 4)"),
    "duplicate sentid": (lambda d: d["images"][2]["sentences"][0].update(sentid=11),
                         "duplicate sentence id 11 (images 1 and 2)"),
    "unknown split": (lambda d: d["images"][2].update(split="dev"),
                      "has split 'dev'; allowed for flickr30k: train, val, test"),
    "no images list": (lambda d: d.pop("images") and d.update(imgs=[]), "no top-level 'images' list"),
    "synthetic as flickr": (lambda d: d.update(dataset="synthetic"), "use --dataset synthetic"),
}


@pytest.mark.parametrize("case", list(BAD_DOCS))
def test_bad_json_content_is_one_line(tmp_path, capsys, case):
    change, message = BAD_DOCS[case]
    root = tmp_path / "f"
    make_flickr(root, copy.deepcopy(FLICKR))
    (root / "dataset_flickr30k.json").write_text(json.dumps(_mutated(change)))
    code, out, err = _check(capsys, "--dataset", "flickr30k", "--data-root", root, "--no-images")
    assert code == 2 and message in err, err
    assert err.startswith("hada: error:") and err.count("\n") == 1 and "Traceback" not in err


def _one_line_error(capsys, args, *fragments) -> str:
    code, _, err = _check(capsys, *args)
    assert code == 2, err
    assert err.startswith("hada: error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_folder_and_missing_json(tmp_path, capsys):
    _one_line_error(capsys, ["--dataset", "flickr30k", "--data-root", tmp_path / "nope"], "does not exist")
    _one_line_error(capsys, ["--data-root", tmp_path / "nope"], "does not exist", "hada data synth")
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["--dataset", "coco", "--data-root", tmp_path / "empty"], "has no dataset_coco.json")
    (tmp_path / "file").write_text("")
    _one_line_error(capsys, ["--dataset", "flickr30k", "--data-root", tmp_path / "file"], "is not a folder")


def test_malformed_json_names_line_and_column(tmp_path, capsys):
    root = tmp_path / "f"
    root.mkdir()
    (root / "dataset_flickr30k.json").write_text('{"images": [\n  {"filename": "a.jpg",\n  "imgid" 3}\n]}')
    _one_line_error(capsys, ["--dataset", "flickr30k", "--data-root", root], "not valid JSON", "line 3, column 11")
    (root / "dataset_flickr30k.json").write_bytes(b'{"images": ["\xff"]}')
    _one_line_error(capsys, ["--dataset", "flickr30k", "--data-root", root], "not UTF-8")


def test_missing_image_files_are_named_and_counted(tmp_path, capsys):
    root = make_coco(tmp_path / "coco")
    for name in ("1001.jpg", "1002.jpg", "1003.jpg"):
        (root / "val2014" / name).unlink()
    _one_line_error(capsys, ["--dataset", "coco", "--data-root", root], "3 of 4 image files are missing",
                    "1001.jpg, 1002.jpg, 1003.jpg", "val2014")
    root = make_flickr(tmp_path / "f")
    for p in (root / "flickr30k-images").iterdir():
        p.unlink()
    (root / "flickr30k-images").rmdir()
    _one_line_error(capsys, ["--dataset", "flickr30k", "--data-root", root], "5 of 5 image files", "(folder missing)")


def test_coco_needs_filepath(tmp_path, capsys):
    doc = copy.deepcopy(COCO)
    doc["images"][2].pop("filepath")
    root = tmp_path / "coco"
    root.mkdir()
    (root / "dataset_coco.json").write_text(json.dumps(doc))
    _one_line_error(capsys, ["--dataset", "coco", "--data-root", root, "--no-images"],
                    "image 2 (1002.jpg) lacks key 'filepath'")
