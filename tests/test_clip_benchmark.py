"""The result files are CLIP_benchmark's own: the real ``clip_benchmark build`` reads what a finished run and
``hada evaluate`` write into one CSV with the expected rows and values; the book's page gathers the runs' files.

``clip-benchmark`` is installed without its dependencies (environment.yml): ``build`` uses none of them, but its
module imports the evaluation metrics, which import scikit-learn and pycocoevalcap at the top. Where those are
absent the runner below gives them empty stand-ins that fail if called; where they are installed nothing is
replaced and the run is exactly the ``clip_benchmark`` console command.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hada.runs as hr
from fixtures.toy_features import use_toy_stores
from hada.book.results_all import gather, results_table
from hada.cli import main
from hada.config import TrainConfig
from hada.evaluate import RUN_RESULTS_FILE, percent_metrics, read_record

pytest.importorskip("clip_benchmark", reason="clip-benchmark is a test dependency (environment.yml)")


RUNNER = textwrap.dedent("""
    import importlib.abc, importlib.util, sys, types

    EVAL_ONLY = ("sklearn", "pycocoevalcap")  # imported by clip_benchmark.metrics, used by `eval` alone

    class Stub(types.ModuleType):
        __path__ = []
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            def unavailable(*args, **kwargs):
                raise RuntimeError(f"{self.__name__}.{name} is not installed")
            return unavailable

    class Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in missing else None
        def create_module(self, spec):
            return Stub(spec.name)
        def exec_module(self, module):
            pass

    missing = {m for m in EVAL_ONLY if importlib.util.find_spec(m) is None}
    sys.meta_path.append(Stubs())
    from clip_benchmark.cli import main
    sys.argv = ["clip_benchmark", *sys.argv[1:]]
    sys.exit(main())
