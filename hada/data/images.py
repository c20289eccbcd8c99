"""Decoding a dataset's image files, and finding the ones that cannot be decoded before any work depends on them.

A truncated JPEG or a file that is not an image would otherwise stop feature extraction deep inside a worker
with a traceback that names no file. :func:`check_decodable` decodes every file first (JPEGs at 1/8 scale: the
whole entropy-coded stream is still read, so truncation is caught) and reports every bad file in one line.
Grayscale, palette, CMYK and RGBA images are fine: they are converted to RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hada.errors import HadaError

MAX_NAMED = 5  # bad files named in an error message


def open_rgb(path: Path, draft: bool = False):
    """The image at ``path`` as an RGB PIL image; ``draft`` decodes JPEGs at reduced size (for checking)."""
    from PIL import Image

    with Image.open(path) as im:
        if draft:
            im.draft("RGB", (1, 1))
        return im.convert("RGB")


def decode_problem(path: Path) -> str | None:
    """Why ``path`` cannot be decoded (one short phrase), or None when it can."""
    from PIL import Image

    try:
        open_rgb(path, draft=True)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def undecodable(paths: Sequence[Path], jobs: int = 1, progress: bool = True, desc: str = "decode") -> list:
    """``[(path, reason), ...]`` for every file of ``paths`` that cannot be decoded, in order. Decoding runs in
    ``jobs`` threads (PIL releases the GIL while decoding)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from hada.io import progress_enabled

    bad = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = pool.map(decode_problem, paths, chunksize=64)
        bar = tqdm(results, total=len(paths), unit="img", desc=desc, disable=not progress_enabled(progress),
                   dynamic_ncols=True)
        for path, problem in zip(paths, bar):
            if problem is not None:
                bad.append((Path(path), problem))
    return bad


def undecodable_error(bad: list, total: int, where: str) -> HadaError:
    """One line naming the first few bad files, with the reason of the first, and the count."""
    names = ", ".join(p.name for p, _ in bad[:MAX_NAMED]) + (", ..." if len(bad) > MAX_NAMED else "")
    return HadaError(f"{len(bad)} of {total} images of {where} cannot be decoded: {names} "
                     f"({bad[0][0]}: {bad[0][1]}); replace or remove them (`hada data check --decode` lists them)")
