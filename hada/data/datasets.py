"""Load an image-caption dataset in Karpathy's json layout: Flickr30k, MSCOCO or the embedded synthetic set.

One loader serves all three because the synthetic set is written in Flickr30k's exact layout. It
validates as it reads, so that a wrong path or a damaged file gives one clear line (a
:class:`HadaError`) instead of a traceback deep inside feature extraction: missing folder or json,
malformed json (with line and column), missing keys (with the image index), missing image files,
images without captions, duplicate ids and unknown split names. Every caption is kept (COCO's 5k test
split has 25,010 captions, not 25,000).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hada.errors import HadaError


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset keeps its json and images, and which splits it may have."""

    json_name: str
    splits: tuple[str, ...]
    image_dir: str | None  # None: each image's own ``filepath`` names its folder (COCO)
    split_aliases: tuple[tuple[str, str], ...] = ()  # raw split -> split, e.g. COCO's restval is train


SPECS = {
    "flickr30k": DatasetSpec("dataset_flickr30k.json", ("train", "val", "test"), "flickr30k-images"),
    "coco": DatasetSpec("dataset_coco.json", ("train", "val", "test"), None, (("restval", "train"),)),
    "synthetic": DatasetSpec("dataset_flickr30k.json", ("pretrain", "train", "val", "test"), "flickr30k-images"),
}
DATASETS = tuple(SPECS)
# Karpathy split sizes of the real datasets (images), printed beside the counts by `hada data check`.
EXPECTED_IMAGES = {
    "flickr30k": {"train": 29000, "val": 1014, "test": 1000},
    "coco": {"train": 113287, "val": 5000, "test": 5000},
}
_MAX_NAMED = 5  # missing files named in an error message


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    split: str
    captions: list[str]
    caption_ids: list[int]


