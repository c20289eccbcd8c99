"""The step graph: in parallel for `hada prepare`, serially in-process for a chapter's setup, in dependency
order either way; it stops cleanly on a failure, and leaves exactly what the chapters then load without
training."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hada.errors import HadaError
from hada.pipeline import Step, _priorities, book_steps, run_steps


# Step functions run in spawned workers, so they live at module level (pickled by name).
def _meet(folder: str, me: str, other: str) -> None:
    """Says it started, then waits for ``other`` to start too: both finish only if they ran at once."""
    Path(folder, f"{me}.started").touch()
    deadline = time.monotonic() + 120
    while not Path(folder, f"{other}.started").exists():
        if time.monotonic() > deadline:
            raise HadaError(f"{other} never ran alongside {me}")
        time.sleep(0.05)
    Path(folder, f"{me}.done").touch()


def _after(folder: str, me: str, *needs: str) -> None:
    missing = [n for n in needs if not Path(folder, f"{n}.done").exists()]
    if missing:
        raise HadaError(f"{me} started before {missing} finished")
    Path(folder, f"{me}.done").touch()


def _broken(folder: str) -> None:
    raise HadaError("broken input")


def test_steps_run_at_once_and_after_what_they_wait_for(tmp_path):
    d = str(tmp_path)
    steps = [Step("a", _meet, (d, "a", "b")), Step("b", _meet, (d, "b", "a")),
             Step("c", _after, (d, "c", "a", "b"), after=("a", "b")),
             Step("d", _after, (d, "d", "c"), after=("c",))]
    log = run_steps(steps, jobs=2, progress=False, log=lambda msg: None)
    assert set(log.seconds) == {"a", "b", "c", "d"}
    assert all((tmp_path / f"{n}.done").exists() for n in "abcd")


def test_a_failed_step_stops_what_waits_on_it_and_names_both(tmp_path):
    d = str(tmp_path)
    steps = [Step("bad", _broken, (d,)), Step("child", _after, (d, "child"), after=("bad",)),
             Step("ok", _after, (d, "ok"))]
    with pytest.raises(HadaError, match="bad: broken input") as err:
        run_steps(steps, jobs=2, progress=False, log=lambda msg: None)
    assert "child" in str(err.value)
    assert (tmp_path / "ok.done").exists() and not (tmp_path / "child.done").exists()


def test_bad_graphs_are_refused_before_anything_runs(tmp_path):
    d = str(tmp_path)
    with pytest.raises(HadaError, match="unknown steps"):
        run_steps([Step("a", _after, (d, "a"), after=("nope",))], progress=False)
    with pytest.raises(HadaError, match="cycle"):
        run_steps([Step("a", _after, (d, "a"), after=("b",)), Step("b", _after, (d, "b"), after=("a",))],
                  progress=False)
    with pytest.raises(HadaError, match="jobs"):
        run_steps([Step("a", _after, (d, "a"))], jobs=0, progress=False)
    assert not list(tmp_path.iterdir())


def test_one_job_runs_in_this_process_in_dependency_order():
    ran: list[tuple[str, int]] = []

    def note(name):  # a closure: it cannot be pickled, so it can only run in this process
        return lambda: ran.append((name, os.getpid()))

    steps = [Step("d", note("d"), cost=1.0), Step("c", note("c"), after=("a", "b"), cost=5.0),
             Step("a", note("a")), Step("b", note("b"))]
    messages: list[str] = []
    log = run_steps(steps, jobs=1, progress=False, log=messages.append)
    assert [name for name, _ in ran] == ["a", "b", "c", "d"]  # the costliest chain first, then list order
    assert {pid for _, pid in ran} == {os.getpid()}
    assert list(log.seconds) == ["a", "b", "c", "d"] and messages[0].startswith("done    a")


def test_one_job_reports_a_failure_like_the_pool(tmp_path):
    d = str(tmp_path)
    steps = [Step("bad", _broken, (d,)), Step("child", _after, (d, "child"), after=("bad",)),
             Step("ok", _after, (d, "ok"))]
    messages: list[str] = []
    with pytest.raises(HadaError) as err:
        run_steps(steps, jobs=1, progress=False, log=messages.append)
    # no new step starts after a failure; nothing else was running
    assert str(err.value) == ("1 step(s) failed -- bad: broken input; not run: child, ok. Finished steps are "
                              "kept; fix the cause and rerun to continue")
    assert messages == ["failed  bad: broken input"] and not list(tmp_path.iterdir())


def test_one_job_keeps_a_bugs_traceback_and_stops_at_ctrl_c(tmp_path):
    def bug():
        raise ValueError("a bug")

    messages: list[str] = []
    with pytest.raises(HadaError, match="bad: ValueError: a bug") as err:
        run_steps([Step("bad", bug)], jobs=1, progress=False, log=messages.append)
    assert isinstance(err.value.__cause__, ValueError) and "Traceback" in messages[1]

    def stop():
        raise KeyboardInterrupt

    d = str(tmp_path)
    steps = [Step("first", _after, (d, "first"), cost=2.0), Step("stop", stop), Step("never", _after, (d, "never"))]
    with pytest.raises(KeyboardInterrupt):
        run_steps(steps, jobs=1, progress=False, log=lambda msg: None)
    assert (tmp_path / "first.done").exists() and not (tmp_path / "never.done").exists()


def test_a_chapters_setup_runs_the_graph_without_runs_on_one_job(hada_data, tiny_synthetic, monkeypatch):
    import hada.book as hb
    import hada.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_steps", lambda steps, jobs, **kw: calls.append((steps, jobs)))
    setting = hb.setup(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random")
    (steps, jobs), = calls
    assert jobs == 1 and [s.name for s in steps] == [s.name for s in book_steps(setting, runs=False)]
    assert [s.name for s in steps] == ["features tiny-vit:random", "features tiny-rn:random"]


def test_a_steps_priority_is_the_costliest_chain_it_heads():
    steps = [Step("short", _after, cost=1.0), Step("long", _after, cost=1.0),
             Step("tail", _after, after=("long",), cost=5.0)]
    rank = _priorities(steps)
    assert rank == {"short": 1.0, "long": 6.0, "tail": 5.0}


def test_prepare_leaves_what_the_chapters_load_without_training(hada_data, tiny_synthetic, monkeypatch):
    import hada.book as hb
    from hada import train as _train

    setting = hb.resolve(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random", epochs=1,
                         pairs_per_epoch=None)
    steps = book_steps(setting)
    names = [s.name for s in steps]
    assert names[:2] == ["features tiny-vit:random", "features tiny-rn:random"]  # random weights: no pretraining
    assert "train hada-k2" in names and "train ablation-layers2" in names and "train hada-k3" not in names
    assert len(names) == len(set(names))  # the ablations' default is the results' HADA run, trained once
    steps = [s for s in steps if not s.name.startswith("train ablation")]
    run_steps(steps, jobs=2, progress=False, log=lambda msg: None)

    def no_training(*args, **kwargs):
        raise AssertionError("the chapter trained a run that hada prepare should have made")

    monkeypatch.setattr(_train, "train", no_training)
    table = hb.results(hb.setup(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random", epochs=1,
                                pairs_per_epoch=None), k=2)
    assert table.hada["name"] == "HADA (K=2)" and 0 <= table.hada["rsum"] <= 600
    assert any(r["name"].startswith("concat(") for r in table.rows)


def test_cli_explains_itself_and_refuses_bad_input_in_one_line(hada_data, tiny_synthetic, capsys):
    from hada.cli import main

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--jobs" in out and "--no-runs" in out and "papermill" in out
    with pytest.raises(SystemExit) as stop:  # refused while parsing, before any data is made
        main(["prepare", "--jobs", "0"])
    assert stop.value.code == 2 and "--jobs/-j: must be at least 1" in capsys.readouterr().err
    assert not hada_data.exists()
    cases = [(["--dataset", "flickr30k", "--data-root", str(hada_data / "nowhere")], "does not exist"),
             (["--data-root", str(tiny_synthetic), "--backbones", "tiny-vit:random,no-such-model:random"],
              "unknown open_clip model 'no-such-model'"),
             (["--data-root", str(tiny_synthetic), "--backbones", "tiny-vit:random"], "at least two backbones")]
    for args, message in cases:
        assert main(["prepare", *args]) == 2
        out, err = capsys.readouterr()
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "steps for" not in out  # refused before planning or starting anything


def test_params_file_is_the_chapters_parameters_and_typed_options_win(hada_data, tiny_synthetic, tmp_path,
                                                                      monkeypatch, capsys):
    """`hada prepare --params FILE` reads a papermill parameters file (the presets in book/params/ among them)."""
    import hada.pipeline as pipeline
    from hada.cli import main

    seen = []
    monkeypatch.setattr(pipeline, "prepare", lambda setting, **kw: seen.append(setting) or pipeline.StepLog())
    params = tmp_path / "tiny.yaml"
    params.write_text(f"data_root: {tiny_synthetic}\nbackbones: tiny-vit:random,tiny-rn:random\nepochs: 3\n"
                      "pairs_per_epoch: null\nseed: 4\n")
    assert main(["prepare", "--params", str(params), "--seed", "5"]) == 0
    (setting,) = seen
    assert (setting.epochs, setting.pairs_per_epoch, setting.seed) == (3, None, 5)
    assert setting.backbones == ("tiny-vit:random", "tiny-rn:random") and setting.data_root == tiny_synthetic
    for preset in sorted((Path(__file__).resolve().parents[1] / "book" / "params").glob("*.yaml")):
        assert main(["prepare", "--params", str(preset)]) == 2  # the preset's placeholder folder is not here
        assert "does not exist" in capsys.readouterr().err
    params.write_text("epochz: 3\n")
    assert main(["prepare", "--params", str(params)]) == 2
    assert "unknown chapter parameters epochz" in capsys.readouterr().err


def test_steps_extract_snapshots_after_their_pretraining_and_augmented_views_for_the_paper_run(hada_data,
                                                                                               tiny_synthetic):
    import hada.book as hb
    from hada.experiments import AUGMENT_VIEWS, strength_pairs

    setting = hb.resolve(data_root=tiny_synthetic)
    steps = {s.name: s for s in book_steps(setting)}
    assert steps["features tiny-vit@1"].after == ("pretrain tiny-vit",)
    assert steps["features tiny-rn@2"].after == ("pretrain tiny-rn",)
    assert "pretrain tiny-vit@1" not in steps
    # the paper recipe trains on augmented views of its main backbone, made with the published policy
    assert steps["features tiny-vit"].args[-2:] == (AUGMENT_VIEWS, "albef")
    assert steps["features tiny-rn"].args[-1] == 0  # its second backbone sees the plain images
    assert steps["features tiny-vit-gray"].args[-1] == 0  # no run with augmentation reads it
    assert steps["train paper-k2"].cost > 10 * steps["train hada-k2"].cost  # the slow run starts first
    # HADA-LAVIS's two runs: each seed's second stage after its first, which it warm-starts from
    for suffix in ("", "-seed1", "-seed2"):
        first, second = steps[f"train hada-k2-lavis-graph-stage1{suffix}"], steps[f"train hada-k2-lavis-graph{suffix}"]
        assert second.after == (first.name,) and first.after == ("features tiny-vit", "features tiny-rn")
        assert second.args[0] == first.args[0] and second.args[1] == f"hada-k2-lavis-graph-stage1{suffix}"
        assert not first.args[0]["loss"]["mix"] and second.args[2]["loss"]["mix"]
        assert first.args[0]["optim"]["epochs"] + second.args[2]["optim"]["epochs"] == setting.epochs
    for pair in strength_pairs(setting):
        assert steps[f"train hada-k2-{pair[0].replace('@', '_')}+{pair[1].replace('@', '_')}"].after == \
            tuple(f"features {b}" for b in pair)
        for b in pair:  # each backbone alone too: the reference the pair's fusion gain is measured against
            assert steps[f"train hada-k1-{b.replace('@', '_')}"].after == (f"features {b}",)
    random = hb.resolve(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random")
    assert strength_pairs(random) == []  # only embedded backbones have pretraining snapshots


def _sleep_and_say(folder: str, me: str) -> None:
    Path(folder, f"{me}.pid").write_text(str(os.getpid()))
    time.sleep(120)
    Path(folder, f"{me}.done").touch()


def test_workers_end_when_the_parent_is_killed(tmp_path):
    """`kill` (SIGTERM) of `hada prepare` reaches only the parent; its workers must not go on training unseen."""
    import signal
    import subprocess
    import sys

    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_prepare import _sleep_and_say;"
              f"from hada.pipeline import Step, run_steps; "
              f"run_steps([Step(n, _sleep_and_say, ({str(tmp_path)!r}, n)) for n in ('a', 'b')], jobs=2, "
              f"progress=False, log=lambda m: None)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2:
        assert time.monotonic() < deadline and parent.poll() is None, "the steps never started"
        time.sleep(0.1)
    workers = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]

    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)
    assert not list(tmp_path.glob("*.done"))
