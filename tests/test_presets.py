"""Every page reruns with every shipped preset. Each ``book/params/*.yaml`` is pointed by ``.ci/preset_fixture.py``
(the pull-request workflow's own first step) at a miniature of its dataset: the real folder layout, the preset's own
open_clip architectures at a seeded random init in local weights files, one epoch. Then, as the README tells a user
to, ``hada prepare --params`` makes what the pages read and every page with code runs through papermill with the same
file. A page that needs more than a preset gives must say so and show what it can, so a preset and the pages cannot
drift apart. About 7 minutes on 2 cores (two pages at a time), so it has its own command, `make test-presets`, which
every pull request runs (.github/workflows/pr.yml); `make test` leaves it out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.presets

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BIN = Path(sys.executable).parent
PRESETS = sorted(p.stem for p in (BOOK / "params").glob("*.yaml"))
#: every page of the book that runs code (the landing page and the bibliography run none)
PAGES = sorted(p.stem for p in BOOK.glob("*.md") if "```{code-cell}" in p.read_text())


def _errors(notebook: Path) -> list[str]:
    """``"ename: evalue"`` of every error output in an executed notebook."""
    cells = json.loads(notebook.read_text())["cells"]
    return [f"{o['ename']}: {o['evalue']}" for c in cells if c["cell_type"] == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _tail(res: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (res.stdout + res.stderr)[-n:]


def test_every_page_with_code_is_covered():
    assert len(PAGES) >= 11 and {"01_paper", "05_results", "results_all", "real_data"} <= set(PAGES), PAGES
    assert PRESETS, "no shipped preset: the test below would prove nothing"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_page_reruns_with_the_preset(preset, tmp_path):
    import jupytext

    env = {**os.environ, "HADA_DATA": str(tmp_path / "hada-data"), "HADA_NO_PROGRESS": "1"}
    made = subprocess.run([sys.executable, str(ROOT / ".ci" / "preset_fixture.py"),
                           str(BOOK / "params" / f"{preset}.yaml"), str(tmp_path / "preset")],
                          env=env, capture_output=True, text=True)
    assert made.returncode == 0, _tail(made)
    params = tmp_path / "preset" / "params.yaml"
    prepared = subprocess.run([str(BIN / "hada"), "prepare", "--params", str(params)], env=env,
                              capture_output=True, text=True)
    assert prepared.returncode == 0, _tail(prepared)

    def rerun(page: str) -> tuple[str, subprocess.CompletedProcess, Path]:
        source, out = tmp_path / f"{page}.ipynb", tmp_path / f"{page}.out.ipynb"
        jupytext.write(jupytext.read(BOOK / f"{page}.md"), source, fmt="ipynb")
        res = subprocess.run([str(BIN / "papermill"), str(source), str(out), "-f", str(params), "--cwd", str(BOOK),
                              "--no-progress-bar"], env=env, capture_output=True, text=True)
        return page, res, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        reruns = list(pool.map(rerun, PAGES))
    failed = {page: _tail(res, 1500) for page, res, _ in reruns if res.returncode != 0}
    assert not failed, f"{preset}: pages that stopped: {failed}"
    errors = {page: _errors(out) for page, _, out in reruns if _errors(out)}
    assert not errors, f"{preset}: error outputs: {errors}"
