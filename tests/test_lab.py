"""`make lab`: JupyterLab on book/, each MyST chapter a notebook through jupytext, run cell by cell.

The test starts the server as `make lab` does (the repository as root, .jupyter/ on the config path), headless
on a free port with a token, asks its contents API for a chapter as a notebook, and runs the chapter's first
cells on a kernel the server started, over the kernel's websocket, as JupyterLab does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (environment.yml pins it; `make install`)")
pytest.importorskip("jupyter_server", reason="jupyter_server is not installed (JupyterLab brings it)")

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "book/01_paper.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_command_of_makefile() -> str:
    """The recipe of the Makefile's `lab` target (the test starts the server the same way)."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(r"^lab:.*\n((?:\t.*\n)+)", text, re.M)
    assert m, "the Makefile has no `lab` target"
    return m.group(1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    port, token = _free_port(), uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),           # none of the user's own settings
        JUPYTER_CONFIG_PATH=str(ROOT / ".jupyter"),        # as `make lab` sets it
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        IPYTHONDIR=str(tmp / "ipython"),
        HADA_DATA=str(tmp / "data"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    env.pop("JUPYTER_TOKEN", None)
    cmd = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
        "--ServerApp.default_url=/lab/tree/book", "--KernelManager.transport_encryption=auto",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                          # test machines and containers run as root
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def get(path: str):
        req = urllib.request.Request(base + path, headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def post(path: str, body: dict):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"token {token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get("/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("the JupyterLab server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        log.flush()
        yield type("Lab", (), dict(get=staticmethod(get), post=staticmethod(post), port=port, token=token,
                                   log=tmp / "server.log"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_make_lab_starts_jupyterlab_on_book_with_the_repository_config():
    recipe = _lab_command_of_makefile()
    assert "jupyter lab" in recipe or "jupyter-lab" in recipe
    assert "JUPYTER_CONFIG_PATH" in recipe and ".jupyter" in recipe
    assert "/lab/tree/book" in recipe and "--KernelManager.transport_encryption=auto" in recipe
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme


def test_markdown_opens_in_the_jupytext_notebook_viewer(lab):
    """.jupyter/labconfig (on the config path `make lab` sets) makes a double click open a chapter as a notebook."""
    settings = lab.get("/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    viewers = settings["schema"]["properties"]["defaultViewers"]["default"]   # the overridden default
    assert viewers.get("markdown") == "Jupytext Notebook", viewers


def test_a_chapter_opens_as_a_notebook_and_runs_cell_by_cell(lab):
    model = lab.get(f"/api/contents/{CHAPTER}?type=notebook&content=1")
    assert model["type"] == "notebook" and model["format"] == "json"
    cells = model["content"]["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and "parameters" in code[0]["metadata"].get("tags", []), "the first code cell is the parameters"
    assert model["content"]["metadata"]["kernelspec"]["name"] == "python3"

    session = lab.post("/api/sessions", {"path": CHAPTER, "type": "notebook", "name": Path(CHAPTER).name,
                                         "kernel": {"name": "python3"}})
    kernel_id = session["kernel"]["id"]
    try:
        outputs = _run_cells(lab, kernel_id, [
            code[0]["source"],                                 # the chapter's parameters cell
            "import os, hada\nprint(dataset, epochs, os.path.basename(os.getcwd()), "
            "os.path.dirname(os.path.dirname(os.path.abspath(hada.__file__))))",
        ])
    finally:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{lab.port}/api/sessions/{session['id']}", method="DELETE",
            headers={"Authorization": f"token {lab.token}"}), timeout=60).close()
    words = outputs[-1].split()
    assert words[:3] == ["synthetic", "10", "book"], outputs          # the parameters ran, in book/
    assert Path(words[3]).resolve() == ROOT, outputs                  # on this checkout's hada
    assert "without encryption" not in lab.log.read_text()            # the kernel's sockets use CurveZMQ


def _run_cells(lab, kernel_id: str, sources: list[str], timeout: float = 180) -> list[str]:
    """Execute each source on the server's kernel over its websocket; the stdout of each, in order."""
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect

    async def run() -> list[str]:
        url = f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?token={lab.token}"
        ws = await websocket_connect(url)
        session = uuid.uuid4().hex
        texts = []
        try:
            for source in sources:
                msg_id = uuid.uuid4().hex
                await ws.write_message(json.dumps({
                    "header": {"msg_id": msg_id, "session": session, "username": "test", "date": "",
                               "msg_type": "execute_request", "version": "5.3"},
                    "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                    "content": {"code": source, "silent": False, "store_history": True,
                                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                }))
                out, reply, idle = [], None, False
                deadline = time.monotonic() + timeout
                while reply is None or not idle:
                    assert time.monotonic() < deadline, f"no reply to {source[:60]!r}"
                    raw = await ws.read_message()
                    assert raw is not None, "the kernel's websocket closed"
                    msg = json.loads(raw)
                    if msg.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    kind = msg["header"]["msg_type"]
                    if kind == "stream":
                        out.append(msg["content"]["text"])
                    elif kind == "error":
                        pytest.fail("a cell failed:\n" + "\n".join(msg["content"]["traceback"]))
                    elif kind == "execute_reply":
                        reply = msg["content"]
                    elif kind == "status" and msg["content"]["execution_state"] == "idle":
                        idle = True
                assert reply["status"] == "ok", reply
                texts.append("".join(out))
        finally:
            ws.close()
        return texts

    return IOLoop.current().run_sync(run, timeout=timeout * len(sources) + 30)


def test_jupyterlab_is_pinned_like_every_other_package():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*jupyterlab==\d", text, re.M)
    assert shutil.which("jupyter-lab") or (Path(sys.executable).parent / "jupyter-lab").exists()
