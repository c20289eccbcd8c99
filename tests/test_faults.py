"""The fault catalogue: every damaged file, bad input, full disk, concurrent command and changed store a user can
meet, one parametrised row each: the fault, the command, the exit code it must end with, and the line that must
appear. Nothing corrupt is ever trusted and nothing a user can fix is a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager
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
         "--precision", "fp32", "--device", "cpu", "--seed", "0"]


def _seed(run_dir: Path) -> int | None:
    """The seed a run folder was trained with (None while its config is not written yet)."""
    config = run_dir / "config.json"
    return json.loads(config.read_text())["seed"] if config.exists() else None


@dataclass
class World:
    """One trained tiny run and its stores, copied for each fault so that a fault damages only its own copy."""

    data: Path  # HADA_DATA
    dataset: Path  # the tiny synthetic dataset's folder
    tmp: Path

    @property
    def run_dir(self) -> Path:
        return next(p for p in (self.data / "runs").glob("hada-k2-*") if _seed(p) == 0)

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


def _foreign_checkpoint(path: Path) -> None:
    """A readable checkpoint whose model tensors are of other shapes (another run's file copied over this one)."""
    import torch

    state = torch.load(path, weights_only=True)
    state["model"] = {k: torch.zeros(3) for k in state["model"]}
    torch.save(state, path)


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
    Fault("checkpoint.pt of an unfinished run holding another model's tensors",
          lambda w: (_foreign_checkpoint(unfinished(w) / "checkpoint.pt"), w.train())[1], 2, "--restart"),
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


# -- two identical commands at once
def test_two_identical_writers_do_not_collide(tmp_path):
    """Every atomic write has its own temporary name: two writers of one file never rename each other's half-written
    file (a fixed ``.tmp`` name gave FileNotFoundError in one of two identical `hada train`)."""
    import threading

    import torch

    from hada.io import torch_save, write_json

    target_json, target_pt = tmp_path / "manifest.json", tmp_path / "checkpoint.pt"
    start, errors = threading.Barrier(4), []

    def writer(save, target, value):
        start.wait()
        try:
            for _ in range(40):
                save(value, target)
        except Exception as exc:  # noqa: BLE001 - any collision is the failure
            errors.append(exc)

    rows, weights = {"rows": list(range(2000))}, {"w": torch.ones(9000)}
    jobs = [threading.Thread(target=writer, args=(lambda v, p: write_json(p, v), target_json, rows)) for _ in range(2)]
    jobs += [threading.Thread(target=writer, args=(torch_save, target_pt, weights)) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert not errors, errors
    assert json.loads(target_json.read_text())["rows"][-1] == 1999
    assert torch.load(target_pt, weights_only=True)["w"].sum() == 9000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "manifest.json"]  # no .tmp left


def _hada(*args: str, env: dict) -> "subprocess.Popen":
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "hada", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _together(commands: list[list[str]], data: Path) -> list[tuple[int, str, str]]:
    """Start the commands at once (each its own process, sharing HADA_DATA) and wait for all."""
    env = {**os.environ, "HADA_DATA": str(data), "HADA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [_hada(*c, env=env) for c in commands]
    return [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]


@contextmanager
def holding_lock(folder: Path):
    """Hold the lock of a run folder or store, as a first command writing it would."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _both_wait_then_one_writes(cmd: list[str], data: Path, folder: Path, tmp: Path) -> list[tuple[int, str]]:
    """Two identical commands started together while ``folder`` is locked: both must say they wait; once the lock is
    released one writes and the other reuses. Returns (rc, stdout + stderr) of each."""
    import subprocess
    import time

    env = {**os.environ, "HADA_DATA": str(data), "HADA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    logs = [tmp / f"cmd{i}.log" for i in range(2)]
    with holding_lock(folder):
        procs = [subprocess.Popen([sys.executable, "-m", "hada", *cmd], env=env, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT) for log in logs]
        deadline = time.monotonic() + 300
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
            assert time.monotonic() < deadline
            time.sleep(0.1)
    return [(p.wait(timeout=600), log.read_text()) for p, log in zip(procs, logs)]


def test_identical_train_commands_wait_for_the_run_and_reuse_it(world):
    from hada.cli import build_parser
    from hada.cli.train import config_from_args
    from hada.runs import run_folder

    cmd = world.train("--seed", "8")
    folder = run_folder(config_from_args(build_parser().parse_args(cmd)).resolved())
    (rc1, out1), (rc2, out2) = _both_wait_then_one_writes(cmd, world.data, folder, world.tmp)
    assert rc1 == 0 and rc2 == 0, (out1[-3000:], out2[-3000:])
    assert "waiting for another process that is writing this run" in out1
    assert out1.splitlines()[-4:] == out2.splitlines()[-4:]  # the same metrics
    assert len(json.loads((folder / "history.json").read_text())) == 1  # trained once


def test_identical_extract_commands_wait_for_the_store_and_reuse_it(world, tiny_synthetic):
    shutil.rmtree(world.data / "features")
    cmd = ["features", "extract", "--dataset", "synthetic", "--data-root", str(tiny_synthetic), "--backbones",
           "tiny-vit:random", "--split", "test", "--device", "cpu"]
    folder = world.store(split="test")
    (rc1, out1), (rc2, out2) = _both_wait_then_one_writes(cmd, world.data, folder, world.tmp)
    assert rc1 == 0 and rc2 == 0, (out1[-3000:], out2[-3000:])
    assert "waiting for another process that is writing the feature store" in out1
    assert out1.splitlines()[-1] == out2.splitlines()[-1]
    assert main(["features", "verify", "--dataset", "synthetic", "--data-root", str(tiny_synthetic),
                 "--backbones", "tiny-vit:random", "--split", "test"]) == 0


def test_two_identical_train_commands_started_together(world):
    """The second waits on the run folder's lock, then reuses the first one's run: same numbers, one folder."""
    cmd = world.train("--seed", "7")
    results = _together([cmd, cmd], world.data)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert results[0][1].splitlines()[-4:] == results[1][1].splitlines()[-4:]  # the same metrics table
    runs = [r for r in (world.data / "runs").glob("hada-k2-*") if r.is_dir() and _seed(r) == 7]
    assert len(runs) == 1
    assert not [p for p in (world.data / "runs").rglob("*.tmp")]


def test_two_identical_extract_commands_started_together(world, tiny_synthetic):
    """Two extractions of the same new store: one extracts, the other waits and reuses it; the store verifies."""
    shutil.rmtree(world.data / "features")
    cmd = ["features", "extract", "--dataset", "synthetic", "--data-root", str(tiny_synthetic), "--backbones",
           "tiny-vit:random", "--split", "test", "--device", "cpu"]
    for rc, out, err in _together([cmd, cmd], world.data):
        assert rc == 0, err[-3000:]
    assert main(["features", "verify", "--dataset", "synthetic", "--data-root", str(tiny_synthetic),
                 "--backbones", "tiny-vit:random", "--split", "test"]) == 0
    assert not [p for p in (world.data / "features").rglob("*.tmp")]


# -- a full disk
def _enospc_after(monkeypatch, name_part: str):
    """Every cached write whose name holds ``name_part`` writes half its bytes, then finds the disk full."""
    import errno

    import hada.io as io

    real = io._write_file

    def full(path, data):
        if name_part not in path.name:
            return real(path, data)
        with open(path, "wb") as f:
            f.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io, "_write_file", full)


@pytest.mark.parametrize("victim", ["checkpoint.pt", "best.pt", "history.json"])
def test_a_full_disk_while_training_is_one_line_and_a_rerun_continues(world, monkeypatch, capsys, victim):
    cmd = world.train("--seed", "11")
    _enospc_after(monkeypatch, victim)
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk of" in err and f"writing {victim} needs" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not [p for p in world.data.rglob("*.tmp")]  # nothing half written is left behind
    monkeypatch.undo()
    monkeypatch.setenv("HADA_DATA", str(world.data))
    assert main(cmd) == 0  # space freed: the rerun finishes


def test_free_space_is_checked_before_a_store_is_allocated(world, monkeypatch, capsys, tiny_synthetic):
    import hada.io as io

    shutil.rmtree(world.data / "features")
    monkeypatch.setattr(io, "free_bytes", lambda folder: 10_000)
    assert main(["features", "extract", "--dataset", "synthetic", "--data-root", str(tiny_synthetic),
                 "--backbones", "tiny-vit:random", "--split", "test", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space for the feature store synthetic/tiny-vit" in err and "10.0 KB is free" in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in world.data.rglob("*.npy")]  # nothing allocated


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_small_filesystem_gives_one_line_not_sigbus(tmp_path, tiny_synthetic):
    """A real 2 MB tmpfs: extraction stops before allocating (one line, exit 2), never in SIGBUS (rc 135)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this container may not mount a tmpfs")
    try:
        cmd = ["features", "extract", "--dataset", "synthetic", "--data-root", str(tiny_synthetic), "--backbones",
               "tiny-vit:random", "--split", "train", "--device", "cpu"]
        (rc, out, err), = _together([cmd], mount / "data")
        assert rc == 2, (rc, err[-3000:])
        assert "disk space" in err and "Traceback" not in err, err
        assert not [p for p in mount.rglob("*.tmp")]
    finally:
        subprocess.run(["umount", str(mount)])


# -- a store whose bytes changed after it was written
def overwrite_rows(store: Path, name: str = "image_embeds.npy", rows=range(3, 8)) -> None:
    """Rows ``rows`` of an array overwritten with row 0, the file's modification time set back as it was."""
    import numpy as np

    f = store / name
    st = f.stat()
    arr = np.load(f, mmap_mode="r+")
    arr[list(rows)] = arr[0]
    arr.flush()
    del arr
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns


def _evaluate(w: World) -> list[str]:
    return ["evaluate", "--data-root", str(w.dataset), "--backbones", BACKBONES, "--device", "cpu", "--out",
            str(w.tmp / "eval")]


CHANGED_STORES = [
    Fault("store rows overwritten, mtime restored: hada evaluate",
          lambda w: (overwrite_rows(w.store()), _evaluate(w))[1], 2,
          "image_embeds.npy does not hold the bytes it was written with"),
    Fault("store rows overwritten, mtime restored: hada train",
          lambda w: (overwrite_rows(w.store(split="train"), "image_tokens.npy"), w.train("--seed", "5"))[1], 2,
          "image_tokens.npy does not hold the bytes"),
    Fault("store rows overwritten, mtime restored: hada search",
          lambda w: (overwrite_rows(w.store()), ["search", "--run", str(w.run_dir), "a red circle"])[1], 2,
          "does not hold the bytes it was written with"),
]


@pytest.mark.parametrize("fault", CHANGED_STORES, ids=lambda f: f.name)
def test_a_changed_store_is_never_used_silently(fault: Fault, world: World, capsys):
    test_integrity_and_bad_input(fault, world, capsys)


def test_a_store_changed_after_this_process_verified_it_is_hashed_again(world: World, capsys):
    """A process that has read a store and a file changed under it later (mtime restored): refused, and once the
    intact file is back (``cp -p``) the numbers are the intact ones, not a cache computed from damaged bytes."""
    store = world.store()
    backup = world.tmp / "image_embeds.npy"
    shutil.copy2(store / "image_embeds.npy", backup)
    assert main(_evaluate(world)) == 0
    intact = capsys.readouterr().out
    overwrite_rows(store)
    assert main(_evaluate(world)) == 2
    assert "does not hold the bytes" in capsys.readouterr().err
    shutil.copy2(backup, store / "image_embeds.npy")
    assert main(_evaluate(world)) == 0
    assert capsys.readouterr().out == intact


# -- a run is named by what it computed from, not where its files are
def _fake_embedded(data: Path) -> None:
    """``tiny-vit`` and ``tiny-rn`` as if pretrained: random seeded weights where the embedded backbones live."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from hada.backbones import register_model_configs
    from hada.backbones.spec import RECORD_FILE, WEIGHTS_FILE

    register_model_configs()
    for seed, name in enumerate(("tiny-vit", "tiny-rn")):
        folder = data / "backbones" / name
        folder.mkdir(parents=True)
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / RECORD_FILE).write_text("{}")


def test_moving_the_data_folder_retrains_nothing(tmp_path, tiny_synthetic, monkeypatch, capsys):
    """Embedded backbones, their weights and the dataset all under HADA_DATA: after `mv data elsewhere` the same
    command finds the same run, and the same settings extracted afresh in another folder give the same run key
    (it covers the weights' and stores' content, not their paths or extraction times)."""
    import hada.runs as hr

    first = tmp_path / "a" / "data"
    shutil.copytree(tiny_synthetic, first / "synthetic")
    _fake_embedded(first)
    monkeypatch.setenv("HADA_DATA", str(first))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    train = ["train", "--backbones", "tiny-vit,tiny-rn", *TRAIN[4:]]
    assert main(["features", "extract", "--backbones", "tiny-vit,tiny-rn", "--device", "cpu"]) == 0
    assert main(train) == 0
    runs = sorted(p.name for p in (first / "runs").iterdir() if p.is_dir())
    capsys.readouterr()
    moved = tmp_path / "b" / "moved-data"
    moved.parent.mkdir()
    shutil.move(first, moved)
    monkeypatch.setenv("HADA_DATA", str(moved))
    hr.clear_cache()
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "is already trained" in out, out
    assert sorted(p.name for p in (moved / "runs").iterdir() if p.is_dir()) == runs
    fresh = tmp_path / "c" / "data"  # the same settings extracted afresh elsewhere: the same stores, the same key
    shutil.copytree(tiny_synthetic, fresh / "synthetic")
    _fake_embedded(fresh)
    monkeypatch.setenv("HADA_DATA", str(fresh))
    hr.clear_cache()
    assert main(["features", "extract", "--backbones", "tiny-vit,tiny-rn", "--device", "cpu"]) == 0
    assert main(train) == 0
    assert sorted(p.name for p in (fresh / "runs").iterdir() if p.is_dir()) == runs


def test_prepare_says_the_disk_the_stores_need_before_it_starts(hada_data, tiny_synthetic):
    from hada.experiments import resolve
    from hada.pipeline import disk_line, store_bytes_needed

    setting = resolve(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random")
    need = store_bytes_needed(setting)
    assert 1e6 < need < 1e8  # two tiny backbones on the tiny set: megabytes
    line = disk_line(setting)
    assert line.startswith("disk: the feature stores need at most") and str(hada_data / "features") in line


def test_two_identical_prepare_commands_started_together(tmp_path, tiny_synthetic, monkeypatch):
    """`hada prepare --no-runs` twice at once (it collided on augment/manifest.json.tmp): both finish, and every
    store, augmented views included, verifies."""
    data = tmp_path / "data"
    cmd = ["prepare", "--no-runs", "--data-root", str(tiny_synthetic), "--backbones", "tiny-vit:random,tiny-rn:random",
           "--jobs", "1", "--device", "cpu"]
    for rc, out, err in _together([cmd, cmd], data):
        assert rc == 0, err[-3000:]
        assert "disk: the feature stores need at most" in out
    assert not [p for p in data.rglob("*.tmp")]
    augmented = [p for p in (data / "features").rglob("augment/manifest.json")]
    assert augmented and all(json.loads(p.read_text())["complete"] for p in augmented)
    monkeypatch.setenv("HADA_DATA", str(data))
    assert main(["features", "verify", "--dataset", "synthetic", "--data-root", str(tiny_synthetic),
                 "--backbones", "tiny-vit:random,tiny-rn:random"]) == 0


REPO = Path(__file__).resolve().parents[1]


# ---- at scale (issue 20)
# What the first GPU and torchrun runs would hit, reproduced on the CPU: gloo ranks, the tiled attention path,
# a mocked torch.cuda. Each test failed before its fix.

def _scale_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scale_one_backbone_model(gnn: str = "gatv2"):
    """A small HADA encoder over one backbone (K=1) and a ragged batch for it (sample 1 keeps only its CLS)."""
    import torch

    from hada.config import ModelConfig
    from hada.model.encoder import FeatureDims, HadaEncoder, ModalityBatch

    torch.manual_seed(0)
    model = HadaEncoder(ModelConfig(width=16, out_dim=8, heads=2, dropout=0.0, gnn=gnn),
                        FeatureDims.same((12,), (6,)))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 1, 3, 5, 2])
    valid = torch.arange(6)[None, :, None] < lengths[:, None, None]
    batch = ModalityBatch([torch.randn(5, 6, 12, generator=g) * valid], [lengths], [torch.randn(5, 6, generator=g)])
    return model, batch


@pytest.mark.parametrize("chunk", [24, 1 << 18])
def test_scale_one_backbone_on_the_tiled_path_equals_pyg_forward_and_backward(monkeypatch, chunk):
    """K=1 on the tiled GATv2 scores (every CUDA run, and CPU attention dropout): the backward summed the K
    targets' gradients from ga[:, 1], which K=1 lacks (IndexError)."""
    import torch

    import hada.model.fast.dense as dense

    monkeypatch.setattr(dense, "FUSED_CPU_ATTENTION", False)
    monkeypatch.setattr(dense, "GATV2_CHUNK_ELEMENTS", chunk)
    model, batch = _scale_one_backbone_model()
    out, grads = {}, {}
    for backend in ("dense", "pyg"):
        model.zero_grad()
        out[backend] = model(batch, backend=backend)
        out[backend].pow(3).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out["dense"], out["pyg"], atol=1e-5, rtol=1e-5)
    for name, g in grads["dense"].items():
        torch.testing.assert_close(g, grads["pyg"][name], atol=1e-5, rtol=1e-4, msg=name)


def _scale_toy_stores(monkeypatch, tmp_path):
    """Every run's stores replaced by toy splits (backbones toy0, toy1), HADA_DATA in tmp_path, caches emptied."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.toy_features import use_toy_stores

    return use_toy_stores(monkeypatch, tmp_path)


def _scale_tiny(recipe_name: str = "paper", **kw):
    from hada.config import recipe

    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=8, epochs=1, batch_size=16,
                queue_size=32, eval_batch_size=64, augment_p=0.0, lr=1e-3, device="cpu")
    return recipe(recipe_name).override(**{**base, **kw})


def test_scale_the_paper_recipe_holds_one_copy_of_each_split(monkeypatch, tmp_path):
    """Global token statistics: run_experiment built every split with per-backbone statistics and cached it, and
    the trainer built a second copy with the global ones (6 copies alive during training, against 3)."""
    import gc
    import weakref

    import hada.train as ht
    from hada.features.batching import FeatureData
    from hada.runs import run_experiment

    _scale_toy_stores(monkeypatch, tmp_path)
    made = []
    init = FeatureData.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    alive = []
    epoch = ht._train_epoch

    def counting(run, *a, **k):
        gc.collect()
        alive.append(sum(r() is not None for r in made))
        return epoch(run, *a, **k)

    monkeypatch.setattr(FeatureData, "__init__", tracked)
    monkeypatch.setattr(ht, "_train_epoch", counting)
    run_experiment(_scale_tiny(), progress=False, log=lambda line: None)
    assert alive == [3]


class _ScaleReached(Exception):
    """Raised where a test has seen what it came for (the training loop's device)."""


def test_scale_device_cuda_1_reaches_the_training_loop(monkeypatch, tmp_path):
    """``--device cuda:1``: the run's configuration keeps only the device's type, and training resolved "cuda"
    again, to cuda:0. CUDA is mocked (two devices); the test stops where the training loop receives its data."""
    import torch

    import hada.runs as hr
    import hada.train as ht
    from hada.cli import main

    _scale_toy_stores(monkeypatch, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    seen = {}

    class Shared:  # what run_experiment hands the trainer, without touching a GPU
        def __init__(self, device):
            self.device = device

    monkeypatch.setattr(hr, "shared_data", lambda config, split, stats=None, device=None:
                        seen.setdefault("shared", []).append(device) or Shared(device))

    def load_data(config, run_dir, data, device):
        seen["train"] = device
        raise _ScaleReached

    monkeypatch.setattr(ht, "_load_data", load_data)
    with pytest.raises(_ScaleReached):
        main(["train", "--backbones", "toy0,toy1", "--epochs", "1", "--device", "cuda:1"])
    assert seen["train"] == torch.device("cuda", 1)
    assert set(seen["shared"]) == {torch.device("cuda", 1)}


def test_scale_book_device_cuda_1_reaches_every_training_step(monkeypatch):
    """A chapter's ``device: cuda:1`` (papermill ``-p device cuda:1``, ``hada prepare --device cuda:1``): each
    training step ``hada prepare`` hands a worker named "cuda" (the resolved config keeps only the type), so the
    book's runs trained on cuda:0. CUDA is mocked (two devices); the steps are built, none is run."""
    import dataclasses

    import torch

    from hada.experiments import resolve
    from hada.pipeline import book_steps

    setting = resolve()  # the embedded default, on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    steps = [s for s in book_steps(dataclasses.replace(setting, device="cuda:1")) if s.name.startswith("train ")]
    assert steps
    for step in steps:  # _train(config, name) or _train_second_stage(first, first_name, second, name)
        devices = {a["device"] for a in step.args if isinstance(a, dict)}
        assert devices == {"cuda:1"}, (step.name, devices)
    assert "auto" not in {s.args[0]["model"]["precision"] for s in steps}  # resolved, as a worker trains it


def _scale_toy_open(config, split):
    """The same toy stores in every process (deterministic by split)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures.toy_features import toy_splits

    seeds = {"train": 0, "val": 1, "test": 2}
    return toy_splits(n_images=24 if split == "train" else 20, seed=seeds[split])[: len(config.data.backbones)]


def _scale_lavis_worker(rank: int, world: int, port: int, root: str) -> None:
    """One gloo rank training the tiny lavis recipe: one epoch before mixing, one after."""
    import hada.train as ht

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HADA_DATA=str(Path(root) / "data"), HADA_NO_PROGRESS="1")
    ht.open_splits = _scale_toy_open
    config = _scale_tiny("lavis", mix_from_epoch=1, epochs=2, batch_size=8)
    result = ht.train(config, Path(root) / "lavis")
    assert result is not None and len(result.history) == 2


def test_scale_lavis_trains_through_its_pre_mix_epochs_under_ddp(tmp_path):
    """Before ``mix_from_epoch`` the mix weight gets no gradient; DDP (find_unused_parameters=False) died at the
    second step ("Expected to have finished reduction in the prior iteration")."""
    import json

    import torch

    torch.multiprocessing.spawn(_scale_lavis_worker, args=(2, _scale_free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    history = json.loads((tmp_path / "lavis" / "history.json").read_text())
    assert [h["mix_weight"] for h in history][0] == 0.0 and history[1]["mix_weight"] > 0.0


_SCALE_HELD_BACK = """
import os, sys, time
import hada.features.store as store

images = store._extract_images


def held_back(*args, **kwargs):  # rank 1 finishes its images 3 s after rank 0
    out = images(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        time.sleep(3)
    return out


store._extract_images = held_back
from hada.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_scale_sharded_extraction_with_a_rank_held_back_equals_one_process(tiny_synthetic, tmp_path, monkeypatch):
    """Each rank derived its share of the captions from the others' live progress files: with rank 1 three
    seconds behind, caption rows stayed zero and the manifest said complete."""
    import json

    from hada.cli import main
    from hada.features.store import store_dir

    spec = "tiny-vit:random"
    args = ["features", "extract", "--data-root", str(tiny_synthetic), "--backbones", spec, "--split", "val",
            "--device", "cpu", "--jobs", "0", "--image-batch", "8", "--text-batch", "16"]
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "one"))
    assert main(args) == 0
    script = tmp_path / "held_back.py"
    script.write_text(_SCALE_HELD_BACK)
    env = {**os.environ, "HADA_DATA": str(tmp_path / "two"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if "error" in line.lower())[-3000:]
    stores = {n: store_dir("synthetic", spec, "val", tmp_path / n / "features") for n in ("one", "two")}
    assert json.loads((stores["two"] / "manifest.json").read_text())["complete"]
    for f in sorted(stores["one"].glob("*.npy")):
        assert (stores["two"] / f.name).read_bytes() == f.read_bytes(), f.name


def test_scale_finish_refuses_a_store_with_rows_never_written(tmp_path):
    """The last line of defence: rows that no progress file records are a HadaError, not a complete store."""
    from hada.errors import HadaError
    from hada.features import progress as rowlog
    from hada.features.store import _finish

    request = {"n_images": 20, "n_captions": 100, "batch": {"images": 8, "captions": 16}}
    first = rowlog.RankProgress(tmp_path, 0)
    first.add("images", 0, 20)
    first.add("captions", 0, 48)
    first.save()
    second = rowlog.RankProgress(tmp_path, 1)
    second.add("captions", 72, 100)
    second.save()
    with pytest.raises(HadaError, match="captions rows 48-71"):
        _finish(tmp_path, request)
    assert not (tmp_path / "manifest.json").exists()


def _scale_seeds_worker(rank: int, world: int, port: int, root: str) -> None:
    """One gloo rank: notes its torch RNG state at its first hard-negative draw, trains the tiny paper recipe two
    epochs in one call, then the same run again stopped after one epoch and resumed."""
    import hashlib

    import torch

    import hada.losses as hl
    import hada.train as ht

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HADA_DATA=str(Path(root) / "data"), HADA_NO_PROGRESS="1")
    ht.open_splits = _scale_toy_open
    draw = hl.sample_hard_negatives

    def noted(*args):
        state = Path(root) / f"rng-{rank}"
        if not state.exists():
            state.write_text(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        return draw(*args)

    hl.sample_hard_negatives = noted
    config = _scale_tiny("paper", epochs=2, batch_size=8, dropout=0.3)
    ht.train(config, Path(root) / "whole")
    assert ht.train(config, Path(root) / "resumed", max_epochs_this_call=1) is None
    ht.train(config, Path(root) / "resumed")


def test_scale_ranks_draw_their_own_dropout_and_negatives_and_resume_to_the_bit(tmp_path):
    """Every rank had one torch stream from the same seed: the ranks repeated each other's dropout masks and
    hard-negative draws. Now each step's seed is a function of (seed, rank, step)."""
    import json

    import torch

    torch.multiprocessing.spawn(_scale_seeds_worker, args=(2, _scale_free_port(), str(tmp_path)), nprocs=2,
                                join=True)
    assert (tmp_path / "rng-0").read_text() != (tmp_path / "rng-1").read_text()
    whole, resumed = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=False) for n in ("whole", "resumed"))
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    histories = [json.loads((tmp_path / n / "history.json").read_text()) for n in ("whole", "resumed")]
    assert [h["loss"] for h in histories[0]] == [h["loss"] for h in histories[1]]


def test_scale_an_unfinished_store_resumes_only_on_its_device_and_precision(tiny_synthetic, tmp_path, monkeypatch):
    """A store started on the CPU (float32) and resumed on CUDA (bfloat16 autocast) mixed the two kinds of rows;
    the manifest now records both, and resuming under others is one line."""
    import json

    import hada.features.store as store
    from hada.backbones import load_backbone
    from hada.data.datasets import load_dataset
    from hada.errors import HadaError

    spec, root = "tiny-vit:random", tmp_path / "features"
    backbone, dataset = load_backbone(spec), load_dataset("synthetic", tiny_synthetic)
    options = dict(image_batch=8, text_batch=16, progress=False, checkpoint_seconds=0)
    with pytest.raises(store._Stop):
        store.extract_split(backbone, dataset, "val", spec, root, _stop_after_batches=2, **options)
    manifest = json.loads((store.store_dir("synthetic", spec, "val", root) / "manifest.json").read_text())
    assert manifest["compute"] == {"device": "cpu", "dtype": "float32"}
    monkeypatch.setattr(store, "compute_record", lambda b: {"device": "cuda", "dtype": "bfloat16"})
    with pytest.raises(HadaError, match="started on cpu in float32") as err:
        store.extract_split(backbone, dataset, "val", spec, root, **options)
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.undo()
    assert store.extract_split(backbone, dataset, "val", spec, root, **options).manifest["complete"]


def test_scale_features_placed_by_free_memory_in_three_tiers(monkeypatch):
    """Placement compared a split with half the card's *total* memory, and anything above 4 GB went to the
    memmap rather than to pinned host memory. Now: free GPU memory, then available host memory, then the memmap;
    free memory mocked (no GPU is touched)."""
    from types import SimpleNamespace

    import torch

    import hada.features.batching as batching

    monkeypatch.delenv("HADA_DEVICE_RESIDENT_MB", raising=False)
    monkeypatch.delenv("HADA_RESIDENT_MB", raising=False)
    cuda = torch.device("cuda", 1)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: asked.append(device) or (8 * 10**9, 80 * 10**9))
    monkeypatch.setattr(batching, "_host_available", lambda: 100 * 10**9)
    tiers = {size: batching._placement(size, cuda, None) for size in (3 * 10**9, 30 * 10**9, 74 * 10**9)}
    assert tiers == {3 * 10**9: "device", 30 * 10**9: "memory", 74 * 10**9: "memmap"}
    assert asked and all(d == cuda for d in asked)  # the run's own card
    data = {split: SimpleNamespace(where=lambda p=p, s=s: batching.where(p, cuda, s))
            for split, p, s in (("train", "device", 3 * 10**9), ("val", "memory", 30 * 10**9),
                                ("test", "memmap", 74 * 10**9))}
    assert batching.placement_line(data) == ("token features: train on cuda:1 (3.0 GB), val in pinned host memory "
                                              "(30.0 GB), test memory-mapped from the store (74.0 GB)")


