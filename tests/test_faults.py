"""The fault catalogue: every damaged file, bad input, full disk, concurrent command and changed store a user can
meet, one parametrised row each: the fault, the command, the exit code it must end with, and the line that must
appear. Nothing corrupt is ever trusted and nothing a user can fix is a traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from hada.cli import main
from hada.errors import HadaError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- integrity and bad input (issue 21)
BACKBONES = "tiny-vit:random,tiny-rn:random"
#: The smallest training the faults need: one epoch of a narrow model on the CPU.
TRAIN = ["--dataset", "synthetic", "--backbones", BACKBONES, "--epochs", "1", "--width", "16", "--out-dim", "16",
         "--heads", "2", "--head-dim", "16", "--batch-size", "16", "--queue-size", "16", "--no-itm",
         "--precision", "fp32", "--device", "cpu", "--name", "faults"]


@dataclass
class World:
    """One trained tiny run and its stores, copied for each fault so that a fault damages only its own copy."""

    data: Path  # HADA_DATA
    dataset: Path  # the tiny synthetic dataset's folder
    tmp: Path

    @property
    def run_dir(self) -> Path:
        return next((self.data / "runs").glob("faults-*"))

    def train(self, *extra: str) -> list[str]:
        return ["train", "--data-root", str(self.dataset), *TRAIN, *extra]

    def store(self, backbone: str = "tiny-vit:random", split: str = "test") -> Path:
        from hada.features.store import store_dir

        return store_dir("synthetic", backbone, split, self.data / "features")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_synthetic) -> Path:
    """A HADA_DATA with the stores of two random-weight backbones and one finished run (module-private)."""
    import hada.runs as hr

    data = tmp_path_factory.mktemp("faults-data") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HADA_DATA", str(data))
        mp.setenv("HADA_NO_PROGRESS", "1")
        world = World(data, tiny_synthetic, data.parent)
        assert main(["features", "extract", "--dataset", "synthetic", "--data-root", str(tiny_synthetic),
                     "--backbones", BACKBONES, "--device", "cpu"]) == 0
        assert main(world.train()) == 0
        hr.clear_cache()
    return data


@pytest.fixture
def world(trained, tiny_synthetic, tmp_path, monkeypatch) -> World:
    """A private copy of the trained HADA_DATA (mtimes kept), set as HADA_DATA for one fault."""
    import hada.runs as hr

    data = tmp_path / "data"
    shutil.copytree(trained, data, symlinks=True)
    monkeypatch.setenv("HADA_DATA", str(data))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    hr.clear_cache()
    yield World(data, tiny_synthetic, tmp_path)
    hr.clear_cache()


# ------------------------------------------------------------------------------------- damaging helpers
def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def weights_file(w: World, kind: str) -> str:
    """A weights file that is not tiny-vit's: text, random bytes, a junk .safetensors, or tiny-rn's weights."""
    if kind == "text":
        path = w.tmp / "notes.pt"
        path.write_text("these are not weights\n")
    elif kind == "random":
        path = w.tmp / "noise.pt"
        path.write_bytes(os.urandom(4096))
    elif kind == "junk-safetensors":
        path = w.tmp / "junk.safetensors"
        path.write_bytes(os.urandom(4096))
    else:
        import open_clip
        import torch
        from safetensors.torch import save_file

        from hada.backbones import register_model_configs

        register_model_configs()
        torch.manual_seed(0)
        model = open_clip.create_model("tiny-rn")
        path = w.tmp / "tiny-rn.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"tiny-vit:{path}"


def decompression_bomb(path: Path, side: int = 40_000) -> Path:
    """A PNG that claims ``side`` x ``side`` pixels (1.6 G: over PIL's bomb limit) in a few dozen bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def two_ids_one_file(w: World) -> Path:
    """The tiny set with its second image's entry pointing at the first image's file."""
    root = w.tmp / "shared-file"
    shutil.copytree(w.dataset, root)
    doc_path = next(root.glob("dataset_*.json"))
    doc = json.loads(doc_path.read_text())
    doc["images"][1]["filename"] = doc["images"][0]["filename"]
    doc_path.write_text(json.dumps(doc))
    return root


def unfinished(w: World) -> Path:
    """The run turned back into an unfinished one (its checkpoint kept, its metrics gone)."""
    (w.run_dir / "metrics.json").unlink()
    return w.run_dir


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@dataclass
class Fault:
    """One row of the catalogue: ``command(world)`` damages the world and returns the ``hada`` arguments."""

    name: str
    command: Callable[[World], list[str]]
    rc: int
    line: str


INTEGRITY_AND_BAD_INPUT = [
    # -- damaged or wrong files
    *[Fault(f"weights file: {kind}", lambda w, kind=kind: [
        "features", "extract", "--dataset", "synthetic", "--data-root", str(w.dataset), "--split", "test",
        "--device", "cpu", "--backbones", weights_file(w, kind)], 2, "is not a weights file of tiny-vit")
      for kind in ("text", "random", "junk-safetensors", "tiny-rn")],
    Fault("truncated checkpoint.pt of an unfinished run",
          lambda w: (truncate(unfinished(w) / "checkpoint.pt"), w.train())[1], 2, "--restart"),
    Fault("truncated best.pt under hada search",
          lambda w: (truncate(w.run_dir / "best.pt"), ["search", "--run", str(w.run_dir), "a red circle"])[1],
          2, "best.pt is damaged"),
    Fault("truncated best.pt under hada evaluate --run",
          lambda w: (truncate(w.run_dir / "best.pt"),
                     ["evaluate", "--data-root", str(w.dataset), "--backbones", BACKBONES, "--no-baselines",
                      "--device", "cpu", "--run", str(w.run_dir)])[1], 2, "best.pt is damaged"),
    Fault("garbled metrics.json of a finished run",
          lambda w: (write(w.run_dir / "metrics.json", '{"val": {"rsum": 4'), w.train())[1], 2,
          "metrics.json is damaged"),
    Fault("hada search --image on a decompression bomb",
          lambda w: ["search", "--run", str(w.run_dir), "--image", str(decompression_bomb(w.tmp / "bomb.png"))],
          2, "cannot read"),
    *[Fault(f"--lr {lr}", lambda w, lr=lr: ["train", "--lr", lr, "--print-config"], 2, line)
      for lr, line in (("nan", "lr must be a finite number"), ("-1", "lr must be in [0, 10]"),
                       ("1e30", "lr must be in [0, 10]"))],
    # -- unclear messages
    Fault("YAML `lr: 1e-3` is a float",
          lambda w: ["train", "--config", str(write(w.tmp / "c.yaml", "lr: 1e-3\n")), "--print-config"], 0,
          '"lr": 0.001'),
    Fault("malformed YAML",
          lambda w: ["train", "--config", str(write(w.tmp / "c.yaml", "model: [unclosed\n")), "--print-config"], 2,
          "is not valid yaml: line"),
    Fault("--config a folder", lambda w: ["train", "--config", str(w.tmp), "--print-config"], 2, "is a folder"),
    Fault("unknown backbone in hada train", lambda w: w.train("--backbones", "nope,tiny-rn:random"), 2,
          "unknown backbone 'nope'"),
    Fault("unknown backbone in hada evaluate",
          lambda w: ["evaluate", "--data-root", str(w.dataset), "--backbones", "nope,tiny-rn:random"], 2,
          "unknown backbone 'nope'"),
    Fault("no features: the hint keeps --data-root",
          lambda w: (shutil.rmtree(w.data / "features"), w.train())[1], 2, "hada features extract --dataset "
          "synthetic --data-root "),
    Fault("two image ids sharing one file",
          lambda w: ["data", "check", "--data-root", str(two_ids_one_file(w))], 2, "share the file"),
    Fault("a 100 KB query is echoed truncated",
          lambda w: ["search", "--run", str(w.run_dir), "--k", "1", "a red circle " * 8000], 0,
          "… (103,999 characters)"),
]


@pytest.mark.parametrize("fault", INTEGRITY_AND_BAD_INPUT, ids=lambda f: f.name)
def test_integrity_and_bad_input(fault: Fault, world: World, capsys):
    args = fault.command(world)
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == fault.rc, f"{fault.name}: rc {rc}\n{out[-2000:]}\n{err[-2000:]}"
    text = err if rc == 2 else out
    assert fault.line in text, f"{fault.name}: {text[-2000:]}"
    assert "Traceback" not in err
    if rc == 2:
        assert len([line for line in err.splitlines() if line.startswith("hada: error")]) == 1, err
        assert len(err.splitlines()[-1]) < 600 and err.strip().splitlines()[-1].startswith("hada: error"), err
    assert max(map(len, (out + err).splitlines() or [""])) < 2000  # nothing (a query, a message) echoed whole


def test_papermill_parameters_are_typed_in_the_first_cell(monkeypatch, tmp_path):
    """papermill's `-p epochs abc` reaches a chapter's first cell (:func:`hada.experiments.resolve`) as a string:
    one line naming the parameter, before any data is generated or loaded."""
    from hada import experiments

    monkeypatch.setenv("HADA_DATA", str(tmp_path / "data"))
    for params, line in (({"epochs": "abc"}, "parameter epochs must be a whole number"),
                         ({"seed": "x"}, "parameter seed"), ({"pairs_per_epoch": "many"}, "parameter pairs_per_epoch"),
                         ({"dataset": "flikr"}, "parameter dataset must be one of")):
        with pytest.raises(HadaError, match=line.replace("(", r"\(")):
            experiments.resolve(**params)
    assert not (tmp_path / "data").exists()  # nothing was made before the check
    assert experiments._whole("epochs", "3", 1) == 3
