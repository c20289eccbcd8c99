"""A run's key follows the code that computes it (not its comments), and `hada prepare` clears the book's
notebook cache exactly when that code changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import hada.runs as hr
from hada.pipeline import DIGEST_RECORD, refresh_notebook_cache
from hada.config import TrainConfig

PACKAGE = Path(hr.__file__).resolve().parent
FEATURES = {"toy0": {"train": "m0"}, "toy1": {"train": "m1"}}  # a fixed fingerprint: no stores needed


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A copy of the ``hada`` package that the run key digests instead of the real one."""
    copy = tmp_path / "hada"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(hr, "_PACKAGE", copy)
    return copy


def _key() -> str:
    return hr.run_key(TrainConfig().override(backbones=["toy0", "toy1"], precision="fp32"), FEATURES)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}: pick another line for this test"
    path.write_text(text.replace(old, new, 1))


def test_comments_and_docstrings_keep_the_run_key(package):
    before = _key()
    losses = package / "losses.py"
    losses.write_text("# a new comment at the top\n" + losses.read_text() + "\n# and one at the end\n")
    _edit(package / "train.py", '    """Train (or continue) the run in ``run_dir``; returns its result once finished.',
          '    """Train or continue the run in ``run_dir``, reworded.\n\n    Another paragraph.')
    _edit(package / "evaluate.py", "\n", "\n\n\n")  # layout only
    assert _key() == before


def test_a_body_change_in_result_code_changes_the_run_key(package):
    before = _key()
    mean, total = "(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()", "(F.log_softmax(logits, dim=1) * targets).sum(dim=1).sum()"
    _edit(package / "losses.py", mean, total)  # how the loss is computed
    assert _key() != before
    _edit(package / "losses.py", total, mean)
    assert _key() == before  # the same code again: the same run


def _add(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_presentation_changes_no_run_key(package):
    """A constant in a book module, a figure's colour, an ablation added to the book's list, a new command-line
    helper: none is code a run's result comes from, so none changes a key (the notebook cache's digest sees them)."""
    before, whole = _key(), hr.package_digest(package)
    _add(package / "book" / "tables.py", "\nA_NEW_CONSTANT = 42\n")
    assert _key() == before
    _edit(package / "book" / "figures.py", 'BACKBONE_COLOURS = ("#1f77b4"', 'BACKBONE_COLOURS = ("#000000"')
    assert _key() == before
    _edit(package / "book" / "views.py", 'MASS_COLOURS = ("#1f77b4"', 'MASS_COLOURS = ("#123456"')
    assert _key() == before
    _edit(package / "experiments.py", "ABLATIONS: tuple[tuple[str, int, dict], ...] = (",
          "ABLATIONS: tuple[tuple[str, int, dict], ...] = (\n    (\"a new variant\", 2, {\"seed\": 5}),")
    assert _key() == before
    _add(package / "cli" / "flags.py", "\n\ndef _new_helper():\n    return 42\n")
    _add(package / "pipeline.py", "\n\ndef _new_helper():\n    return 42\n")
    assert _key() == before
    assert hr.package_digest(package) != whole  # the notebook cache's digest sees every change


def test_a_change_to_the_model_body_changes_the_run_key(package):
    before = _key()
    _add(package / "model" / "encoder.py", "\n\ndef _new_helper():\n    return 42\n")
    assert _key() != before


def test_the_digest_follows_the_imports(package):
    """A module the result code starts importing enters the digest; the book's modules never do."""
    files = {p.relative_to(package).as_posix() for p in hr.result_code_files(package)}
    assert {"losses.py", "train.py", "model/encoder.py", "runs.py", "metrics.py"} <= files
    assert not [f for f in files if f.startswith(("book/", "cli/")) or f in ("experiments.py", "pipeline.py")]
    before = _key()
    _add(package / "book" / "source.py", "\n\ndef _new_helper():\n    return 42\n")
    assert _key() == before
    _add(package / "losses.py", "\n\ndef _uses_source():\n    from hada.book import source\n    return source\n")
    assert _key() != before  # now part of the result code (tests/test_boundary.py forbids exactly this)


def test_docstrings_go_everywhere_but_strings_in_code_stay():
    plain = "def f(x):\n    return x + 1\n"
    documented = 'def f(x):\n    """Add one."""\n    # why\n    return x + 1\n'
    only_doc = 'class C:\n    """Nothing else."""\n'
    assert hr.normalised_source(plain) == hr.normalised_source(documented)
    assert hr.normalised_source(only_doc) == hr.normalised_source("class C:\n    pass\n")
    assert hr.normalised_source('x = "a"\n') != hr.normalised_source('x = "b"\n')


# ------------------------------------------------------------------------------------ notebook cache
def _fake_build(build: Path) -> None:
    """A jupyter-book build folder as `jupyter-book build book/` leaves it: the notebook cache, Sphinx's
    doctrees (it re-reads only pages whose source changed) and the html."""
    (build / ".jupyter_cache" / "executed").mkdir(parents=True, exist_ok=True)
    (build / ".jupyter_cache" / "global.db").write_text("records")
    (build / ".doctrees").mkdir(exist_ok=True)
    (build / ".doctrees" / "05_results.doctree").write_text("old outputs")
    (build / "html").mkdir(exist_ok=True)


def test_notebook_cache_is_cleared_when_the_code_changed_and_kept_otherwise(tmp_path):
    build = tmp_path / "_build"
    assert not refresh_notebook_cache(build, "a")  # nothing built yet: only the record is written
    assert (build / DIGEST_RECORD).exists() and not (build / ".jupyter_cache").exists()
    _fake_build(build)
    assert not refresh_notebook_cache(build, "a")  # same code: the cached chapters stay
    assert (build / ".jupyter_cache" / "global.db").exists() and (build / ".doctrees").exists()
    assert refresh_notebook_cache(build, "b")  # new code: every executed chapter goes
    assert not (build / ".jupyter_cache").exists() and not (build / ".doctrees").exists()
    assert (build / "html").exists()
    _fake_build(build)
    assert not refresh_notebook_cache(build, "b")
    (build / DIGEST_RECORD).unlink()  # a cache filled before digests were recorded: unknown code, cleared
    assert refresh_notebook_cache(build, "b")


def test_notebook_cache_follows_the_package_digest(package, tmp_path):
    """End to end with a real jupyter-cache folder: a comment keeps the executed chapters, a body change in
    any module of the package (presentation included) clears them."""
    jupyter_cache = pytest.importorskip("jupyter_cache")
    build = tmp_path / "_build"
    refresh_notebook_cache(build, hr.package_digest(package))
    assert jupyter_cache.get_cache(build / ".jupyter_cache").list_cache_records() == []  # creates its database
    assert (build / ".jupyter_cache").exists()
    figures = package / "book" / "figures.py"
    figures.write_text(figures.read_text() + "\n# a comment\n")
    assert not refresh_notebook_cache(build, hr.package_digest(package))
    assert (build / ".jupyter_cache").exists()
    figures.write_text(figures.read_text() + "\n\ndef _new_helper():\n    return 42\n")
    assert refresh_notebook_cache(build, hr.package_digest(package))
    assert not (build / ".jupyter_cache").exists()
