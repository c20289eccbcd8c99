"""A quiet build log: each warning the build printed is fixed where it comes from."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_make_ignores_no_error_it_would_print():
    """make's `-` prefix prints "make: [...] Error 1 (ignored)" into the build log; `|| true` says nothing."""
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"^\t-", makefile, re.M)


def test_the_chapters_kernels_run_on_encrypted_sockets(capfd, monkeypatch):
    """book/_ext/hada_kernels.py: the build's kernels get CurveZMQ keys, so ipykernel has no plain-TCP warning."""
    import nbclient
    import nbformat
    from jupyter_client.manager import KernelManager

    spec = importlib.util.spec_from_file_location("hada_kernels", ROOT / "book" / "_ext" / "hada_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "hada_kernels: book/_ext" in (ROOT / "_config.yml").read_text()

    trait = KernelManager.class_traits()["transport_encryption"]
    monkeypatch.setattr(trait, "default_value", trait.default_value)   # restored after the test
    assert module.encrypt_kernel_transport()
    assert KernelManager().transport_encryption == "auto"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    capfd.readouterr()
    nbclient.execute(nb)
    assert nb.cells[0].outputs[0]["text"].strip() == "42"
    assert "without encryption" not in "".join(capfd.readouterr())


def test_a_random_init_asked_for_is_not_reported_as_missing_weights(caplog):
    """open_clip warns "No pretrained weights loaded" on every random init; hada asks for one on purpose (a
    `MODEL:random` spec, pretraining from scratch), so it is filtered there, and only there."""
    import open_clip

    from hada.backbones import load_backbone
    from hada.backbones.spec import register_model_configs

    with caplog.at_level(logging.WARNING):
        load_backbone("tiny-vit:random")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    register_model_configs()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("tiny-vit", pretrained=None)                 # anyone else's call still warns
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_the_book_builds_with_warnings_as_errors():
    """`make book` and the tests' build (tests/conftest.py) fail on a warning, and list every one first."""
    makefile = (ROOT / "Makefile").read_text()
    book = re.search(r"^book:.*?(?=^\S)", makefile, re.M | re.S).group(0)
    assert re.search(r"book/_ext/hada_parallel.py build -W --keep-going book/", book), book  # jupyter-book's CLI
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert '"build", "-W", "--keep-going"' in conftest


@pytest.mark.parametrize("first", ["import hada.book", "from hada.cli import main"])
def test_importing_torch_geometric_after_hada_prints_no_deprecation_warning(first):
    """torch_geometric scripts classes with torch.jit.script on import, which torch deprecates (upstream): the
    ``hada`` package, which every chapter, command and worker imports first, filters that one warning (`hada train`
    printed it)."""
    import os
    import subprocess
    import sys

    code = f"{first}\nimport torch_geometric.nn\n"
    res = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torch.jit.script" not in res.stderr, res.stderr[-2000:]
