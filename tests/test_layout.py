"""Nothing on the published site is cut off: every built page, laid out by headless Chromium in a 1280 px laptop
window and a 390 px phone, has each table, image, svg and figure of its text column either inside that column
(or inside the full-width cell it sits in) and the window, or in a container that scrolls sideways and itself
fits; and no page scrolls sideways as a whole. On the laptop, the tables that fit when the book was last looked
at stay fitting (:data:`SCROLL_AT_DESKTOP` names the ones allowed to scroll).

The unmarked tests feed the same check small pages made to fail (a 3000 px table, a wide image, a clipping
container), so a check that cannot fail would show here."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from browser import CHROMIUM, DESKTOP, PHONE, SKIP_REASON, Chromium, serve

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)

#: Pages whose tables may scroll sideways in a 1280 px window (the page's name: why). Every other page's
#: tables fit its text column there.
SCROLL_AT_DESKTOP: dict[str, str] = {}


def _pages(site: Path) -> list[str]:
    """The site's pages, less the redirects (``index.html`` only sends the reader to the landing page)."""
    return sorted(p.name for p in site.glob("*.html") if 'http-equiv="Refresh"' not in p.read_text()[:2000])


def _check(site: Path, pages: list[str], widths=(DESKTOP, PHONE)) -> dict[tuple[str, int], dict]:
    with serve(site) as base, Chromium() as browser:
        found = {}
        for name in pages:
            for width in widths:
                browser.open(f"{base}/{name}", width)
                found[name, width] = browser.layout_problems()
    return found


# ---------------------------------------------------------------------------------------------------------
# The check itself, on pages made to fail (a few seconds)

PAGE = """<!doctype html><html><head><meta name="viewport" content="width=device-width, initial-scale=1">
<style>body {{ margin: 0; }} article {{ width: 600px; margin: 0 20px; }}</style></head>
<body><article class="bd-article"><p>text</p>{body}</article></body></html>"""

WIDE_TABLE = '<table style="width: 3000px"><tr><td>a</td><td>b</td></tr></table>'
CASES = {
    "wide_table.html": (WIDE_TABLE, "sticks out"),
    "wide_image.html": ('<img style="display: block" width="900" height="40" src="data:image/gif;base64,'
                        'R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7">', "sticks out"),
    "clipped_table.html": (f'<div style="overflow-x: hidden">{WIDE_TABLE}</div>', "clipped"),
    "scroller_too_wide.html": (f'<div style="overflow-x: auto; width: 1500px">{WIDE_TABLE}</div>', "itself sticks out"),
    "scrolled_table.html": (f'<div style="overflow-x: auto">{WIDE_TABLE}</div>', None),
    "narrow_table.html": ('<table><tr><td>a</td><td>b</td></tr></table><svg width="100" height="20"></svg>', None),
}


@pytest.fixture(scope="module")
def made_pages(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("layout-site")
    for name, (body, _) in CASES.items():
        (site / name).write_text(PAGE.format(body=body))
    return site


@needs_chromium
def test_the_check_finds_what_sticks_out_and_passes_what_scrolls(made_pages):
    found = _check(made_pages, sorted(CASES), widths=(DESKTOP,))
    for name, (_, expected) in CASES.items():
        problems = found[name, DESKTOP]["problems"]
        element_problems = [p for p in problems if "scrolls sideways" not in p]
        if expected is None:
            assert not problems, f"{name}: {problems}"
        else:
            assert any(expected in p for p in element_problems), f"{name}: expected '{expected}', got {problems}"
    assert any("page scrolls sideways" in p for p in found["wide_table.html", DESKTOP]["problems"])
    assert found["scrolled_table.html", DESKTOP]["scrolled"], "a scrolling table is reported as scrolling"
    assert not found["narrow_table.html", DESKTOP]["scrolled"]


# ---------------------------------------------------------------------------------------------------------
# The built site (shares the one book build of tests/conftest.py)


@pytest.mark.book
@needs_chromium
def test_no_table_or_figure_is_cut_off_at_laptop_or_phone_width(built_html):
    start = time.monotonic()
    pages = _pages(built_html)
    assert "intro.html" in pages and "05_results.html" in pages
    found = _check(built_html, pages)
    failures = [f"{name} at {width} px: {p}" for (name, width), r in found.items() for p in r["problems"]]
    failures += [f"{name} at {width} px: a table scrolls sideways where the page has room for it: {s}"
                 for (name, width), r in found.items() if width == DESKTOP and name not in SCROLL_AT_DESKTOP
                 for s in r["scrolled"]]
    assert not failures, "\n".join(failures)
    assert time.monotonic() - start < 120, "the layout check is meant to take well under a minute"
