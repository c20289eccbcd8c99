"""The book as a reader meets it (issue 24): the package's tables in the theme's style inside a scroll container,
one search box, no code cell shown whose only job is glue, no absolute path of the build machine on any page.

The unmarked tests check the pieces on their own (rendering functions, chapter sources, the configuration) in a
fraction of a second; the ``book`` ones read the built site (the one build of ``tests/conftest.py``)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from hada.book.tables import METRIC_COLUMNS, Table, metric_row

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


class _Cells(HTMLParser):
    """The tags, classes and cell texts of one rendered table."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list[str]]] = []
        self.cells: list[tuple[list[str], str]] = []
        self._open: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        self.tags.append((tag, classes))
        if tag in ("td", "th"):
            self._open, self._text = classes, ""

    def handle_data(self, data):
        if self._open is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._open is not None:
            self.cells.append((self._open, self._text))
            self._open = None


def _scan(html: str) -> _Cells:
    scan = _Cells()
    scan.feed(html)
    return scan


# ------------------------------------------------------------------------------------------------ tables
def test_table_takes_the_theme_style_inside_a_scroll_container():
    html = Table([metric_row("a", {k: 1.0 for k, _ in METRIC_COLUMNS})], caption="c")._repr_html_()
    tags = _scan(html).tags
    assert tags[0] == ("p", ["hada-table-caption"])  # above the scroll container: it wraps at the page's width
    (div, div_classes), (table, table_classes) = tags[1:3]
    assert div == "div" and "pst-scrollable-table-container" in div_classes  # the theme's overflow-x: auto
    assert table == "table" and {"table", "hada-table"} <= set(table_classes)
    assert html.endswith("</table></div>") and 'aria-label="c"' in html


def test_table_cells_name_their_column_and_numbers_are_marked():
    table = Table([{"name": "x", "score": "0.7442", "image_id": "10234", "why": "because", "n": 3}],
                  columns=(("name", "rank"), ("score", "score"), ("image_id", "image"), ("why", "why"), ("n", "n")))
    cells = {text: classes for classes, text in _scan(table._repr_html_()).cells}
    assert "col-score" in cells["0.7442"] and "num" in cells["0.7442"]
    assert "col-image-id" in cells["10234"]
    assert "col-why" in cells["because"] and "num" not in cells["because"]
    assert "num" in cells["3"]
    mixed = Table([{"name": "a", "v": "20"}, {"name": "b", "v": "graph"}], columns=(("name", "n"), ("v", "v")))
    assert not any("num" in classes for classes, _ in _scan(mixed._repr_html_()).cells)  # aligned as one column
    assert cells["0.7442"] != cells["10234"]  # two cells, two columns: never "0.744210234"


def test_table_css_gives_prose_columns_a_width_and_scrolls():
    css = (BOOK / "_static" / "hada.css").read_text()
    for rule in ("table.hada-table", ".num", ".col-why", "min-width"):
        assert rule in css, rule


def test_search_hits_show_the_images_and_score_and_id_in_their_own_columns(tmp_path):
    from PIL import Image

    from hada.book.views import hits_table
    from hada.search import Hit

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{10234 + i}.png")
        Image.new("RGB", (300, 200), (200, 10 * i, 0)).save(paths[-1])
    hits = [Hit(rank=i + 1, row=i, score=0.7442 - i / 10, image_id=10234 + i, path=p, correct=i == 0)
            for i, p in enumerate(paths)]
    table = hits_table(hits)
    html = table._repr_html_()
    cells = {text: classes for classes, text in _scan(html).cells}
    assert "col-score" in cells["0.7442"] and "col-image-id" in cells["10234"]
    assert html.count('<img class="hada-thumb" src="data:image/png;base64,') == 2  # the images themselves
    assert str(tmp_path) not in html  # and not their paths
    assert 'width="96" height="64"' in html  # a thumbnail, its aspect kept
    assert str(paths[0]) in str(table)  # the command line still prints where the file is


def test_paths_are_shown_relative_to_the_data_folder_or_repository(tmp_path, monkeypatch):
    from hada.book.tables import display_path, display_spec
    from hada.paths import project_root

    monkeypatch.setenv("HADA_DATA", str(tmp_path / "somewhere" / "data"))
    assert display_path(tmp_path / "somewhere" / "data" / "synthetic") == "data/synthetic"
    assert display_path(project_root() / "book" / "params") == "book/params"
    assert display_path("/mnt/datasets/flickr30k/images") == "…/flickr30k/images"
    assert display_path("relative/folder") == "relative/folder"
    assert display_spec("tiny-vit@1") == "tiny-vit@1"
    assert display_spec("ViT-B-16:/weights/openclip/vit_b_16.bin") == "ViT-B-16:…/openclip/vit_b_16.bin"


