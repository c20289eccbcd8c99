"""The published site as a reader's browser shows it: math typeset by the MathJax copy inside the build (no CDN,
checked in headless Chromium with every other host unreachable), and each chapter offered as a jupytext-made
.ipynb beside the repository, issues and launch buttons.

The unmarked tests check the two local extensions (book/_ext) on their own, in a fraction of a second."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CHAPTERS = sorted(p.stem for p in BOOK.glob("0[1-9]_*.md"))
sys.path.insert(0, str(BOOK / "_ext"))

import hada_mathjax  # noqa: E402  (book/_ext is a jupyter-book local extension folder, not a package)
import hada_notebooks  # noqa: E402
from browser import serve  # noqa: E402  (tests/browser.py: the site over HTTP on the loopback)

CHROMIUM = shutil.which("chromium")
MATH = 'class="math notranslate'  # how Sphinx marks TeX for MathJax (inline and display)
RAW_TEX = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")


class _RenderedText(HTMLParser):
    """The text a reader sees outside code, scripts and typeset math, and the count of typeset formulas."""

    SKIP = {"script", "style", "pre", "code", "textarea", "mjx-container", "noscript"}

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.formulas = 0
        self.math_errors = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.formulas += tag == "mjx-container"
        self.math_errors += tag == "mjx-merror"
        self.depth += tag in self.SKIP

    def handle_endtag(self, tag):
        self.depth -= tag in self.SKIP

    def handle_data(self, data):
        if self.depth == 0:
            self.text.append(data)


def _dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran. Every host but the loopback goes to a closed proxy port, so a
    formula that needs a CDN stays raw TeX."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--proxy-server=http://127.0.0.1:9", "--virtual-time-budget=20000", "--dump-dom", url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "<html" in res.stdout, f"chromium failed on {url}:\n{res.stderr[-2000:]}"
    return res.stdout


def _raw_tex(text: str) -> list[str]:
    return [text[max(0, m.start() - 40):m.end() + 40].replace("\n", " ") for m in RAW_TEX.finditer(text)]


def _math_pages(site: Path) -> list[str]:
    return sorted(p.name for p in site.glob("*.html") if MATH in p.read_text())


# ---------------------------------------------------------------------------------------------------------
# The local extensions on their own (fast)


def test_mathjax_path_is_a_local_folder_or_a_url():
    assert hada_mathjax.local_folder("mathjax/tex-mml-chtml.js") == "mathjax"
    assert hada_mathjax.local_folder("https://cdn.example.org/mathjax@3/es5/tex-mml-chtml.js") is None
    with pytest.raises(Exception, match="mathjax_path"):
        hada_mathjax.local_folder("tex-chtml.js")


def test_mathjax_copy_has_the_entry_script_and_its_fonts(tmp_path):
    hada_mathjax.copy_mathjax(tmp_path / "mathjax")
    assert (tmp_path / "mathjax" / "tex-mml-chtml.js").is_file()
    assert list((tmp_path / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    stamp = tmp_path / "mathjax" / hada_mathjax.STAMP
    before = stamp.stat().st_mtime_ns
    hada_mathjax.copy_mathjax(tmp_path / "mathjax")  # same version: nothing copied again
    assert stamp.stat().st_mtime_ns == before


def test_chapter_converts_to_a_notebook_with_its_parameters_cell(tmp_path):
    target = tmp_path / "_sources" / f"{CHAPTERS[0]}.ipynb"
    hada_notebooks.write_notebook(BOOK / f"{CHAPTERS[0]}.md", target)
    nb = json.loads(target.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")


# ---------------------------------------------------------------------------------------------------------
# The built site (shares the one book build of tests/conftest.py)


@pytest.mark.book
def test_math_is_served_from_the_site_itself(built_html):
    pages = _math_pages(built_html)
    assert pages, "no page of the built book has math"
    for name in pages:
        sources = re.findall(r'<script[^>]*src="([^"]*tex-mml-chtml\.js[^"]*)"', (built_html / name).read_text())
        assert sources, f"{name} does not load MathJax"
        for src in sources:
            assert "://" not in src, f"{name} loads MathJax from {src}"
            assert (built_html / src.split("?")[0]).is_file(), f"{name}: {src} is not in the build"


@pytest.mark.book
def test_every_page_with_math_renders_it_in_a_browser(built_html):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it when running as root: "
                    "apt-get install chromium)")
    failures = []
    with serve(built_html) as base:  # http, not file:// (which blocks MathJax fonts)
        for name in _math_pages(built_html):
            scan = _RenderedText()
            scan.feed(_dump_dom(f"{base}/{name}"))
            if not scan.formulas:
                failures.append(f"{name}: no MathJax output (mjx-container)")
            if scan.math_errors:
                failures.append(f"{name}: {scan.math_errors} TeX errors (mjx-merror)")
            raw = _raw_tex("".join(scan.text))
            failures += [f"{name}: raw TeX ({len(raw)} marks) ...{s}..." for s in raw[:3]]
    assert not failures, "\n".join(failures)


@pytest.mark.book
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_offers_its_notebook_and_the_repository(built_html, chapter):
    page = (built_html / f"{chapter}.html").read_text()
    assert f"_sources/{chapter}.ipynb" in page, f"{chapter}: no .ipynb download"
    nb = json.loads((built_html / "_sources" / f"{chapter}.ipynb").read_text())
    assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "not the jupytext notebook"
    assert "repository-button" in page or "fa-github" in page, f"{chapter}: no repository button"
    assert "issues/new" in page, f"{chapter}: no issues button"
    assert f"urlpath=lab/tree/book/{chapter}.md" in page, f"{chapter}: no Binder launch button"
