"""The book: it builds, every chapter page has its figures and no error, failures fail the build,
and chapters rerun through papermill with parameters (the three ways users run it)."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.book

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BIN = Path(sys.executable).parent
CHAPTERS = sorted(p.stem for p in BOOK.glob("0[1-9]_*.md"))


def _toc_files() -> list[str]:
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for c in toc["chapters"]]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _notebook_errors(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for cell in nb["cells"] if cell["cell_type"] == "code"
        for o in cell.get("outputs", []) if o.get("output_type") == "error"
    ]


def _to_ipynb(chapter: str, out: Path) -> Path:
    target = out / f"{chapter}.ipynb"
    res = _run([str(BIN / "jupytext"), "--to", "ipynb", str(BOOK / f"{chapter}.md"), "-o", str(target)])
    assert res.returncode == 0, res.stderr
    return target


class _PageScan(HTMLParser):
    """Collects image sources and error outputs of one built page."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.errors = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])
        classes = (attrs.get("class") or "").split()
        if "traceback" in classes or "error" in classes and "output" in classes:
            self.errors += 1


def test_chapters_are_myst_text_with_one_parameters_cell():
    assert CHAPTERS, "no chapters found"
    assert not list(BOOK.rglob("*.ipynb")) or all("_build" in p.parts for p in BOOK.rglob("*.ipynb"))
    for chapter in CHAPTERS:
        text = (BOOK / f"{chapter}.md").read_text()
        assert "format_name: myst" in text and "name: python3" in text, chapter
        assert len(re.findall(r":tags: \[parameters\]", text)) == 1, f"{chapter}: needs exactly one parameters cell"
        assert chapter in _toc_files(), f"{chapter} is not in book/_toc.yml"


def _parameters(chapter: str) -> dict:
    """The values of a chapter's parameters cell."""
    text = (BOOK / f"{chapter}.md").read_text()
    cell = re.search(r":tags: \[parameters\]\n(.*?)```", text, re.S).group(1)
    tree = ast.parse(cell)
    return {node.target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.AnnAssign)}


def test_chapter_parameters_are_what_hada_prepare_makes():
    """`hada prepare` without options makes what `hada.experiments.resolve`'s defaults describe; every chapter's
    parameters cell must use the same values, or a build would train (or miss) runs itself."""
    from hada.experiments import resolve

    defaults = {k: v.default for k, v in inspect.signature(resolve).parameters.items()}
    for chapter in CHAPTERS:
        params = _parameters(chapter)
        assert params, f"{chapter}: empty parameters cell"
        for name, value in params.items():
            if name in defaults:
                assert value == defaults[name], f"{chapter}: {name} = {value!r}, hada prepare uses {defaults[name]!r}"


def test_papermill_sees_every_parameter_with_its_type(tmp_path):
    """papermill lists each parameter of each chapter with a type (an "=" inside a comment, or no annotation, used
    to hide parameters from it or show them as "Unknown type"). Read in this process through papermill's own
    ``inspect_notebook``, what ``papermill --help-notebook`` prints (a process per chapter took 40 s)."""
    import jupytext
    import papermill

    for chapter in CHAPTERS:
        target = tmp_path / f"{chapter}.ipynb"
        jupytext.write(jupytext.read(BOOK / f"{chapter}.md"), target, fmt="ipynb")
        listed = {name: p["inferred_type_name"] for name, p in papermill.inspect_notebook(str(target)).items()}
        assert set(listed) == set(_parameters(chapter)), f"{chapter}: papermill sees {sorted(listed)}"
        assert all(t not in (None, "None") for t in listed.values()), f"{chapter}: {listed}"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_page_has_its_figures_and_no_error(built_html, chapter):
    page = built_html / f"{chapter}.html"
    assert page.exists(), f"{page} was not built"
    scan = _PageScan()
    scan.feed(page.read_text())
    assert scan.errors == 0, f"{chapter} shows error output"
    figures = [src for src in scan.images if "_images/" in src]
    assert figures, f"{chapter} has no figure"
    for src in figures:
        assert (page.parent / src).exists(), f"{chapter}: image {src} is missing"
    assert "Traceback (most recent call last)" not in page.read_text()


