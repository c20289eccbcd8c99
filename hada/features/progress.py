"""Which rows of an unfinished store are done, and which forward batches are left for this process.

Progress is kept in rows (merged ``[start, end)`` intervals per modality), one file per writing process
(``progress-<rank>.json``), so that any number of processes can resume what any other number left. Forward
batches are cut at multiples of the store's batch size counted from row 0, whatever was done before and
however the rows are shared among processes: every row is always computed in the same batch, which is what
makes a resumed or a sharded store byte-identical to one uninterrupted process (a model's numbers depend on
the batch a row is computed in, so the batch size is fixed when a store is started).
"""

from __future__ import annotations

import json
from pathlib import Path

from hada.io import write_json

MODALITIES = ("images", "captions")
LEGACY = "progress.json"  # before rows: {"image_chunks": k, "caption_chunks": j}, chunks of the store's batch


def merge(intervals) -> list[list[int]]:
    """Sorted, non-overlapping ``[start, end)`` intervals covering the same rows."""
    out: list[list[int]] = []
    for s, e in sorted(map(tuple, intervals)):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def missing(done, n: int) -> list[tuple[int, int]]:
    """The rows of ``[0, n)`` not in ``done``, as intervals."""
    out, at = [], 0
    for s, e in merge(done):
        if s > at:
            out.append((at, min(s, n)))
        at = max(at, e)
    if at < n:
        out.append((at, n))
    return [(s, e) for s, e in out if e > s]


def batches(todo, batch: int) -> list[tuple[int, int]]:
    """The rows of ``todo`` cut at every multiple of ``batch``: pieces of the batches of an uninterrupted run."""
    out = []
    for s, e in todo:
        while s < e:
            stop = min(e, (s // batch + 1) * batch)
            out.append((s, stop))
            s = stop
    return out


def share(items: list, rank: int, world: int) -> list:
    """Process ``rank``'s contiguous share of ``items`` (sizes differ by at most one)."""
    q, r = divmod(len(items), world)
    start = rank * q + min(rank, r)
    return items[start:start + q + (rank < r)]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def rows_done(folder: Path, batch: dict) -> dict[str, list[list[int]]]:
    """``{"images": intervals, "captions": intervals}`` done according to every progress file in ``folder``;
    ``batch`` (the store's ``{"images": b, "captions": b}``) reads a progress file written in chunks."""
    done: dict[str, list] = {m: [] for m in MODALITIES}
    for f in sorted(folder.glob("progress*.json")):
        doc = _read(f)
        if f.name == LEGACY:
            doc = {m: [[0, doc.get(f"{m[:-1]}_chunks", 0) * batch[m]]] for m in MODALITIES}
        for m in MODALITIES:
            done[m] += doc.get(m, [])
    return {m: merge(v) for m, v in done.items()}


def clear(folder: Path) -> None:
    """Remove every progress file (the store is complete, or started afresh)."""
    for f in folder.glob("progress*.json"):
        f.unlink(missing_ok=True)


class RankProgress:
    """The rows one process has written, saved to its own file (which keeps what the same rank did before)."""

    def __init__(self, folder: Path, rank: int):
        self.file = folder / f"progress-{rank}.json"
        old = _read(self.file)
        self.rows = {m: merge(old.get(m, [])) for m in MODALITIES}

    def add(self, modality: str, start: int, stop: int) -> None:
        self.rows[modality] = merge(self.rows[modality] + [[start, stop]])

    def save(self) -> None:
        write_json(self.file, self.rows, indent=1)