def test_setting_table_shows_no_absolute_path(tmp_path, monkeypatch):
    from hada.book.tables import setting_table
    from hada.experiments import Setting
    import dataclasses

    monkeypatch.setenv("HADA_DATA", str(tmp_path / "data"))
    fields = {f.name for f in dataclasses.fields(Setting)}
    values = {"dataset": "flickr30k", "data_root": tmp_path / "data" / "flickr30k",
              "backbones": ("ViT-B-16:/home/runner/weights/vit.bin", "RN50:/home/runner/weights/rn50.bin"),
              "epochs": 1, "pairs_per_epoch": None, "seed": 0, "device": "cpu",
              "counts": {"train": {"images": 2, "captions": 10}}}
    setting = Setting(**{k: v for k, v in values.items() if k in fields})
    html = setting_table(setting)._repr_html_()
    assert "data/flickr30k" in html and str(tmp_path) not in html and "/home/runner" not in html


# --------------------------------------------------------------------------------------------- the site
def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def test_one_search_box_and_every_button_is_kept():
    config = _config()
    assert config["sphinx"]["config"]["html_theme_options"]["navbar_persistent"] == []
    assert config["sphinx"]["recursive_update"] is True  # else html_theme_options would drop the buttons
    html = config["html"]
    assert html["use_repository_button"] and html["use_issues_button"] and html["use_download_button"]
    assert config["launch_buttons"]["binderhub_url"]


@pytest.mark.book
def test_every_page_has_one_search_box_and_its_buttons(built_html):
    for page in sorted(built_html.glob("*.html")):
        text = page.read_text()
        if page.name in ("search.html", "genindex.html") or "bd-sidebar-primary" not in text:
            continue  # the theme's own pages, and index.html (a redirect to the landing page)
        assert text.count('class="btn search-button-field') <= 1 and "navbar-persistent--container" not in text, \
            f"{page.name}: a second search box"
        assert "issues/new" in text and "fa-github" in text, f"{page.name}: a button went missing"


# ------------------------------------------------------------------------------------ what a page shows
def _code_cells(path: Path) -> list[tuple[str, str]]:
    """(tags line or "", source) of every code cell of a MyST page."""
    from hada.book.source import CELL

    return [(meta, code) for meta, code in CELL.findall(path.read_text())]


def _only_glue(code: str) -> bool:
    """Whether a cell's only job is glue: it shows nothing (no expression but ``glue(...)`` calls) and glues."""
    import ast

    calls = 0

    def plumbing(statements) -> bool:
        nonlocal calls
        for node in statements:
            if isinstance(node, ast.Expr):
                if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "glue":
                    calls += 1
                    continue
                return False
            if isinstance(node, (ast.For, ast.If)):
                if not plumbing(node.body) or not plumbing(node.orelse):
                    return False
            elif not isinstance(node, (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom)):
                return False
        return True

    return plumbing(ast.parse(code).body) and calls > 0


