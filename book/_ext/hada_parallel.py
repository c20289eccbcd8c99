"""The chapters execute on several processes: Sphinx's parallel reading, which `jupyter-book build` does not offer.

myst-nb executes a chapter while Sphinx reads it, so reading on N processes runs N chapters' kernels at once (on 2
cores the build's execution took about a third less). `jupyter-book build` 1.x always reads on one process; run as
a script, this module is `jupyter-book` with Sphinx's `parallel` set (`make book` uses it):

    python book/_ext/hada_parallel.py --jobs 2 build book/ [jupyter-book build options]

As an extension (in `_config.yml`) it creates jupyter-cache's database in the main process before reading starts
(otherwise, on a cold build, each reading process creates its tables at once and one fails: "table settings
already exists"), and declares two extensions jupyter-book loads parallel-safe for reading, where they do not
declare it themselves and Sphinx would otherwise fall back to one process:
- ``sphinx_multitoc_numbering`` replaces the section numbering, which runs once in the main process after every
  document is read and merged;
- ``sphinx_jupyterbook_latex`` adds transforms for the LaTeX builder; in an HTML build they change nothing and keep
  no state across documents.
"""

from __future__ import annotations

import argparse
import sys

from sphinx.application import Sphinx

#: Extensions bundled by jupyter-book that are safe to read in parallel but do not say so (the module's docstring).
SAFE_UNDECLARED = ("sphinx_multitoc_numbering", "sphinx_jupyterbook_latex")


def declare_parallel_safe(app: Sphinx) -> None:
    for name in SAFE_UNDECLARED:
        extension = app.extensions.get(name)
        if extension is not None and extension.parallel_read_safe is None:
            extension.parallel_read_safe = True


def create_notebook_cache(app: Sphinx, env, docnames) -> None:
    """Open the notebook cache myst-nb executes into once here, creating its database, before any reading process
    would."""
    config = getattr(env, "mystnb_config", None)
    if config is None or config.execution_mode != "cache" or not config.execution_cache_path:
        return
    from jupyter_cache import get_cache

    get_cache(config.execution_cache_path).list_cache_records()


def setup(app: Sphinx) -> dict:
    app.connect("builder-inited", declare_parallel_safe)  # every extension is loaded by then
    app.connect("env-before-read-docs", create_notebook_cache)  # in the main process, before reading forks
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: list[str] | None = None) -> None:
    """`jupyter-book ARGS` with Sphinx reading on ``--jobs`` processes (default: ``hada prepare``'s workers)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--jobs", "-j", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    import jupyter_book.sphinx
    import jupyter_book.cli.main

    jobs = args.jobs
    if jobs is None:
        from hada.pipeline import default_jobs

        jobs = default_jobs()
    build_sphinx = jupyter_book.sphinx.build_sphinx

    def build_with_jobs(*a, **kw):
        return build_sphinx(*a, **{**kw, "jobs": max(1, jobs)})

    jupyter_book.sphinx.build_sphinx = build_with_jobs  # the CLI imports it when it builds
    sys.argv = ["jupyter-book", *rest]
    jupyter_book.cli.main.main()


if __name__ == "__main__":
    main()
