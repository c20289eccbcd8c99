"""The GitHub workflows: a pull request runs `make test` and the papermill matrix of every shipped preset, the
actions are at current major versions and kept so by Dependabot, and nothing caches pip's CUDA wheels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
#: the oldest major version accepted of each action (Dependabot raises them; this only catches a step backwards)
CURRENT = {"actions/checkout": 7, "actions/setup-python": 7, "actions/cache": 6, "actions/upload-artifact": 7,
           "actions/configure-pages": 6, "actions/upload-pages-artifact": 5, "actions/deploy-pages": 5}


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))   # YAML 1.1 reads the key `on` as True
    return doc


def _steps(doc: dict):
    for job in doc["jobs"].values():
        yield from job.get("steps", [])


def test_every_action_is_at_a_current_major_version():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        for step in _steps(_load(path)):
            if "uses" not in step:
                continue
            action, _, ref = step["uses"].partition("@")
            m = re.fullmatch(r"v(\d+)", ref)
            assert m, f"{path.name}: {step['uses']} is not pinned to a major version tag"
            assert action in CURRENT, f"{path.name}: {action} is not known to this test; add its current major"
            assert int(m.group(1)) >= CURRENT[action], f"{path.name}: {step['uses']} is behind v{CURRENT[action]}"


def test_no_workflow_caches_pips_downloads():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        doc = _load(path)
        for step in _steps(doc):
            assert "cache" not in (step.get("with") or {}), f"{path.name}: {step.get('uses')} caches pip's downloads"
            if step.get("uses", "").startswith("actions/cache@"):
                assert ".cache/pip" not in str(step["with"]["path"]), path.name
        text = path.read_text()
        assert "PIP_NO_CACHE_DIR" in text, f"{path.name}: pip keeps a cache of the wheels it installs"


def test_pull_requests_run_make_test_and_the_papermill_matrix():
    doc = _load(WORKFLOWS / "pr.yml")
    assert "pull_request" in doc["on"]
    runs = {name: "\n".join(s.get("run", "") for s in job.get("steps", [])) for name, job in doc["jobs"].items()}
    assert any(re.search(r"^make test$", run, re.M) for run in runs.values())
    assert any(re.search(r"^make test-presets$", run, re.M) for run in runs.values())  # every page x every preset
    papermill = doc["jobs"]["papermill"]
    assert "preset" in papermill["strategy"]["matrix"]
    script = runs["papermill"]
    assert "04_training" in script and "05_results" in script and "papermill" in script
    assert ".ci/preset_fixture.py" in script
    uploads = [s for s in papermill["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads and uploads[0]["with"]["path"].rstrip("/") == "notebooks"
    # the matrix is every shipped preset: the listing step, run here
    listing = next(s["run"] for s in doc["jobs"]["presets"]["steps"] if s.get("id") == "list")
    command = listing.splitlines()[0].split("=", 1)[1].strip("$()")
    shown = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode == 0 and shown.stdout.strip():          # jq may be missing here
        assert yaml.safe_load(shown.stdout) == sorted(p.stem for p in (ROOT / "book" / "params").glob("*.yaml"))


def test_dependabot_keeps_the_actions_and_pip_current():
    doc = yaml.safe_load((ROOT / ".github" / "dependabot.yml").read_text())
    ecosystems = {u["package-ecosystem"] for u in doc["updates"]}
    assert {"github-actions", "pip"} <= ecosystems


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "book" / "params").glob("*.yaml")))
def test_preset_fixture_points_the_preset_at_a_miniature(preset, tmp_path, monkeypatch):
    """.ci/preset_fixture.py (the papermill matrix's first step): the dataset loads, the weights exist, and the
    parameters are the preset's but for the paths, the device and the budget."""
    from hada.data.datasets import load_dataset

    monkeypatch.syspath_prepend(str(ROOT / ".ci"))
    monkeypatch.setattr(sys, "argv", ["preset_fixture.py", str(ROOT / "book" / "params" / preset), str(tmp_path)])
    import preset_fixture

    monkeypatch.setattr(preset_fixture, "save_random_weights",
                        lambda model, path, seed=0: (path.parent.mkdir(parents=True, exist_ok=True),
                                                     path.write_bytes(b"w"), path)[-1])
    assert preset_fixture.main() == 0
    shipped = yaml.safe_load((ROOT / "book" / "params" / preset).read_text())
    pointed = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert set(pointed) == set(shipped)
    for key in set(shipped) - {"data_root", "backbones", "epochs", "device"}:
        assert pointed[key] == shipped[key], key
    assert pointed["device"] == "cpu" and pointed["epochs"] == 1
    models = [s.split(":", 1)[0] for s in shipped["backbones"].split(",")]
    specs = pointed["backbones"].split(",")
    assert [s.split(":", 1)[0] for s in specs] == models
    assert all(Path(s.split(":", 1)[1]).is_file() for s in specs)
    ds = load_dataset(pointed["dataset"], pointed["data_root"])
    assert {s: len(ds.split(s)) for s in ("train", "val", "test")} == preset_fixture.SPLITS
