"""Computing apart from presenting: no module that computes imports the book, the command line or the chapters'
orchestration, at module level or inside a function, and no import circle exists anywhere in the package."""

from __future__ import annotations

from pathlib import Path

import hada
from hada.codegraph import cycles, import_closure, import_graph

PACKAGE = Path(hada.__file__).resolve().parent
GRAPH = import_graph(PACKAGE)

#: What shows or schedules results: the book, the command line, the entry point, and the orchestration of a
#: chapter's runs (``experiments``, ``pipeline``), which may call everything below them.
PRESENTATION = ("hada.book", "hada.cli", "hada.__main__")
ORCHESTRATION = ("hada.experiments", "hada.pipeline")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_imports_inside_functions():
    assert "hada.book.views" in GRAPH["hada.book"]  # imported inside hada.book's functions only
    assert "hada.train" in GRAPH["hada.runs"]


def test_no_computing_module_imports_presentation_or_orchestration():
    computing = [m for m in GRAPH if not _within(m, PRESENTATION + ORCHESTRATION)]
    assert {"hada.train", "hada.losses", "hada.attention", "hada.search", "hada.features.store"} <= set(computing)
    wrong = {m: sorted(t for t in GRAPH[m] if _within(t, PRESENTATION + ORCHESTRATION)) for m in computing}
    assert not {m: t for m, t in wrong.items() if t}


def test_orchestration_does_not_import_presentation():
    wrong = {m: sorted(t for t in GRAPH[m] if _within(t, PRESENTATION)) for m in GRAPH if _within(m, ORCHESTRATION)}
    assert not {m: t for m, t in wrong.items() if t}


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_result_code_reaches_no_presentation():
    from hada.runs import RESULT_ENTRY_POINTS

    closure = import_closure(RESULT_ENTRY_POINTS, GRAPH)
    assert {"hada.losses", "hada.model.encoder", "hada.train", "hada.metrics"} <= closure
    assert not [m for m in closure if _within(m, PRESENTATION + ORCHESTRATION)]
