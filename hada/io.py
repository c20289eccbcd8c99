"""Writes that never leave a half-written file, and the one switch for progress bars.

Every file the pipeline caches (json records, checkpoints, manifests, whole folders) is written beside its
final name and renamed into place, so an interrupted run leaves either the old file or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hada.errors import HadaError


def write_bytes(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as utf-8) to ``path.tmp``, then rename it over ``path``; makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


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
    """``torch.save`` to ``path.tmp``, then rename: a checkpoint is never half written."""
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


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


def progress_enabled(progress: bool | None = True) -> bool:
    """Whether to draw progress bars: never when the caller says ``False``, nor when ``HADA_NO_PROGRESS``
    is set to anything but 0 (the tests and the book build set it to keep logs short)."""
    return progress is not False and os.environ.get("HADA_NO_PROGRESS", "") in ("", "0")