def test_a_failing_cell_fails_the_build(tmp_path):
    """A copy of the book's own configuration with one broken chapter must not build."""
    shutil.copy(ROOT / "_config.yml", tmp_path / "_config.yml")
    book = tmp_path / "book"
    book.mkdir()
    shutil.copytree(BOOK / "_ext", book / "_ext")  # the local extensions _config.yml names
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: broken\n")
    (book / "intro.md").write_text("# Intro\n")
    (book / "references.bib").write_text("")
    header = (BOOK / f"{CHAPTERS[0]}.md").read_text().split("---")[1]
    (book / "broken.md").write_text(f"---{header}---\n# Broken\n\n```{{code-cell}} ipython3\n1 / 0\n```\n")
    res = _run([str(BIN / "jupyter-book"), "build", str(book)], cwd=tmp_path)
    assert res.returncode != 0
    assert "ZeroDivisionError" in res.stdout + res.stderr


def test_papermill_rerun_with_small_parameters(tmp_path):
    """CI's own rerun: the training chapter with one epoch, executed by papermill, holds no error."""
    nb = _to_ipynb("04_training", tmp_path)
    out = tmp_path / "out.ipynb"
    res = _run([str(BIN / "papermill"), str(nb), str(out), "-p", "epochs", "1", "--cwd", str(BOOK)])
    assert res.returncode == 0, res.stderr[-4000:]
    assert _notebook_errors(out) == []


def test_real_data_path_without_data_stops_with_one_clear_message(tmp_path):
    nb = _to_ipynb("02_data_backbones", tmp_path)
    out = tmp_path / "out.ipynb"
    missing = tmp_path / "no-flickr30k-here"
    res = _run([str(BIN / "papermill"), str(nb), str(out), "-p", "dataset", "flickr30k",
                "-p", "data_root", str(missing), "--cwd", str(BOOK)])
    assert res.returncode != 0
    errors = _notebook_errors(out)
    assert len(errors) == 1 and errors[0].startswith("HadaError") and str(missing) in errors[0], errors
    executed = [c for c in json.loads(out.read_text())["cells"]
                if c["cell_type"] == "code" and c.get("execution_count")]
    assert len(executed) <= 3, "the chapter should stop at its first cell after the parameters"


def test_make_books_build_reads_the_chapters_on_several_processes(monkeypatch):
    """`make book` runs jupyter-book with Sphinx's `parallel` (which its command never sets), and the two bundled
    extensions that do not declare parallel reading safe are declared so (else Sphinx reads on one process)."""
    import importlib.util
    from types import SimpleNamespace

    import jupyter_book.cli.main
    import jupyter_book.sphinx

    spec = importlib.util.spec_from_file_location("hada_parallel", ROOT / "book" / "_ext" / "hada_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    seen = {}
    monkeypatch.setattr(jupyter_book.sphinx, "build_sphinx", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(jupyter_book.cli.main, "main", lambda: jupyter_book.sphinx.build_sphinx("src", "out", jobs=None))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    module.main(["--jobs", "3", "build", "book/"])
    assert seen["jobs"] == 3 and sys.argv == ["jupyter-book", "build", "book/"]

    undeclared = {name: SimpleNamespace(parallel_read_safe=None) for name in module.SAFE_UNDECLARED}
    other = SimpleNamespace(parallel_read_safe=None)
    module.declare_parallel_safe(SimpleNamespace(extensions={**undeclared, "someone_else": other}))
    assert all(ext.parallel_read_safe for ext in undeclared.values())
    assert other.parallel_read_safe is None  # only the two named


def test_the_notebook_cache_exists_before_chapters_are_read_in_parallel(tmp_path):
    """On a cold build each reading process created jupyter-cache's tables at once, and one failed ("table settings
    already exists"): the database is made in the main process before reading starts."""
    import importlib.util
    from types import SimpleNamespace

    from jupyter_cache import get_cache

    spec = importlib.util.spec_from_file_location("hada_parallel", ROOT / "book" / "_ext" / "hada_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache = tmp_path / ".jupyter_cache"
    env = SimpleNamespace(mystnb_config=SimpleNamespace(execution_mode="cache", execution_cache_path=str(cache)))
    module.create_notebook_cache(None, env, [])
    assert (cache / "global.db").is_file()
    assert get_cache(str(cache)).list_cache_records() == []  # a working, empty cache
    off = SimpleNamespace(mystnb_config=SimpleNamespace(execution_mode="off", execution_cache_path=str(tmp_path / "x")))
    module.create_notebook_cache(None, off, [])
    assert not (tmp_path / "x").exists()