PAGES = sorted(BOOK.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_glue_is_never_shown(page):
    """A cell that glues does only that, and is removed from the page (its values still reach the text)."""
    for meta, code in _code_cells(page):
        if re.search(r"\bglue\(", code):
            assert _only_glue(code), f"{page.name}: a shown cell also glues:\n{code}"
            assert re.search(r":tags:\s*\[[^\]]*\bremove-cell\b", meta), f"{page.name}: glue cell not removed:\n{code}"


def test_glue_detection():
    assert _only_glue('x = 1\nglue("x", x, display=False)\n')
    assert _only_glue('for k in "ab":\n    glue(k, 1, display=False)\n')
    assert not _only_glue('glue("x", 1, display=False)\ntable\n')
    assert not _only_glue("x = 1\n")


def test_no_page_ends_a_cell_on_a_raw_dict_or_list():
    """Chapter 4 showed ``run.summary()`` (a dict) and chapter 8 its ``losses`` (a list of floats)."""
    training = (BOOK / "04_training.md").read_text()
    sixty = (BOOK / "08_hada_in_60_lines.md").read_text()
    assert "run.summary()\n```" not in training and "hb.run_summary(run)" in training
    assert "\nlosses\n```" not in sixty


def test_run_summary_is_a_table_of_labelled_values():
    import hada.book as hb

    class Run:
        def summary(self):
            return {"run": "hada-k2-abc", "epochs": 10, "test_rsum": 321.5, "tau": 0.0712}

    table = hb.run_summary(Run())
    assert [r["name"] for r in table.rows] == ["run folder (under data/runs)", "epochs run", "test Rsum",
                                                "final temperature τ"]
    assert [r["value"] for r in table.rows] == ["hada-k2-abc", "10", "321.5", "0.0712"]


# ------------------------------------------------------------------------------- no build-machine path
def _machine_paths() -> list[str]:
    """Absolute paths of the machine that builds the book, as a page could leak them: the checkout, the data
    folder, the home folder, the Python environment and the temporary folder (each as written and resolved)."""
    import os
    import sys
    import tempfile

    from hada.paths import data_dir

    paths = set()
    for path in (ROOT, data_dir(), Path.home(), Path(sys.prefix), Path(sys.base_prefix), Path(tempfile.gettempdir()),
                 Path(os.getcwd())):
        for form in (Path(path), Path(path).resolve()):
            if len(form.parts) > 1:  # never "/" itself
                paths.add(str(form))
    return sorted(paths, key=len, reverse=True)


#: Any home folder (a CI runner's /home/runner/work/..., a laptop's /Users/name/...), whoever built the site.
HOME_PATH = re.compile(r"(?<![\w.])/(?:home|Users|root)/[\w.-]+/")


def _leaks(text: str, machine: list[str]) -> list[str]:
    found = [p for p in machine if re.search(re.escape(p) + r"(?![\w.-])", text)]
    found += [m.group(0) for m in HOME_PATH.finditer(text)]
    return found


def test_leak_finder_finds_machine_paths_and_leaves_examples():
    machine = ["/srv/build/hada-book", "/srv/build/hada-book/data"]
    assert _leaks("dataset synthetic (/srv/build/hada-book/data/synthetic)", machine)
    assert _leaks("<td>/home/runner/work/hada/data</td>", machine) == ["/home/runner/"]
    assert not _leaks("hada data check --data-root /path/to/flickr30k", machine)
    assert not _leaks("/srv/build/hada-books-other", ["/srv/build/hada-book"])
    assert all(len(Path(p).parts) > 1 for p in _machine_paths())


@pytest.mark.book
def test_no_page_shows_a_path_of_the_build_machine(built_html):
    """Every published text file of the site (pages, search index, sources, notebooks) is free of the build
    machine's absolute paths: settings show the data folder relatively, retrieval shows images, not files."""
    machine = _machine_paths()
    failures = []
    for path in sorted(built_html.rglob("*")):
        if path.suffix not in (".html", ".js", ".txt", ".ipynb", ".md") or "_static" in path.parts:
            continue
        leaks = _leaks(path.read_text(errors="replace"), machine)
        if leaks:
            failures.append(f"{path.relative_to(built_html)}: {sorted(set(leaks))[:3]}")
    assert not failures, "absolute paths of the build machine on the site:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------ figures
def _figures(tmp_path) -> dict:
    """Every figure of hada.book.figures drawn from small made-up inputs: name -> (figure, column width)."""
    from types import SimpleNamespace

    import matplotlib
    from PIL import Image

    matplotlib.use("Agg")
    import hada.book as hb
    from hada.book import figures as F
    from hada.book.views import GraphSample
    from hada.model.graph import EdgeWeights, to_networkx

    history = [{"epoch": i, "loss": 1 / (i + 1), "val_rsum": 100.0 + i, "tau": 0.07, "mix_weight": 0.5}
               for i in range(6)]
    names = ["tiny-vit", "tiny-convnext", "average(tiny-vit, tiny-convnext)",
             "concat(tiny-vit, tiny-convnext) + linear", "HADA (K=2)"]
    rows = [{"name": n, "rsum": 200.0 + 15 * i} for i, n in enumerate(names)]
    points = [{"label": label, "ratio": r, "gain": g, "disagreement": d} for label, r, g, d in (
        ("tiny-vit + tiny-convnext", 0.84, 12.3, 30.1), ("tiny-vit@1 + tiny-convnext", 0.841, 12.2, 30.2),
        ("tiny-vit + tiny-convnext@1", 0.62, 3.1, 40.2), ("tiny-vit@1 + tiny-convnext@1", 0.83, 12.1, 30.5))]
    records = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 64), (30 * i, 100, 200)).save(path)
        records.append(SimpleNamespace(path=path, captions=["a small red star above a big blue square on the left"]))
    queries = [{"caption": "a small red star above a big blue square", "note": "(drawn at random)",
                "results": {m: [{"path": records[j].path, "score": 0.7 - j / 50, "correct": j == 2} for j in range(5)]
                            for m in ("tiny-convnext", "HADA (K=2)")}}]
    graphs = (to_networkx((17, 10), EdgeWeights()), to_networkx((9, 12), EdgeWeights()))
    sample = GraphSample(("tiny-vit", "tiny-convnext"), (17, 10), (9, 12), "a small red star " * 6, *graphs)
    column, full = F.CONTENT_PX, F.FULL_WIDTH_PX
    return {"history": (F.plot_history(history, title="HADA"), column),
            "rsum bars": (F.plot_rsum_bars(rows, title="Test Rsum"), column),
            "rsum bars with band": (F.plot_rsum_bars_with_band(rows + [{"name": "K=3", "rsum": 600.0}], 230.0, 4.0,
                                                               [228.0, 231.0]), column),
            "fusion strength": (F.plot_fusion_strength(points, noise=4.2), column),
            "method": (hb.method_figure(), column),
            "node graph": (sample.figure(), column),
            "samples": (F.show_samples(records), column),
            "retrieval grid": (F.retrieval_grid(queries, ("tiny-convnext", "HADA (K=2)")), full)}  # full-width cell


