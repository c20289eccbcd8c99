"""Puts how long ``hada prepare`` took on the machine that builds the site into the landing page.

``hada prepare`` records its wall time, processes and cores in ``data/prepare-record.json``
(``hada.pipeline.write_prepare_record``). At the start of every build this extension reads it and offers the
sentence as the MyST substitution ``{{ prepare_time }}``; read at build time, not from a cached notebook, it is
never older than the data the build reads.
"""

from __future__ import annotations

from sphinx.application import Sphinx
from sphinx.config import Config


def prepare_time() -> str:
    from hada.pipeline import prepare_phrase, read_prepare_record

    return prepare_phrase(read_prepare_record())


def _substitute(app: Sphinx, config: Config) -> None:
    config.myst_substitutions = {**(config.myst_substitutions or {}), "prepare_time": prepare_time()}


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _substitute)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
