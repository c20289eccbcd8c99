"""The token feature store: one contiguous fp16 array per (backbone, split, modality), memory-mapped.

Layout of ``features_dir()/<dataset>/<backbone>/<split>/`` (every array a ``.npy`` file, read with ``mmap``):

=======================  ==============  ==================================================================
``image_tokens``         fp16 [N, T, D]  all last-layer image tokens, CLS/pooled first
``image_embeds``         fp16 [N, E]     the backbone's own projected image embedding (not normalised)
``text_tokens``          fp16 [M, L, D]  pooled (EOT) token first, then the other valid tokens; zero-padded
                                         to L = the split's longest caption (not the context length)
``text_lengths``         int64 [M]       valid tokens per caption, including the pooled one
``text_embeds``          fp16 [M, E]     projected text embedding
``image_ids``            int64 [N]       dataset image ids, split order
``caption_ids``          int64 [M]       dataset caption ids, split order (image by image)
``caption_image_index``  int64 [M]       row (0..N-1) of each caption's image
``manifest.json``                        request (model, weights sha256, open_clip version, preprocessing,
                                         dataset json sha256, shapes, dtypes, the device and precision the
                                         rows are computed in) + per-array sizes and sha256
``progress-<rank>.json``                 rows done by each process, while an extraction is unfinished
=======================  ==============  ==================================================================

Why this shape. Extraction writes forward batches into preallocated memmaps and records the rows done after
they are flushed, so a killed run resumes where it stopped and ends byte-identical to an uninterrupted one: the
batch size is fixed when a store is started, and every row is computed in the same batch whatever the resuming
call's batch size or number of processes (:mod:`hada.features.progress`). Under torchrun the processes share
the rows of the same files; rank 0 writes the manifest. Images are decoded by a DataLoader's worker processes
and the backbone runs under autocast on CUDA; the stored tokens are fp16 on every device. A request whose manifest differs from the
stored one is an error naming the difference (``force=True`` rebuilds), never a silent reuse. A store is only
read once complete; its file sizes are checked on every open, and its content (sha256) once per process per file
(xxh3-128, again whenever the file's change time moved; sha256 with ``verify="full"``): a truncated store, or one whose
bytes changed after it was written even with its modification time restored, is refused, never used silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from hada import distributed
from hada.errors import HadaError
from hada.features import progress as rowlog
from hada.features.augment import backbone_policy
from hada.io import disk_full, ensure_space, folder_lock, main_lock, progress_enabled, write_json
from hada.paths import features_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = "float16"
INT_DTYPE = "int64"
IMAGE_BATCH = 128  # rows per forward pass on the CPU (and the sizes every store had before)
TEXT_BATCH = 512
CUDA_IMAGE_BATCH = 256
ARRAY_NAMES = ("image_tokens", "image_embeds", "text_tokens", "text_lengths", "text_embeds",
               "image_ids", "caption_ids", "caption_image_index")
# request keys that must agree for a store to be reused; paths and timings are informational only
COMPARED = ("format", "dataset", "dataset_json_sha256", "split", "n_images", "n_captions",
            "backbone.model", "backbone.weights_sha256", "backbone.open_clip_version", "backbone.image_size",
            "backbone.preprocess", "backbone.context_length", "backbone.quick_gelu", "arrays")


class _Stop(Exception):
    """Raised by the test hook that stops an extraction after n forward batches (simulates a kill)."""


def backbone_slug(spec: str) -> str:
    """A folder name for a backbone spec: embedded names stay; paths get a readable slug + short hash."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", spec):
        return spec
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[-48:]
    return f"{slug}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def store_dir(dataset: str, backbone: str, split: str, root: Path | None = None) -> Path:
    return Path(root or features_dir()) / dataset / backbone_slug(backbone) / split


# ------------------------------------------------------------------------------------------ reading
@dataclass
class FeatureSplit:
    """One complete store, memory-mapped read-only. Arrays are numpy memmaps (fp16 tokens, int64 indices)."""

    path: Path
    manifest: dict
    image_tokens: np.ndarray
    image_embeds: np.ndarray
    text_tokens: np.ndarray
    text_lengths: np.ndarray
    text_embeds: np.ndarray
    image_ids: np.ndarray
    caption_ids: np.ndarray
    caption_image_index: np.ndarray
    augmented: tuple | None = None  # (image tokens [V, N, T, D], image embeds [V, N, E]): --augment views
    augment_policy: str | None = None  # the policy the augmented views were made with (hada.features.augment)

    @property
    def n_images(self) -> int:
        return int(self.image_tokens.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.text_tokens.shape[0])

    def nbytes(self) -> dict[str, int]:
        return {n: int(getattr(self, n).nbytes) for n in ARRAY_NAMES}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


#: Files whose bytes this process has hashed and found as their manifest says, by identity: path, inode, size,
#: modification and change times. Writing a file changes its change time, which no user can set back (restoring
#: the modification time does not), so a file changed since it was verified is hashed again.
_VERIFIED: set = set()


def _xxh3(path: Path | None) -> str | None:
    """xxh3-128 of a file (about 9 GB/s against sha256's 1, benchmarks/bench_integrity.py): the check made on every
    open, against accidental change (sha256 stays the store's identity and ``verify="full"``'s check). With
    ``None``: whether xxhash is installed (torch-geometric needs it)."""
    try:
        import xxhash
    except ImportError:  # pragma: no cover - installed with torch-geometric
        return None
    if path is None:
        return "available"
    import mmap

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:  # hashed in place: no copy to a buffer
            return xxhash.xxh3_128(view).hexdigest()