def test_every_figure_keeps_its_text_legible_at_the_size_shown(tmp_path):
    import matplotlib.pyplot as plt

    from hada.book.figures import MIN_TEXT_PX, displayed_text_px

    small = {}
    for name, (fig, column) in _figures(tmp_path).items():
        px = displayed_text_px(fig, column)
        if px < MIN_TEXT_PX:
            small[name] = round(px, 1)
        plt.close(fig)
    assert not small, f"text under {MIN_TEXT_PX} px as displayed: {small}"


def _drawn_texts(fig) -> list:
    """The texts a figure draws: tick labels only for ticks inside their axis's view, none of a hidden axis."""
    from matplotlib.text import Text

    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update((tick.label1, tick.label2))
                if ax.axison and ax.get_visible() and low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    drawn += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    drawn += [t for t in fig.findobj(Text) if t not in ticks and t.get_visible()]
    return [t for t in drawn if t.get_text().strip()]


def test_fusion_strength_and_bar_labels_cannot_collide(tmp_path):
    """No two texts of the fusion-strength figure (close points included) or of the bar chart overlap, and every
    text lies inside the saved figure."""
    import itertools

    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    figures = _figures(tmp_path)
    for name in ("fusion strength", "rsum bars"):
        fig, _ = figures[name]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        bound = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
        assert not [t for t, _ in boxes if "→" in t], "no annotation sits beside a point"
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b) or box_a.width == 0 or box_b.width == 0, f"{name}: {a!r} overlaps {b!r}"
        for text, box in boxes:
            assert bound.x0 - 1 <= box.x0 and box.x1 <= bound.x1 + 1, f"{name}: {text!r} runs past the figure"
    for fig, _ in figures.values():
        plt.close(fig)


def test_chapters_show_figures_as_svg():
    """hada.book switches a notebook kernel's figures to SVG when imported; nothing at all outside IPython."""
    import subprocess
    import sys

    code = ("import sys, hada.book; assert 'matplotlib' not in sys.modules; "
            "from IPython.testing.globalipapp import start_ipython; ip = start_ipython(); "
            "import importlib; importlib.reload(hada.book); "
            "from IPython.core.pylabtools import select_figure_formats; "
            "f = ip.display_formatter.formatters; "
            "assert 'matplotlib.figure.Figure' in str(f['image/svg+xml'].type_printers) "
            "or any('Figure' in str(k) for k in f['image/svg+xml'].type_printers), f['image/svg+xml'].type_printers")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]


# ------------------------------------------------------------------------------------------ landing page
def test_prepare_records_its_time_only_when_it_made_something(tmp_path):
    from hada.pipeline import StepLog, prepare_phrase, read_prepare_record, write_prepare_record

    path = tmp_path / "prepare-record.json"
    assert not write_prepare_record(StepLog({"synth": 0.1, "run": 1.2}, wall=1.5), jobs=2, path=path)
    assert read_prepare_record(path) is None
    assert write_prepare_record(StepLog({"synth": 3.0, "run": 600.0}, wall=1020.0), jobs=2, path=path)
    record = read_prepare_record(path)
    assert record["wall_seconds"] == 1020.0 and record["jobs"] == 2 and record["steps"] == 2
    assert not write_prepare_record(StepLog({"run": 0.5}, wall=0.6), jobs=2, path=path)  # a cached rerun keeps it
    assert read_prepare_record(path)["wall_seconds"] == 1020.0
    phrase = prepare_phrase(record)
    assert "17 minutes" in phrase and "2 processes" in phrase and record["date"] in phrase
    assert "45 seconds" in prepare_phrase({**record, "wall_seconds": 45.0, "jobs": 1, "cores": 1})
    assert "no `hada prepare` was recorded" in prepare_phrase(None)


