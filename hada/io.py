"""Writes that never leave a half-written file, and the one switch for progress bars.

Every file the pipeline caches (json records, checkpoints, manifests, whole folders) is written beside its
final name and renamed into place, so an interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path

from hada.errors import HadaError


def temp_path(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses: two identical commands started
    together must never rename each other's half-written files."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as utf-8) to a unique temporary file, then rename it over ``path``; makes the parent
    folder. A failed write leaves no temporary file, and a full disk is one line (:func:`disk_full`)."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(data) > free_bytes(path.parent):  # checked first: a checkpoint is known in full before it is written
        raise disk_full(path, len(data))
    tmp = temp_path(path)
    try:
        _write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, len(data)) from None
        raise
    return path


def _write_file(path: Path, data) -> None:
    """The one place bytes reach a cached file (tests inject a full disk here)."""
    with open(path, "wb") as f:
        f.write(data)


def disk_full(path: str | os.PathLike, needed: int) -> HadaError:
    """The one line for a write that found no space: how much it needs, how much is free, and where."""
    folder = Path(path).parent
    free = free_bytes(folder)
    return HadaError(f"no space left on the disk of {folder}: writing {Path(path).name} needs {human_bytes(needed)}"
                     f", {human_bytes(free)} is free; free some space (or set HADA_DATA to a larger disk) and rerun: "
                     "finished work is kept")


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes free to this user on the filesystem of ``folder`` (its nearest existing parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def ensure_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """One line before a large write (a store's arrays, a checkpoint) when its filesystem cannot hold it:
    memory-mapped writes on a full disk end in SIGBUS, with no message at all."""
    free = free_bytes(folder)
    if needed > free:
        raise HadaError(f"not enough disk space for {what} in {folder}: it needs {human_bytes(needed)}, "
                        f"{human_bytes(free)} is free; free some space (or set HADA_DATA to a larger disk) and rerun")


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def read_json(path: str | os.PathLike, hint: str):
    """The json in ``path``, or one HadaError line saying the file is damaged and ``hint`` (what to do)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HadaError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); {hint}") \
            from None


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    """``obj`` as indented json with a final newline, written atomically."""
    return write_bytes(path, json.dumps(obj, indent=indent) + "\n")


def torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to memory, then :func:`write_bytes`: a checkpoint is never half written, two processes never
    share a temporary file, and a full disk is one line that leaves nothing behind (torch's own writer raises a
    RuntimeError that names no cause)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer())


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Swap the finished folder ``tmp`` in as ``final``; an old ``final`` is moved aside first, removed last."""
    tmp, final = Path(tmp), Path(final)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str, log=None):
    """Hold an exclusive lock beside ``folder`` (``.<name>.lock``, kept: removing a lock file races) while a
    command writes it: a second identical command waits, then finds the first one's result and reuses it.
    ``log`` gets one line when it has to wait. The lock goes with the process, even after ``kill -9``."""
    import fcntl
    import sys

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (log or (lambda line: print(line, file=sys.stderr)))(
                f"waiting for another process that is writing {what} ({folder.name})")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main_lock(folder: str | os.PathLike, what: str, log=None):
    """:func:`folder_lock` in the process that writes (rank 0 under torchrun; the others wait at its barriers)."""
    from hada import distributed

    return folder_lock(folder, what, log) if distributed.is_main() else nullcontext()


def progress_enabled(progress: bool | None = True) -> bool:
    """Whether to draw progress bars: never when the caller says ``False``, nor when ``HADA_NO_PROGRESS``
    is set to anything but 0 (the tests and the book build set it to keep logs short)."""
    return progress is not False and os.environ.get("HADA_NO_PROGRESS", "") in ("", "0")