def verify_store(path: Path, manifest: dict, full: bool = False) -> None:
    """Raise HadaError unless every array file has its recorded size and content: hashed once per process per file
    (xxh3-128 where the manifest has it, else sha256; measured by benchmarks/bench_integrity.py), never trusted
    from its timestamps; ``full`` checks the sha256 again even of a file this process has verified."""
    sums = manifest.get("checksums")
    if not manifest.get("complete") or not sums:
        raise HadaError(f"feature store {path} is unfinished; run `hada features extract` to complete it")
    for name in ARRAY_NAMES:
        f = path / f"{name}.npy"
        rec = sums[name]
        if not f.is_file():
            raise HadaError(f"feature store {path} is damaged: {f.name} is missing; {_REBUILD}")
        st = f.stat()
        if st.st_size != rec["bytes"]:
            raise HadaError(f"feature store {path} is damaged: {f.name} has {st.st_size} bytes, "
                            f"expected {rec['bytes']}; {_REBUILD}")
        seen = (str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, rec["sha256"])
        if full or seen not in _VERIFIED:
            algo = "xxh3_128" if rec.get("xxh3_128") and _xxh3(None) and not full else "sha256"
            if (_xxh3(f) if algo == "xxh3_128" else _sha256(f)) != rec[algo]:
                raise HadaError(f"feature store {path} is damaged: {f.name} does not hold the bytes it was written "
                                f"with ({algo} differs from the manifest); {_REBUILD}")
            _VERIFIED.add(seen)


_REBUILD = "rebuild it with `hada features extract ... --force`"


def content_id(manifest: dict) -> str:
    """sha256 of what a complete store holds: the compared request (model, weights sha256, preprocessing, dataset
    json sha256, shapes) and every array's sha256. No path, time or library version: a moved data folder keeps
    it, and caches derived from a store (runs, baselines, ranks) are keyed by it."""
    flat = _flatten(manifest)
    ident = {key: flat.get(key) for key in COMPARED}
    ident["sha256"] = {name: rec["sha256"] for name, rec in sorted((manifest.get("checksums") or {}).items())}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def open_features(dataset: str, backbone: str, split: str, root: Path | None = None,
                  verify: str = "auto", data_root: str | None = None) -> FeatureSplit:
    """Memory-map one complete store read-only; ``verify``: "auto" (sizes, sha256 if touched) or "full".
    ``data_root``: the dataset folder the caller was given, named in the hint when there are no features."""
    path = store_dir(dataset, backbone, split, root)
    manifest = _read_json(path / MANIFEST)
    if manifest is None:
        from hada.backbones.spec import check_spec_name

        check_spec_name(backbone)  # a typo is "unknown backbone", not "extract features for it"
        where = f" --data-root {data_root}" if data_root else ""
        raise HadaError(f"no features for {dataset}/{backbone}/{split} at {path}; run `hada features extract "
                        f"--dataset {dataset}{where} --backbones {backbone} --split {split}`")
    verify_store(path, manifest, full=(verify == "full"))
    arrays = {}
    for name in ARRAY_NAMES:
        arr = np.load(path / f"{name}.npy", mmap_mode="r")
        want = manifest["arrays"][name]
        if list(arr.shape) != want["shape"] or str(arr.dtype) != want["dtype"]:
            raise HadaError(f"feature store {path}: {name} has shape {list(arr.shape)} {arr.dtype}, "
                            f"manifest says {want['shape']} {want['dtype']}; rebuild with --force")
        arrays[name] = arr
    augmented = _open_augmented(path, manifest)
    policy = _augment_policy(path) if augmented is not None else None
    return FeatureSplit(path=path, manifest=manifest, augmented=augmented, augment_policy=policy, **arrays)




# ------------------------------------------------------------------------------------------ writing
def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in ("backbone",):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def manifest_differences(stored: dict, request: dict) -> list[str]:
    """Human-readable differences between a stored manifest and a request, on the compared keys only."""
    a, b = _flatten(stored), _flatten(request)
    diffs = []
    for key in COMPARED:
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: store has {_short(a.get(key))}, request has {_short(b.get(key))}")
    return diffs


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."


def default_batches(device) -> dict[str, int]:
    """Rows per forward pass when none is given: today's CPU sizes, larger images batches on a GPU."""
    cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda")
    return {"images": CUDA_IMAGE_BATCH if cuda else IMAGE_BATCH, "captions": TEXT_BATCH}