""")


@pytest.fixture
def toy_world(monkeypatch, tmp_path):
    """Toy feature stores for two backbones ``toy0``/``toy1`` in a fresh HADA_DATA (as tests/test_baselines.py)."""
    use_toy_stores(monkeypatch, tmp_path, n_train=20, n_eval=10)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(before)
    hr.clear_cache()


def tiny() -> TrainConfig:
    return TrainConfig().override(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, epochs=1,
                                  batch_size=16, lr=1e-3, queue_size=16, itm=False, head_dim=32, precision="auto")


def clip_benchmark_build(files, output):
    """``clip_benchmark build FILES --output OUTPUT`` in a fresh interpreter; the CSV's rows."""
    res = subprocess.run([sys.executable, "-c", RUNNER, "build", *map(str, files), "--output", str(output)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(output, newline="") as f:
        return list(csv.DictReader(f))


def test_clip_benchmark_build_reads_our_files(toy_world, capsys):
    run = hr.run_experiment(tiny())
    run_file = run.run_dir / RUN_RESULTS_FILE
    assert json.loads(run_file.read_text())["pretrained"] == str(run.run_dir.resolve())
    out = toy_world / "eval"
    assert main(["evaluate", "--backbones", "toy0,toy1", "--concat", "--run", run.run_dir.name,
                 "--out", str(out)]) == 0
    assert "wrote 5 CLIP_benchmark result file(s)" in capsys.readouterr().out
    files = [run_file, *sorted(out.glob("*.json"))]
    records = [read_record(p) for p in files]

    rows = clip_benchmark_build(files, toy_world / "benchmark.csv")

    assert len(rows) == 6
    by_name = {row["model_fullname"]: row for row in rows}
    for record in records:
        row = by_name[record["model"] + " " + record["pretrained"]]
        assert {k: row[k] for k in ("dataset", "model", "pretrained", "task", "language")} == \
               {k: record[k] for k in ("dataset", "model", "pretrained", "task", "language")}
        for key, value in record["metrics"].items():
            assert float(row[key]) == pytest.approx(value, abs=1e-12) and 0.0 <= value <= 1.0
    models = sorted(r["model"] for r in rows)
    assert models == ["average(toy0 + toy1)", "concat(toy0 + toy1) + linear", "hada(toy0 + toy1)",
                      "hada(toy0 + toy1)", "toy0", "toy1"]
    concat = next(r for r in rows if r["model"].startswith("concat("))  # a trained baseline: its run folder
    assert read_record(Path(concat["pretrained"]) / RUN_RESULTS_FILE)["metrics"] == pytest.approx(
        {key: float(concat[key]) for key in records[0]["metrics"]})
    assert {r["dataset"] for r in rows} == {"synthetic"}
    # the run's own file and `hada evaluate --run` score the same model on the same test split
    ours = [r for r in rows if r["model"] == "hada(toy0 + toy1)"]
    assert ours[0]["pretrained"] == ours[1]["pretrained"] == str(run.run_dir.resolve())
    for key, value in run.test_metrics.items():
        if key != "rsum":
            assert float(ours[0][key]) == pytest.approx(value / 100) == pytest.approx(float(ours[1][key]))


def test_results_page_gathers_current_runs_only(toy_world):
    run = hr.run_experiment(tiny())
    (run.run_dir / RUN_RESULTS_FILE).unlink()  # a run finished before the file existed gets it on load
    assert hr.run_experiment(tiny()).run_dir == run.run_dir
    assert (run.run_dir / RUN_RESULTS_FILE).exists()
    shutil.copytree(run.run_dir, run.run_dir.with_name("hada-toy-000000000000"))  # trained by other code
    gathered = gather()
    assert [d.name for d, _ in gathered.records] == [run.run_dir.name]
    assert [d.name for d in gathered.other_code] == ["hada-toy-000000000000"]
    table = results_table(gathered)
    row = table.row("hada(toy0 + toy1)")
    assert row["run"] == run.run_dir.name and row["dataset"] == "synthetic"
    assert row["rsum"] == pytest.approx(run.test_metrics["rsum"])
    assert percent_metrics(gathered.records[0][1]) == pytest.approx(run.test_metrics)
    assert "hada(toy0 + toy1)" in str(table) and "<table" in table._repr_html_()


def test_evaluate_csv_is_what_clip_benchmark_build_writes(toy_world, capsys):
    """`hada evaluate --csv FILE` writes, without clip_benchmark, the CSV its `build` makes of the same files: the
    same header (in a fixed order where clip_benchmark's follows a set), rows and values, byte for byte once its
    columns are put in that order."""
    out, ours = toy_world / "eval", toy_world / "ours.csv"
    assert main(["evaluate", "--backbones", "toy0,toy1", "--out", str(out), "--csv", str(ours)]) == 0
    assert f"to {ours}" in capsys.readouterr().out
    files = sorted(out.glob("*.json"))
    theirs = toy_world / "theirs.csv"
    expected = clip_benchmark_build(files, theirs)
    with open(ours, newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames
    assert len(files) == 3 and rows == expected
    with open(theirs, newline="") as f:
        their_header = csv.DictReader(f).fieldnames
    assert sorted(header) == sorted(their_header)
    rewritten = toy_world / "theirs-in-our-order.csv"
    with open(theirs, newline="") as f, open(rewritten, "w", newline="") as g:
        writer = csv.DictWriter(g, fieldnames=header)
        writer.writeheader()
        writer.writerows(csv.DictReader(f))
    assert ours.read_bytes() == rewritten.read_bytes()
    # a folder stands for its json files, as for clip_benchmark
    from hada.evaluate import write_benchmark_csv
    assert write_benchmark_csv([out], toy_world / "folder.csv").read_bytes() == ours.read_bytes()


def test_evaluate_help_recommends_only_what_works_here(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "--csv FILE" in text
    assert "`clip_benchmark build FOLDER/*.json` reads them" not in text
    assert "pycocoevalcap" in text  # says why clip_benchmark's own command is not the way here
