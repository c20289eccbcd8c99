"""The data folder follows the user: the repository's data/ in a checkout; when installed, the working
directory's data/ if it exists, else a per-user folder; HADA_DATA always.

The last test installs the package for real (not editable, into a scratch target folder, from a copy of the
sources) and runs `hada data synth` and `hada features extract` from another folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hada import paths

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_uses_its_data_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("HADA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()                         # a data/ here does not matter in a checkout
    assert paths.in_checkout()
    assert paths.data_dir() == ROOT / "data"
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "elsewhere"))
    assert paths.data_dir() == tmp_path / "elsewhere"


def test_installed_the_working_directorys_data_then_the_users(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "project_root", lambda: tmp_path / "site-packages")
    monkeypatch.delenv("HADA_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    assert not paths.in_checkout()
    assert paths.data_dir() == tmp_path / "home" / ".local" / "share" / "hada"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert paths.data_dir() == tmp_path / "xdg" / "hada"
    (work / "data").mkdir()
    assert paths.data_dir() == work / "data"
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "override"))
    assert paths.data_dir() == tmp_path / "override"


@pytest.mark.parametrize("platform, environ, expected", [
    ("linux", {"HOME": "/h"}, "/h/.local/share/hada"),
    ("linux", {"HOME": "/h", "XDG_DATA_HOME": "/x"}, "/x/hada"),
    ("linux", {"HOME": "/h", "XDG_DATA_HOME": "relative"}, "/h/.local/share/hada"),   # XDG: absolute only
    ("darwin", {"HOME": "/h"}, "/h/Library/Application Support/hada"),
    ("win32", {"HOME": "/h", "LOCALAPPDATA": "/l"}, "/l/hada"),
])
def test_user_data_dir_is_the_platforms(platform, environ, expected):
    assert paths.user_data_dir(environ, platform) == Path(expected)


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_an_installed_hada_writes_to_the_users_folder_not_its_own(tmp_path):
    """`pip install .` (not editable) into a target folder; `hada` run from elsewhere writes where the user is."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "hada", src / "hada", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--no-compile", "--target", str(target), str(src)],
                   check=True, cwd=tmp_path, capture_output=True, text=True)
    installed = set(_files_under(target))
    assert "hada/paths.py" in installed and not (target / "pyproject.toml").exists()

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HADA_DATA", "XDG_DATA_HOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), HOME=str(home), HADA_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")

    def hada(*args: str, cwd: Path = work) -> str:
        code = "import sys, hada.cli; sys.exit(hada.cli.main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"hada {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import hada, hada.paths as p; print(hada.__file__); "
                            "print(p.data_dir())"], cwd=work, env=env, capture_output=True, text=True, check=True)
    module, data = where.stdout.split("\n")[:2]
    assert Path(module).resolve() == (target / "hada" / "__init__.py").resolve()    # the installed copy
    user = home / ".local" / "share" / "hada"
    assert Path(data) == user

    hada("data", "synth", "--size", "tiny", "--jobs", "1")
    hada("features", "extract", "--backbones", "tiny-vit:random", "--split", "test", "--jobs", "1")
    assert (user / "synthetic" / "dataset_flickr30k.json").exists()
    stored = _files_under(user / "features")
    assert any(f.endswith("manifest.json") and "/test/" in f for f in stored), stored
    assert set(_files_under(target)) == installed, "hada wrote inside its own installation"
    assert not (work / "data").exists()

    # a data/ in the working directory takes it; HADA_DATA takes it from anywhere
    (work / "data").mkdir()
    hada("data", "synth", "--size", "tiny", "--jobs", "1")
    assert (work / "data" / "synthetic" / "dataset_flickr30k.json").exists()
    env["HADA_DATA"] = str(tmp_path / "chosen")
    hada("data", "synth", "--size", "tiny", "--jobs", "1")
    assert (tmp_path / "chosen" / "synthetic" / "dataset_flickr30k.json").exists()
    assert set(_files_under(target)) == installed