def build_request(backbone, dataset, split: str, text_length: int, image_tokens: tuple[int, int],
                  text_dim: int, embed_dim: int, batch: dict[str, int]) -> dict:
    """The manifest a store for (backbone, dataset, split) must have; computed before any extraction.
    ``batch`` (rows per forward pass) is recorded, not compared: a store started with one is resumed with it."""
    import torch

    records = dataset.split(split)
    n, m = len(records), sum(len(r.captions) for r in records)
    t, d = image_tokens
    arrays = {
        "image_tokens": {"shape": [n, t, d], "dtype": TOKEN_DTYPE},
        "image_embeds": {"shape": [n, embed_dim], "dtype": TOKEN_DTYPE},
        "text_tokens": {"shape": [m, text_length, text_dim], "dtype": TOKEN_DTYPE},
        "text_lengths": {"shape": [m], "dtype": INT_DTYPE},
        "text_embeds": {"shape": [m, embed_dim], "dtype": TOKEN_DTYPE},
        "image_ids": {"shape": [n], "dtype": INT_DTYPE},
        "caption_ids": {"shape": [m], "dtype": INT_DTYPE},
        "caption_image_index": {"shape": [m], "dtype": INT_DTYPE},
    }
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset.name,
        "dataset_root": str(dataset.root),
        "dataset_json_sha256": dataset.json_sha256,
        "split": split,
        "n_images": n,
        "n_captions": m,
        "backbone": backbone.describe(),
        "batch": dict(batch),
        "compute": compute_record(backbone),
        "arrays": arrays,
        "torch_version": torch.__version__,
        "complete": False,
    }


def compute_record(backbone) -> dict[str, str]:
    """Where and in which precision the rows are computed: the device type and the autocast dtype (float32 when
    there is none). Recorded, not compared: a complete store reads the same anywhere, but an unfinished one must
    be finished as it was started (:func:`check_resumable`)."""
    import torch

    cast = backbone.autocast()
    dtype = getattr(cast, "fast_dtype", None) if isinstance(cast, torch.autocast) else None
    return {"device": backbone.device.type, "dtype": str(dtype or torch.float32).replace("torch.", "")}


def check_resumable(path: Path, stored: dict, request: dict) -> None:
    """Refuse (one line) to resume an unfinished store on another device or precision than it was started with:
    its rows would mix float32 and bfloat16 numbers without anyone noticing. Stores started before the manifest
    recorded it are resumed as before."""
    was, now = stored.get("compute"), request.get("compute")
    if stored.get("complete") or was is None or was == now:
        return
    raise HadaError(f"feature store {path} was started on {was['device']} in {was['dtype']} and this call computes "
                    f"on {now['device']} in {now['dtype']}; finish it with --device {was['device']}, or rebuild "
                    "it with --force")


def _store_batch(manifest: dict) -> dict[str, int]:
    """Rows per forward pass a started store was (and so must be) computed with; stores started before progress
    was kept in rows call it "chunks"."""
    return dict(manifest.get("batch") or manifest["chunks"])


def _probe_shapes(backbone, records) -> tuple[tuple[int, int], int, int]:
    """Token counts/widths from a blank image and one caption (exact, whatever the tower; reads no file)."""
    from PIL import Image

    tb = backbone.encode_image_tokens([Image.new("RGB", backbone.image_size)])
    tt = backbone.encode_text_tokens(records[0].captions[:1])
    return (tb.tokens.shape[1], tb.tokens.shape[2]), tt.tokens.shape[2], tb.embeds.shape[1]


