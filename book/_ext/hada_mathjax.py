"""Serves MathJax 3 from the built site itself, so the book's math renders offline and with no CDN.

The files come from the pinned PyPI package django-static-mathjax (environment.yml), which installs them as the
plain package ``mathjax``; ``mathjax_path`` in _config.yml names the entry script relative to the build's
``_static/``. They are copied into the build when it finishes, and never kept in book/_static: jupyter-book adds
every .js file found under book/_static to every page, and MathJax ships hundreds of them.
"""

from __future__ import annotations

import shutil
from importlib import metadata, resources
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

PACKAGE = "django-static-mathjax"
ENTRY = "tex-mml-chtml.js"
# What tex-mml-chtml.js loads on demand: the CHTML fonts, TeX extensions (\require), the menu and the
# accessibility and speech components the menu offers. The other combined builds are not needed.
PARTS = (ENTRY, "a11y", "adaptors", "input", "output", "sre", "ui")
STAMP = ".hada-mathjax-version"


def mathjax_es5() -> Path:
    """The folder of MathJax's browser build inside the installed package."""
    try:
        root = Path(str(resources.files("mathjax"))) / "static" / "mathjax" / "es5"
    except ModuleNotFoundError:
        root = None
    if root is None or not (root / ENTRY).is_file():
        raise ExtensionError(f"MathJax not found: install the pinned {PACKAGE} (make install)")
    return root


def local_folder(mathjax_path: str) -> str | None:
    """The folder under _static/ that ``mathjax_path`` points into, or None when it is a URL (a CDN)."""
    if "://" in mathjax_path or mathjax_path.startswith("//"):
        return None
    folder, _, entry = mathjax_path.rpartition("/")
    if entry != ENTRY or not folder:
        raise ExtensionError(f"mathjax_path must be FOLDER/{ENTRY} (relative to _static) or a URL, not {mathjax_path!r}")
    return folder


def copy_mathjax(target: Path) -> None:
    """Copies MathJax into ``target`` unless the same version is already there (a rebuild copies nothing)."""
    version = metadata.version(PACKAGE)
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text() == version:
        return
    source = mathjax_es5()
    target.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if (source / part).is_dir():
            shutil.copytree(source / part, target / part, dirs_exist_ok=True)
        else:
            shutil.copy2(source / part, target / part)
    stamp.write_text(version)


def _check(app: Sphinx, config) -> None:
    """Fails at start, not at the end of a long build, when the configured local MathJax is not installed."""
    if local_folder(config.mathjax_path) is not None:
        mathjax_es5()


def _install(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    folder = local_folder(app.config.mathjax_path)
    if folder is not None:
        copy_mathjax(Path(app.outdir) / "_static" / folder)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _check)
    app.connect("build-finished", _install)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
