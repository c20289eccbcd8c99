"""Makes every chapter downloadable as a Jupyter notebook, generated from its MyST source with jupytext.

No .ipynb is committed (the chapters are MyST text); at the end of an HTML build each chapter is converted
into ``_sources/<chapter>.ipynb`` of the site, and the theme's download menu links it (``ipynb_source``). The
notebook holds inputs only, with the ``parameters`` cell tagged, so it reruns under papermill. The theme copies
the executed notebook to the same path while writing pages when launch buttons are on; this conversion runs after
it and replaces it.
"""

from __future__ import annotations

from pathlib import Path

from sphinx.application import Sphinx


def is_notebook(app: Sphinx, docname: str) -> bool:
    """A MyST notebook page: a .md source whose front matter declares a kernel (as the theme tests it)."""
    return str(app.env.doc2path(docname)).endswith(".md") and "kernelspec" in app.env.metadata.get(docname, {})


def write_notebook(source: Path, target: Path) -> None:
    """Converts one MyST chapter to .ipynb with jupytext (inputs only)."""
    import jupytext

    notebook = jupytext.read(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, target, fmt="ipynb")


def _link(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Runs before the theme builds its download menu (priority 501), which reads ``ipynb_source``."""
    if pagename in app.env.found_docs and is_notebook(app, pagename):
        context["ipynb_source"] = f"{pagename}.ipynb"


def _convert(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    for docname in sorted(app.env.found_docs):
        if is_notebook(app, docname):
            write_notebook(Path(app.env.doc2path(docname)), Path(app.outdir) / "_sources" / f"{docname}.ipynb")


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", _link, priority=500)
    app.connect("build-finished", _convert)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
