"""Where the data folder is: every heavy step caches under it (datasets, backbones, features, runs).

It follows the user, first match wins:

1. ``$HADA_DATA``, always (tests point it at a temp dir);
2. in a checkout of the repository (``hada/`` beside its ``pyproject.toml``, an editable install included): the
   repository's ``data/``;
3. installed as a package (``pip install .``, a wheel): the working directory's ``data/`` if it exists (``mkdir
   data`` keeps a project's artefacts in the project), else a per-user folder, the platform's data directory:
   ``$XDG_DATA_HOME/hada`` or ``~/.local/share/hada`` (Linux and other Unixes), ``~/Library/Application
   Support/hada`` (macOS), ``%LOCALAPPDATA%\\hada`` (Windows). Never next to the package itself, which may sit in
   a read-only site-packages.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_root() -> Path:
    """The folder holding ``hada/``: the repository root in a checkout (site-packages when installed)."""
    return Path(__file__).resolve().parent.parent


def in_checkout() -> bool:
    """True when ``hada`` is imported from a checkout of the repository (also an editable install), not from an
    installed copy: its parent folder holds the project's ``pyproject.toml``."""
    pyproject = project_root() / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return False
    return '\nname = "hada"' in text


def user_data_dir(environ=None, platform: str | None = None) -> Path:
    """The per-user data folder of ``hada`` on this platform (``platformdirs.user_data_dir("hada")``'s rule)."""
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    home = Path(env.get("HOME") or Path.home())
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA") or env.get("APPDATA")
        return Path(base) / "hada" if base else home / "AppData" / "Local" / "hada"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "hada"
    xdg = env.get("XDG_DATA_HOME", "").strip()
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share") / "hada"


def data_dir() -> Path:
    """Root of all cached artefacts (the module's docstring gives the rule); ``HADA_DATA`` always overrides it."""
    override = os.environ.get("HADA_DATA")
    if override:
        return Path(override).expanduser()
    if in_checkout():
        return project_root() / "data"
    local = Path.cwd() / "data"
    if local.is_dir():
        return local
    return user_data_dir()


def synthetic_root() -> Path:
    return data_dir() / "synthetic"


def backbones_dir() -> Path:
    return data_dir() / "backbones"


def features_dir() -> Path:
    return data_dir() / "features"


def runs_dir() -> Path:
    return data_dir() / "runs"