def test_landing_page_substitution_reads_the_record(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    from hada.pipeline import PREPARE_RECORD, StepLog, write_prepare_record

    sys.path.insert(0, str(BOOK / "_ext"))
    try:
        import hada_record
    finally:
        sys.path.remove(str(BOOK / "_ext"))
    monkeypatch.setenv("HADA_DATA", str(tmp_path))
    config = SimpleNamespace(myst_substitutions={"other": "kept"})
    hada_record._substitute(None, config)
    assert "no `hada prepare` was recorded" in config.myst_substitutions["prepare_time"]
    write_prepare_record(StepLog({"run": 90.0}, wall=125.0), jobs=3, path=tmp_path / PREPARE_RECORD)
    hada_record._substitute(None, config)
    assert "on 3 processes" in config.myst_substitutions["prepare_time"] and config.myst_substitutions["other"]
    assert "hada_record" in _config()["sphinx"]["local_extensions"]


def test_landing_page_shows_the_claim_and_the_measured_gains():
    intro = (BOOK / "intro.md").read_text()
    results = (BOOK / "05_results.md").read_text()
    assert "in minutes" not in intro and "{{ prepare_time }}" in intro and "3.6%" in intro
    pasted = re.findall(r"05_results\.md::(\w+)", intro) + re.findall(r"\{glue:any\} (\w+)\n:doc: 05_results", intro)
    assert {"gain_table", "gain_summary", "results_dataset"} <= set(pasted)
    for key in pasted:
        assert re.search(rf'glue\("{key}"', results), f"05_results glues no {key!r}"


@pytest.mark.book
def test_landing_page_has_the_gain_table_and_the_build_time(built_html):
    page = (built_html / "intro.html").read_text()
    assert "hada-table" in page and "HADA Rsum" in page, "the gain table is not on the landing page"
    text = re.sub(r"<[^>]+>", "", page)
    # made: the fixture's `hada prepare` ran on a fresh data folder; not recorded: it found a data folder made before
    # prepare kept a record, so it made nothing and had no time to record
    assert ("On the machine that built this site, hada prepare made them in" in text
            or "On the machine that built this site, no hada prepare was recorded" in text)
    assert "in minutes" not in text


# ------------------------------------------------------------------------------- presets with two backbones
def test_results_page_says_what_a_two_backbone_setting_leaves_out():
    """book/params/*.yaml name two backbones: the results page then shows K=2 and says K=3 needs a third."""
    import hada.book as hb
    from hada.book.tables import ResultsTable

    for preset in sorted((BOOK / "params").glob("*.yaml")):
        assert len(str(yaml.safe_load(preset.read_text())["backbones"]).split(",")) == 2, preset.name
    page = (BOOK / "05_results.md").read_text()
    assert "if len(setting.backbones) >= 3:\n    k3 = hb.results(setting, k=3)" in page
    assert "{glue:text}`k3_sentence`" in page and not re.search(r"\{glue:text\}`k3_(?!sentence)", page)

    two = type("S", (), {"backbones": ("ViT-B-16:/w/a.bin", "RN50:/w/b.bin")})()
    assert hb.three_backbones_sentence(None, two) == ("This setting names 2 backbones, so the rows with three are "
                                                       "left out: they need a third backbone in `backbones`.")

    def row(name, kind, rsum):
        return {"name": name, "kind": kind, "rsum": rsum}

    k3 = ResultsTable([row("a", "backbone", 100.0), row("b", "backbone", 120.0), row("average(a, b, c)", "average", 110.0),
                       row("concat(a, b, c) + linear", "concat", 125.0), row("HADA (K=3)", "hada", 132.0)])
    assert hb.three_backbones_sentence(k3, two) == ("With three backbones (one seed): 132.0, +10.0% over b, +20.0% "
                                                     "over averaging and +5.6% over concatenation.")


def test_shown_code_fits_the_column():
    """A shown code line is at most 80 characters: what the text column holds at 1280 px without scrolling."""
    long = [f"{page.name}: {line}" for page in PAGES for meta, code in _code_cells(page)
            if not re.search(r"remove-cell|remove-input|parameters", meta)
            for line in code.splitlines() if len(line) > 80]
    assert not long, "\n".join(long)