def _check_images(records, jobs: int, where: str, hide: bool) -> None:
    """Decode every image of the split (each process its share) and raise one line naming the bad ones."""
    from hada.data.images import undecodable, undecodable_error

    world = distributed.world_size()
    mine = rowlog.share(list(range(len(records))), distributed.rank(), world)
    threads = max(jobs, min(8, (os.cpu_count() or 1) // world))  # nothing else runs yet
    bad = undecodable([records[i].path for i in mine], jobs=threads, progress=not hide,
                      desc=f"{where} decode check")
    found = [b for part in distributed.all_gather_object([(str(p), r) for p, r in bad]) for b in part]
    if found:
        order = {str(r.path): i for i, r in enumerate(records)}
        found.sort(key=lambda b: order[b[0]])
        raise undecodable_error([(Path(p), r) for p, r in found], len(records), where)


def extract_split(
    backbone,
    dataset,
    split: str,
    spec: str | None = None,
    root: Path | None = None,
    *,
    force: bool = False,
    image_batch: int | None = None,
    text_batch: int | None = None,
    jobs: int | None = None,
    progress: bool = True,
    checkpoint_seconds: float = 2.0,
    _stop_after_batches: int | None = None,
) -> FeatureSplit:
    """Extract (or resume, or reuse) one store on the backbone's device; returns it opened read-only.

    Under torchrun every process calls this with the same arguments: each computes its share of the rows into
    the same files, rank 0 writes the manifest. ``jobs``: image decoding worker processes (0 = in this one).
    """
    spec = spec or backbone.name
    path = store_dir(dataset.name, spec, split, root)
    with main_lock(path, f"the feature store {dataset.name}/{spec}/{split}"):  # a second one waits, then reuses
        return _extract_split(backbone, dataset, split, spec, root, path, force, image_batch, text_batch, jobs,
                              progress, checkpoint_seconds, _stop_after_batches)


def _extract_split(backbone, dataset, split, spec, root, path, force, image_batch, text_batch, jobs, progress,
                   checkpoint_seconds, _stop_after_batches) -> FeatureSplit:
    """:func:`extract_split` while holding the store's lock."""
    import torch

    records = dataset.split(split)
    if not records:
        raise HadaError(f"split '{split}' of {dataset.name} at {dataset.root} has no images")
    captions = [c for r in records for c in r.captions]
    lengths_all = torch.cat([backbone.text_lengths(captions[s:s + 4096]) for s in range(0, len(captions), 4096)])
    batch = default_batches(backbone.device)
    batch.update({k: v for k, v in (("images", image_batch), ("captions", text_batch)) if v})
    request = build_request(backbone, dataset, split, int(lengths_all.max()), *_probe_shapes(backbone, records),
                            batch)
    stored = _read_json(path / MANIFEST)
    if stored is not None and not force:
        diffs = manifest_differences(stored, request)
        if diffs:
            raise HadaError(f"feature store {path} was built for a different request ({'; '.join(diffs)}); "
                            "rerun with --force to rebuild it")
        if stored.get("complete"):
            return open_features(dataset.name, spec, split, root)
        check_resumable(path, stored, request)
    hide = not progress_enabled(progress) or not distributed.is_main()
    jobs = default_jobs(backbone.device) if jobs is None else jobs
    _check_images(records, jobs, f"{dataset.name} {split}", hide)
    distributed.barrier()  # every process has read the old manifest before rank 0 replaces it
    if distributed.is_main():
        _prepare(path, request, records, lengths_all.numpy(), force=force, resume=stored is not None)
    distributed.barrier()
    request["batch"] = _store_batch(_read_json(path / MANIFEST))
    writer = _StoreWriter(path, request, checkpoint_seconds, _stop_after_batches)
    plan = writer.plan({"images": len(records), "captions": len(captions)})
    distributed.barrier()  # every rank has its shares of both phases before any rank records progress
    with torch.no_grad():
        timing = _extract_images(backbone, records, writer, plan["images"], jobs, f"{spec} {split} images", hide)
        timing.update(_extract_captions(backbone, captions, writer, plan["captions"], int(lengths_all.max()),
                                        spec, f"{spec} {split} captions", hide))
    writer.close()
    distributed.barrier()
    check_covered(path, request)  # on every rank, so that none waits below for a rank 0 that refused
    distributed.barrier()  # ... and before rank 0's _finish removes the progress files they read
    if distributed.is_main():
        _finish(path, request, dict(timing, processes=distributed.world_size()))
    distributed.barrier()
    return open_features(dataset.name, spec, split, root)


def default_jobs(device) -> int:
    """Image decoding workers when none is given: in-process on the CPU (the model is the cost there), up to 8
    worker processes on a GPU (JPEG decoding is the cost there)."""
    if getattr(device, "type", str(device)) != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // max(1, distributed.world_size()) - 1))


def _prepare(path: Path, request: dict, records, lengths: np.ndarray, force: bool, resume: bool) -> None:
    """Rank 0: keep an unfinished store whose arrays are intact (``resume``), else create its arrays afresh
    with the ids and caption lengths filled in, and write its (unfinished) manifest."""
    if force and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = request["arrays"]
    if resume and any(path.glob("progress*.json")) and _open_partial(path, arrays) is not None:
        return
    rowlog.clear(path)
    ensure_space(path, store_bytes(arrays) - sum(_size(path / f"{n}.npy") for n in ARRAY_NAMES),
                 f"the feature store {path.relative_to(path.parents[2])}")
    write_json(path / MANIFEST, request, indent=1)
    mms = {name: np.lib.format.open_memmap(path / f"{name}.npy", mode="w+", dtype=arrays[name]["dtype"],
                                           shape=tuple(arrays[name]["shape"])) for name in ARRAY_NAMES}
    for name in ARRAY_NAMES:
        reserve(path / f"{name}.npy")
    mms["image_ids"][:] = [r.image_id for r in records]
    mms["caption_ids"][:] = [c for r in records for c in r.caption_ids]
    mms["caption_image_index"][:] = np.repeat(np.arange(len(records)), [len(r.captions) for r in records])
    mms["text_lengths"][:] = lengths
    for mm in mms.values():
        mm.flush()
    rowlog.RankProgress(path, 0).save()


def store_bytes(arrays: dict) -> int:
    """Bytes of a store's arrays from its manifest's shapes and dtypes (headers aside): known before extraction."""
    return sum(int(np.prod(a["shape"])) * np.dtype(a["dtype"]).itemsize for a in arrays.values())


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def reserve(path: Path) -> None:
    """Allocate every block of a freshly created (sparse) array file now: a memory-mapped write to a full disk ends
    in SIGBUS with no message, an allocation that does not fit is one line here."""
    size = _size(path)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            path.unlink(missing_ok=True)
            raise disk_full(path, size) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without fallocate: written as before
            raise


class _StoreWriter:
    """An unfinished store's arrays (writable memmaps, shared by every process) and the rows this process wrote.

    Progress is recorded only after the arrays are flushed, so a killed run resumes where it stopped and ends
    byte-identical to an uninterrupted one."""

    def __init__(self, path: Path, request: dict, checkpoint_seconds: float, stop_after_batches):
        self.path, self.batch, self.mms = path, request["batch"], _open_partial(path, request["arrays"])
        if self.mms is None:  # pragma: no cover - rank 0 has just made them
            raise HadaError(f"feature store {path}: arrays missing after preparation; rerun with --force")
        self.prog = rowlog.RankProgress(path, distributed.rank())
        self.checkpoint_seconds, self.budget = checkpoint_seconds, stop_after_batches
        self.last = time.perf_counter()

    def todo(self, modality: str, n: int) -> tuple[list[tuple[int, int]], int]:
        """This process's forward batches of ``modality`` not done yet, and the rows done before (by anyone).
        Read from the progress files as they are now: every rank must read them before any rank writes one
        (:meth:`plan` then a barrier), or the ranks' shares overlap and leave rows nobody computes."""
        done = rowlog.rows_done(self.path, self.batch)[modality]
        left = rowlog.batches(rowlog.missing(done, n), self.batch[modality])
        mine = rowlog.share(left, distributed.rank(), distributed.world_size())
        return mine, n - sum(e - s for s, e in left)

    def plan(self, sizes: dict[str, int]) -> dict[str, tuple[list[tuple[int, int]], int]]:
        """:meth:`todo` of every modality at once, before any work: the shares of the caption phase no longer
        depend on how far the other ranks got with their images."""
        return {modality: self.todo(modality, n) for modality, n in sizes.items()}

    def save(self) -> None:
        for mm in self.mms.values():
            mm.flush()
        self.prog.save()
        self.last = time.perf_counter()

    def write_rows(self, modality: str, start: int, batch) -> None:
        """Rows from ``start`` of ``modality`` ("image" / "text"): a TokenBatch's tokens and embeddings as fp16.
        Every ``checkpoint_seconds``, flush the arrays and then record the rows done, so a kill loses at most
        that much work (a flush per batch would cost ~10% of the throughput)."""
        import torch

        for part in ("tokens", "embeds"):
            rows = getattr(batch, part).to(torch.float16).cpu().numpy()
            self.mms[f"{modality}_{part}"][start:start + len(rows)] = rows
        self.prog.add("images" if modality == "image" else "captions", start, start + len(rows))
        if time.perf_counter() - self.last >= self.checkpoint_seconds:
            self.save()
        if self.budget is not None:  # test hook: simulate a kill after n forward batches
            self.budget -= 1
            if self.budget <= 0:
                raise _Stop()

    def close(self) -> None:
        self.save()
        self.mms = None


def _bar(total: int, initial: int, unit: str, desc: str, hide: bool):
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    return tqdm(total=total, initial=min(total, initial), unit=unit, desc=desc, disable=hide, dynamic_ncols=True)


class _ImageFiles:
    """A map-style dataset for torch's DataLoader: row i -> the model's input tensor for image i. Holds only
    paths and the transform, so worker processes receive it cheaply."""

    def __init__(self, paths: list[Path], transform, grayscale: bool):
        self.paths, self.transform, self.grayscale = paths, transform, grayscale

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from hada.backbones.backbone import preprocess_image
        from hada.data.images import open_rgb

        try:
            image = open_rgb(self.paths[i])
        except (OSError, ValueError) as exc:  # checked before extraction; changed since
            raise HadaError(f"cannot decode {self.paths[i]}: {str(exc).splitlines()[0]}") from None
        return preprocess_image(image, self.transform, self.grayscale)


def _image_loader(backbone, records, batches: list[tuple[int, int]], jobs: int):
    """Batches of model inputs in the order of ``batches``, decoded by ``jobs`` worker processes, in pinned
    memory when the backbone is on CUDA (so the copy to the device does not block)."""
    from torch.utils.data import DataLoader

    files = _ImageFiles([r.path for r in records], backbone.transform, backbone.grayscale)
    extra = {"prefetch_factor": 2, "persistent_workers": False} if jobs > 0 else {}
    return DataLoader(files, batch_sampler=[list(range(s, e)) for s, e in batches], num_workers=jobs,
                      pin_memory=backbone.device.type == "cuda", **extra)


def _extract_images(backbone, records, writer: _StoreWriter, planned, jobs: int, desc: str, hide: bool) -> dict:
    """This process's image batches not done yet (``planned``: from :meth:`_StoreWriter.plan`), read by a
    DataLoader while the model runs on the device."""
    todo, before = planned
    bar = _bar(before + sum(e - s for s, e in todo), before, "img", desc, hide)
    t0, done = time.perf_counter(), 0
    for (s, e), pixels in zip(todo, _image_loader(backbone, records, todo, jobs)):
        pixels = pixels.to(backbone.device, non_blocking=True)
        with backbone.autocast():
            writer.write_rows("image", s, backbone.encode_image_tokens(pixels))
        done += e - s
        bar.update(e - s)
        bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.0f}")
    bar.close()
    writer.save()
    return {"image_seconds": round(time.perf_counter() - t0, 3), "images": done}


def _extract_captions(backbone, captions: list[str], writer: _StoreWriter, planned, text_length: int, spec: str,
                      desc: str, hide: bool) -> dict:
    """This process's caption batches not done yet (``planned``), padded to the split's longest caption."""
    todo, before = planned
    bar = _bar(before + sum(e - s for s, e in todo), before, "cap", desc, hide)
    t0, done = time.perf_counter(), 0
    for s, e in todo:
        with backbone.autocast():
            tt = backbone.encode_text_tokens(captions[s:e], max_length=text_length)
        if not np.array_equal(tt.lengths.cpu().numpy(), writer.mms["text_lengths"][s:e]):
            raise HadaError(f"{spec}: token lengths changed between sizing and extraction")  # pragma: no cover
        writer.write_rows("text", s, tt)
        done += e - s
        bar.update(e - s)
        bar.set_postfix(cap_s=f"{done / (time.perf_counter() - t0):.0f}")
    bar.close()
    return {"caption_seconds": round(time.perf_counter() - t0, 3), "captions": done}


def _open_partial(path: Path, arrays: dict) -> dict | None:
    """The unfinished arrays opened for writing, or None if any is missing or not the expected shape."""
    mms = {}
    for name in ARRAY_NAMES:
        try:
            mm = np.lib.format.open_memmap(path / f"{name}.npy", mode="r+")
        except (OSError, ValueError):
            return None
        if list(mm.shape) != arrays[name]["shape"] or str(mm.dtype) != arrays[name]["dtype"]:
            return None
        mms[name] = mm
    return mms


def check_covered(path: Path, request: dict) -> None:
    """Raise one line unless the progress files record every row of both modalities as written: a store with
    a hole would be marked complete and trusted by every later run."""
    done = rowlog.rows_done(path, _store_batch(request))
    sizes = {"images": request["n_images"], "captions": request["n_captions"]}
    gaps = {m: g for m, n in sizes.items() if (g := rowlog.missing(done[m], n))}
    if gaps:
        where = "; ".join(f"{m} rows {', '.join(f'{s}-{e - 1}' for s, e in g[:3])}" for m, g in gaps.items())
        raise HadaError(f"feature store {path} is not complete ({where} were never written); rerun "
                        "`hada features extract` to resume it")


def _finish(path: Path, request: dict, timing: dict | None = None) -> None:
    """Record sizes, sha256 and mtimes of every array, mark complete, drop the progress files; a store whose
    rows are not all written is refused (:func:`check_covered`)."""
    check_covered(path, request)
    sums = {}
    for name in ARRAY_NAMES:
        f = path / f"{name}.npy"
        st = f.stat()
        sums[name] = {"bytes": st.st_size, "sha256": _sha256(f), "mtime_ns": st.st_mtime_ns}
        if _xxh3(None):
            sums[name]["xxh3_128"] = _xxh3(f)
        _VERIFIED.add((str(f.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sums[name]["sha256"]))
    manifest = dict(request, complete=True, checksums=sums)
    if timing:  # the last (or only) run's share; informational
        manifest["timing"] = timing
    write_json(path / MANIFEST, manifest, indent=1)
    rowlog.clear(path)


# ------------------------------------------------------------------------------------------ many stores
def ensure_features(
    dataset,
    backbones: Iterable[str],
    splits: Iterable[str],
    data_root: Path | None = None,
    *,
    root: Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "auto",
    jobs: int | None = None,
    image_batch: int | None = None,
    text_batch: int | None = None,
    augment: int = 0,
    augment_policy: str = "randaugment",
) -> dict[str, dict[str, FeatureSplit]]:
    """Extract whatever is missing (resuming unfinished stores) and return ``{backbone: {split: FeatureSplit}}``.

    ``dataset`` is a name ("synthetic", "flickr30k", "coco") or a loaded :class:`hada.data.datasets.Dataset`;
    ``data_root`` its folder (default: the dataset's folder under ``data/``). ``device``: see
    :func:`hada.devices.resolve_device`. Under torchrun every process calls this and shares the work.
    ``augment``: also store that many augmented views of every train image, made with ``augment_policy``
    (:func:`extract_augmented`; a run's policy such as ``lavis`` gives the first backbone and the others their own).
    """
    from hada.backbones import load_backbone
    from hada.data.datasets import load_dataset
    from hada.devices import resolve_device

    ds = load_dataset(dataset, data_root) if isinstance(dataset, str) else dataset
    dev = resolve_device(device)
    splits = list(splits)
    out: dict[str, dict[str, FeatureSplit]] = {}
    with distributed.session(dev):
        for index, spec in enumerate(backbones):
            backbone = load_backbone(spec, device=str(dev))
            out[spec] = {}
            for split in splits:
                fs = None if force else _complete_store(backbone, ds, spec, split, root)
                out[spec][split] = fs or extract_split(
                    backbone, ds, split, spec, root, force=force, progress=progress, jobs=jobs,
                    image_batch=image_batch, text_batch=text_batch)
                if augment and split == "train":  # every rank: the views are shared among them
                    lock = folder_lock(out[spec][split].path / AUGMENT_DIR, "augmented views") \
                        if distributed.is_main() else nullcontext()
                    with lock:
                        out[spec][split] = extract_augmented(backbone, ds, split, augment, spec, root,
                                                             jobs=jobs or 0, progress=progress,
                                                             policy=backbone_policy(augment_policy, index))
    return out


def _complete_store(backbone, dataset, spec: str, split: str, root: Path | None) -> FeatureSplit | None:
    """The complete store if there is one that matches (checked without an image forward), else None."""
    try:
        fs = open_features(dataset.name, spec, split, root)
    except HadaError:
        return None  # missing, unfinished or damaged: extract_split resumes or says why
    _check_matches(backbone, dataset, split, fs)
    return fs


def _check_matches(backbone, dataset, split: str, fs: FeatureSplit) -> None:
    """A cheap request check for a complete store (no image forward): backbone + dataset keys only."""
    request = {"format": FORMAT_VERSION, "dataset": dataset.name, "dataset_json_sha256": dataset.json_sha256,
               "split": split, "backbone": backbone.describe()}
    records = dataset.split(split)
    request["n_images"] = len(records)
    request["n_captions"] = sum(len(r.captions) for r in records)
    stored = fs.manifest
    diffs = [d for d in manifest_differences(stored, {**stored, **request})]
    if diffs:
        raise HadaError(f"feature store {fs.path} was built for a different request ({'; '.join(diffs)}); "
                        "rerun `hada features extract` with --force to rebuild it")


# ------------------------------------------------------------------------------------------ size projection
FULL_SPLIT_IMAGES = {"flickr30k": 31_014, "coco": 123_287}  # Karpathy train + val + test (COCO incl. restval)


def store_shapes(spec: str) -> dict:
    """Image tokens (T, D), text width, context length and embedding width of a backbone, from its config.

    No weights are needed: ViT and ModifiedResNet shapes follow from the open_clip config; other towers are
    probed with one forward pass of a randomly initialised model.
    """
    from hada.backbones.spec import EMBEDDED_BACKBONES, load_recipes, register_model_configs
    import open_clip

    register_model_configs()
    model = load_recipes()[spec]["model"] if spec in EMBEDDED_BACKBONES else spec.split(":", 1)[0]
    cfg = open_clip.get_model_config(model.replace("/", "-"))
    if cfg is None:
        raise HadaError(f"unknown open_clip model '{model}'")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    size = v.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    if "timm_model_name" in v or "hf_model_name" in t:
        from hada.backbones import load_backbone

        bb = load_backbone(f"{model}:random")
        from PIL import Image

        tb = bb.encode_image_tokens([Image.new("RGB", bb.image_size)])
        tt = bb.encode_text_tokens(["a"])
        return {"image_tokens": tuple(tb.tokens.shape[1:]), "text_dim": tt.tokens.shape[2],
                "context_length": bb.context_length, "embed_dim": tb.embeds.shape[1]}
    if isinstance(v["layers"], (list, tuple)):  # ModifiedResNet: stride 32, 32x the stem width
        tokens = (1 + (size // 32) ** 2, v.get("width", 64) * 32)
    else:
        tokens = (1 + (size // v["patch_size"]) ** 2, v["width"])
    return {"image_tokens": tokens, "text_dim": t.get("width", 512), "context_length": t.get("context_length", 77),
            "embed_dim": cfg["embed_dim"]}


@dataclass(frozen=True)
class StoreSize:
    """The projected size of a feature store: one row per backbone (``name``, ``image_tokens``, ``text_tokens``,
    ``image_gb``, ``caption_gb``, ``total_gb``; GB = 1e9 bytes), a ``total`` row with several backbones. Plain
    data: ``hada.book.store_size_table`` shows it."""

    dataset: str
    n_images: int
    n_captions: int
    rows: list


def projected_store_size(dataset: str = "flickr30k", backbones=("ViT-B-16",), n_images: int | None = None,
                         captions_per_image: int = 5, text_length: int | None = None) -> StoreSize:
    """Disk size of the feature store for a dataset (all Karpathy splits) and backbones, in this layout.

    Text is padded to the split's longest caption; on Flickr30k/COCO that reaches the context length, which
    is the default ``text_length``.
    """
    n_img = n_images or FULL_SPLIT_IMAGES.get(dataset)
    if n_img is None:
        raise HadaError(f"give n_images for dataset '{dataset}'")
    n_cap = n_img * captions_per_image
    rows = []
    for spec in backbones:
        s = store_shapes(spec)
        (t, d), e = s["image_tokens"], s["embed_dim"]
        L = text_length or s["context_length"]
        per_img = t * d * 2 + e * 2 + 8
        per_cap = L * s["text_dim"] * 2 + e * 2 + 3 * 8
        rows.append({"name": spec, "image_tokens": f"{t} x {d}", "text_tokens": f"{L} x {s['text_dim']}",
                     "image_gb": n_img * per_img / 1e9, "caption_gb": n_cap * per_cap / 1e9,
                     "total_gb": (n_img * per_img + n_cap * per_cap) / 1e9})
    if len(rows) > 1:
        rows.append({"name": "total", **{k: sum(r[k] for r in rows) for k in ("image_gb", "caption_gb", "total_gb")}})
    return StoreSize(dataset, n_img, n_cap, rows)


# ------------------------------------------------------------------------------------ augmented views
AUGMENT_DIR = "augment"  # beside the plain view: <store>/augment/{image_tokens,image_embeds}.npy + manifest
AUGMENT_SEED = 0


def _augment_policy(path: Path) -> str:
    """The policy of a store's augmented views (views made before policies existed: ``"randaugment"``)."""
    return (_read_json(path / AUGMENT_DIR / MANIFEST) or {}).get("policy", "randaugment")


def _open_augmented(path: Path, manifest: dict) -> tuple | None:
    """The complete augmented views of a store made from its current arrays, memory-mapped, else None."""
    aug = _read_json(path / AUGMENT_DIR / MANIFEST)
    if not aug or not aug.get("complete") or aug.get("store_sha256") != manifest["checksums"]["image_tokens"]["sha256"]:
        return None
    return tuple(np.load(path / AUGMENT_DIR / f"{n}.npy", mmap_mode="r") for n in ("image_tokens", "image_embeds"))


class _AugmentedFiles(_ImageFiles):
    """Image i's view v: the augmentation ``policy`` (:mod:`hada.features.augment`) under a seed of (v, i), then
    the model's transform, so a view is the same whatever the batch or the worker that decodes it."""

    def __init__(self, paths, transform, grayscale: bool, view: int, policy: str = "randaugment", size: int = 224):
        super().__init__(paths, transform, grayscale)
        self.view, self.policy, self.size = view, policy, size

    def __getitem__(self, i: int):
        import torch

        from hada.backbones.backbone import preprocess_image
        from hada.data.images import open_rgb
        from hada.features.augment import policy_transform

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(AUGMENT_SEED + self.view * len(self.paths) + i)
            image = policy_transform(self.policy, self.size)(open_rgb(self.paths[i]))
        return preprocess_image(image, self.transform, self.grayscale)


def extract_augmented(backbone, dataset, split: str, views: int, spec: str | None = None,
                      root: Path | None = None, *, jobs: int = 0, progress: bool = True,
                      policy: str = "randaugment") -> FeatureSplit:
    """Store ``views`` augmented views of every image of a complete store (``hada features extract --augment
    N``), made with ``policy`` (:mod:`hada.features.augment`): the published recipe trains 75% of its samples on
    one of them. Written in one pass (not resumable; a rerun redoes it); a complete set with the same count and
    policy is reused.

    Under torchrun every rank calls this and computes a share of the (view, image batch) pairs into the same
    arrays (rank 0 makes them and writes the manifest), so no rank waits in a collective while another
    augments the whole split alone (a 29k-image split took longer than NCCL's 10-minute timeout). A view's
    pixels depend only on (view, image) and the batches are the one-process batches, so the bytes are those
    of one process."""
    import torch
    from torch.utils.data import DataLoader

    from hada.features.augment import POLICIES, input_size

    if policy not in POLICIES:
        raise HadaError(f"augmentation policy must be one of {', '.join(POLICIES)}; got {policy!r}")

    spec = spec or backbone.name
    fs = open_features(dataset.name, spec, split, root)
    out = fs.path / AUGMENT_DIR
    made = _read_json(out / MANIFEST) or {}
    # rank 0's decision on every rank (it read the files under the folder's lock)
    done = fs.augmented is not None and made.get("views") == views and fs.augment_policy == policy
    if distributed.broadcast_object(done):
        return fs if done else open_features(dataset.name, spec, split, root)
    n, step = fs.n_images, _store_batch(fs.manifest)["images"]
    tokens_shape, embeds_shape = (views,) + fs.image_tokens.shape, (views,) + fs.image_embeds.shape
    distributed.barrier()  # every rank has read the files before rank 0 replaces them
    if distributed.is_main():
        out.mkdir(exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        ensure_space(out, views * (fs.image_tokens.nbytes + fs.image_embeds.nbytes) - _size(out / "image_tokens.npy")
                     - _size(out / "image_embeds.npy"), f"{views} augmented views")
        for name, shape in (("image_tokens.npy", tokens_shape), ("image_embeds.npy", embeds_shape)):
            np.lib.format.open_memmap(out / name, "w+", TOKEN_DTYPE, shape).flush()
            reserve(out / name)
    distributed.barrier()  # the arrays exist at their full size before any rank opens them
    tokens = np.lib.format.open_memmap(out / "image_tokens.npy", "r+")
    embeds = np.lib.format.open_memmap(out / "image_embeds.npy", "r+")
    if tokens.shape != tokens_shape or embeds.shape != embeds_shape:  # pragma: no cover - rank 0 just made them
        raise HadaError(f"{out}: augmented arrays of shapes {tokens.shape}, {embeds.shape}; expected "
                        f"{tokens_shape}, {embeds_shape}")
    records = dataset.split(split)
    # this rank's (view, first image) batches: every world_size-th of them, in view-major order
    pairs = [(v, s) for v in range(views) for s in range(0, n, step)]
    mine = pairs[distributed.rank()::distributed.world_size()]
    hide = not progress_enabled(progress) or not distributed.is_main()
    bar = _bar(sum(min(n, s + step) - s for _, s in mine), 0, "img", f"{spec} {split} augmented views", hide)
    for v in range(views):
        starts = [s for w, s in mine if w == v]
        if not starts:
            continue
        files = _AugmentedFiles([r.path for r in records], backbone.transform, backbone.grayscale, v, policy,
                                input_size(backbone.preprocess_cfg))
        loader = DataLoader(files, batch_sampler=[list(range(s, min(n, s + step))) for s in starts],
                            num_workers=jobs)
        for s, pixels in zip(starts, loader):
            with torch.no_grad(), backbone.autocast():
                enc = backbone.encode_image_tokens(pixels.to(backbone.device))
            tokens[v, s:s + len(pixels)] = enc.tokens.to(torch.float16).cpu().numpy()
            embeds[v, s:s + len(pixels)] = enc.embeds.to(torch.float16).cpu().numpy()
            bar.update(len(pixels))
    bar.close()
    tokens.flush()
    embeds.flush()
    del tokens, embeds
    distributed.barrier()  # every rank's share is on disk before rank 0 calls the views complete
    if distributed.is_main():
        write_json(out / MANIFEST, {"views": views, "seed": AUGMENT_SEED, "policy": policy,
                                    "store_sha256": fs.manifest["checksums"]["image_tokens"]["sha256"],
                                    "complete": True}, indent=1)
    distributed.barrier()
    return open_features(dataset.name, spec, split, root)
