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

    cmd = world.train("--seed", "8", "--name", "wait")
    folder = run_folder(config_from_args(build_parser().parse_args(cmd)).resolved(), "wait")
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
    cmd = world.train("--seed", "7", "--name", "twice")
    results = _together([cmd, cmd], world.data)
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    assert results[0][1].splitlines()[-4:] == results[1][1].splitlines()[-4:]  # the same metrics table
    runs = sorted((world.data / "runs").glob("twice-*"))
    assert len([r for r in runs if r.is_dir()]) == 1
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
    cmd = world.train("--seed", "11", "--name", "full")
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