#: Tensor methods that wait for the device when the tensor lives on a GPU (each call a host synchronisation).
_SCALE_SYNCS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "cpu", "numpy", "nonzero")


def _scale_count_syncs(monkeypatch, counts: list) -> None:
    """Count, per training step, the calls that synchronise with a GPU: the methods above, boolean-mask indexing
    (a hidden nonzero) and torch.cuda.synchronize. ``counts`` receives one {name: calls} per step."""
    import torch

    import hada.train as ht

    live = {"on": None}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            if live["on"] is not None:
                live["on"][name] = live["on"].get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    def masked(name, fn):
        def wrapper(self, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if live["on"] is not None and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                live["on"][name] = live["on"].get(name, 0) + 1
            return fn(self, index, *rest)
        return wrapper

    for name in _SCALE_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, masked(f"mask {name}", getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    step = ht._train_step

    def counting_step(*args, **kwargs):
        live["on"] = {}
        try:
            return step(*args, **kwargs)
        finally:
            counts.append(live["on"])
            live["on"] = None

    monkeypatch.setattr(ht, "_train_step", counting_step)


def test_scale_at_most_two_host_syncs_per_training_step(monkeypatch, tmp_path):
    """The published recipe's step on the path a GPU takes (tiled attention, not the CPU's numba kernels), with
    every call that would wait for the GPU counted: 25 per step before (16 of them the encoders' length checks)."""
    import hada.model.fast.dense as dense
    import hada.train as ht

    _scale_toy_stores(monkeypatch, tmp_path)
    monkeypatch.setattr(dense, "FUSED_CPU_ATTENTION", False)
    counts: list = []
    _scale_count_syncs(monkeypatch, counts)
    config = _scale_tiny("paper", epochs=2, batch_size=8, dropout=0.3)
    ht.train(config, tmp_path / "syncs", max_epochs_this_call=1)
    ht.train(config, tmp_path / "syncs")  # resumed: the queue's place is read back once, in the first step
    totals = [sum(c.values()) for c in counts]
    print("host syncs per step:", totals, "first step:", counts[0])
    assert len(counts) >= 6 and max(totals) <= 2, counts