@dataclass
class Dataset:
    name: str
    root: Path
    images: list[ImageRecord]
    json_sha256: str  # identifies the annotations in feature-store manifests
    _by_split: dict[str, list[ImageRecord]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for split in self.splits_allowed:
            self._by_split[split] = [r for r in self.images if r.split == split]

    @property
    def splits_allowed(self) -> tuple[str, ...]:
        return SPECS[self.name].splits

    def split(self, name: str) -> list[ImageRecord]:
        """The images of one split, in file order (stable across runs)."""
        if name not in self._by_split:
            raise HadaError(f"unknown split {name!r} for {self.name}; allowed: {', '.join(self.splits_allowed)}")
        return self._by_split[name]

    def empty_captions(self) -> dict[str, int]:
        """``{split: captions that are empty after stripping}`` (kept, but they carry no text)."""
        return {s: sum(1 for r in recs for c in r.captions if not c) for s, recs in self._by_split.items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """``{split: {"images": n, "captions": m}}`` for every split the dataset may have, in order."""
        return {s: {"images": len(recs), "captions": sum(len(r.captions) for r in recs)}
                for s, recs in self._by_split.items()}


def default_root(name: str) -> Path:
    """``data/synthetic`` for the embedded set, ``data/flickr30k`` and ``data/coco`` for the real ones."""
    from hada import paths

    return paths.synthetic_root() if name == "synthetic" else paths.data_dir() / name


def load_dataset(name: str, root: Path | str | None = None, check_images: bool = True) -> Dataset:
    """Read and validate ``<root>/<karpathy json>``; ``check_images`` also checks every image file exists."""
    if name not in SPECS:
        raise HadaError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    spec = SPECS[name]
    root = Path(root).expanduser() if root is not None else default_root(name)
    records, digest = _parsed(name, root, spec)
    if check_images:
        _check_files(records)
    return Dataset(name, root, list(records), digest)


_PARSED: dict = {}  # the last dataset json read: (name, root, sha256 of its bytes) -> (records, sha256)


def _parsed(name: str, root: Path, spec: DatasetSpec) -> tuple[list[ImageRecord], str]:
    """The validated records of ``root``'s json, reused while its bytes are unchanged: every chapter and
    pipeline step loads the dataset, and parsing takes seconds where hashing takes milliseconds."""
    try:
        key = (name, str(root), hashlib.sha256((root / spec.json_name).read_bytes()).hexdigest())
    except OSError:
        key = None  # _read_json says what is wrong
    if key is not None and key in _PARSED:
        return _PARSED[key]
    doc, digest = _read_json(root, spec, name)
    records = [_record(i, entry, root, spec, name) for i, entry in enumerate(_image_entries(doc, spec))]
    _check_unique(records)
    _PARSED.clear()  # one dataset kept: COCO's records are large
    if key is not None:
        _PARSED[key] = (records, digest)
    return records, digest


def _read_json(root: Path, spec: DatasetSpec, name: str) -> tuple[dict, str]:
    if not root.exists():
        hint = " (run `hada data synth` to make it)" if name == "synthetic" else ""
        raise HadaError(f"dataset folder {root} does not exist{hint}")
    if not root.is_dir():
        raise HadaError(f"{root} is not a folder; --data-root must be the folder that holds {spec.json_name}")
    path = root / spec.json_name
    if not path.is_file():
        raise HadaError(f"{root} has no {spec.json_name} (the Karpathy split file for {name}; see data/README.md)")
    raw = path.read_bytes()
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise HadaError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise HadaError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise HadaError(f"{path} has no top-level 'images' list; is it a Karpathy split file?")
    tag = doc.get("dataset")
    if name == "synthetic" and tag != "synthetic":
        raise HadaError(f"{path} says dataset {tag!r}, not 'synthetic'; use --dataset {tag or 'flickr30k'}")
    if name != "synthetic" and tag == "synthetic":
        raise HadaError(f"{path} is the synthetic dataset; use --dataset synthetic")
    return doc, hashlib.sha256(raw).hexdigest()


def _image_entries(doc: dict, spec: DatasetSpec):
    for i, entry in enumerate(doc["images"]):
        if not isinstance(entry, dict):
            raise HadaError(f"{spec.json_name}: image {i} is a {type(entry).__name__}, not an object")
        yield entry


def _need(entry: dict, key: str, kind: type, where: str):
    if key not in entry:
        raise HadaError(f"{where} lacks key {key!r}")
    value = entry[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise HadaError(f"{where}: {key!r} should be an integer, got {value!r}")
    if kind is not int and not isinstance(value, kind):
        raise HadaError(f"{where}: {key!r} should be a {kind.__name__}, got {type(value).__name__}")
    return value


def _record(i: int, entry: dict, root: Path, spec: DatasetSpec, name: str) -> ImageRecord:
    where = f"{spec.json_name}: image {i}"
    filename = _need(entry, "filename", str, where)
    where = f"{where} ({filename})"
    image_id = _need(entry, "imgid", int, where)
    raw_split = _need(entry, "split", str, where)
    split = dict(spec.split_aliases).get(raw_split, raw_split)
    if split not in spec.splits:
        allowed = ", ".join(spec.splits + tuple(a for a, _ in spec.split_aliases))
        raise HadaError(f"{where} has split {raw_split!r}; allowed for {name}: {allowed}")
    folder = root / spec.image_dir if spec.image_dir else root / _need(entry, "filepath", str, where)
    sentences = _need(entry, "sentences", list, where)
    if not sentences:
        raise HadaError(f"{where} has no captions")
    captions, caption_ids = [], []
    for j, sentence in enumerate(sentences):
        at = f"{where}, sentence {j}"
        if not isinstance(sentence, dict):
            raise HadaError(f"{at} is a {type(sentence).__name__}, not an object")
        captions.append(_need(sentence, "raw", str, at).strip())
        caption_ids.append(_need(sentence, "sentid", int, at))
    return ImageRecord(image_id, folder / filename, split, captions, caption_ids)


def _check_unique(records: list[ImageRecord]) -> None:
    first_image: dict[int, int] = {}
    for i, rec in enumerate(records):
        if rec.image_id in first_image:
            raise HadaError(f"duplicate image id {rec.image_id} (images {first_image[rec.image_id]} and {i})")
        first_image[rec.image_id] = i
    first_file: dict[Path, int] = {}
    for i, rec in enumerate(records):  # two ids on one file would count one picture twice in every recall
        if rec.path in first_file:
            raise HadaError(f"images {records[first_file[rec.path]].image_id} and {rec.image_id} share the file "
                            f"{rec.path}; give each image id its own file")
        first_file[rec.path] = i
    first_sentence: dict[int, int] = {}
    for i, rec in enumerate(records):
        for sid in rec.caption_ids:
            if sid in first_sentence:
                raise HadaError(f"duplicate sentence id {sid} (images {first_sentence[sid]} and {i})")
            first_sentence[sid] = i


def _check_files(records: list[ImageRecord]) -> None:
    """One directory listing per folder instead of one stat per image (COCO has 123k files)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for rec in records:
        folder = rec.path.parent
        if folder not in listings:
            try:
                listings[folder] = {e.name for e in os.scandir(folder) if not e.is_dir()}
            except OSError:
                listings[folder] = set()
        if rec.path.name not in listings[folder]:
            missing.append(rec.path)
    if missing:
        folders = Counter(p.parent for p in missing)
        where = ", ".join(f"{f}{'' if f.is_dir() else ' (folder missing)'}" for f in folders)
        names = ", ".join(p.name for p in missing[:_MAX_NAMED]) + (", ..." if len(missing) > _MAX_NAMED else "")
        raise HadaError(f"{len(missing)} of {len(records)} image files are missing under {where}: {names} "
                        "(`hada data check --no-images` skips this check)")
