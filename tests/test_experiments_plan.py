"""One way down: a chapter's setting is resolved into its runs once (``hada.experiments.plan``), and every consumer
(the results, recipes, strength and ablation rows, ``hada prepare``'s steps) reads those runs instead of
building its own configurations."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import hada.config
import hada.experiments as hx
import hada.runs as hr
from hada.config import TrainConfig
from hada.errors import HadaError
from hada.metrics import ROW_METRICS
from hada.pipeline import book_steps, store_bytes_needed


@pytest.fixture
def setting(hada_data, tiny_synthetic):
    """The embedded default on the tiny set: every group of runs (K=3, strength pairs, both LAVIS stages)."""
    return hx.resolve(data_root=tiny_synthetic, device="cpu")


@pytest.fixture
def resolutions(monkeypatch):
    """Counts of ``hada.config.recipe`` and ``TrainConfig.resolved`` calls, wherever they come from."""
    calls = {"recipe": 0, "resolved": 0}
    recipe, resolved = hada.config.recipe, TrainConfig.resolved

    def counted_recipe(*args, **kwargs):
        calls["recipe"] += 1
        return recipe(*args, **kwargs)

    def counted_resolved(self):
        calls["resolved"] += 1
        return resolved(self)

    for module in (hada.config, hx):
        monkeypatch.setattr(module, "recipe", counted_recipe)
    monkeypatch.setattr(TrainConfig, "resolved", counted_resolved)
    return calls


@pytest.fixture
def handed_down(monkeypatch):
    """Training, scoring and the feature stores replaced by records: the configurations ``run_experiment``
    receives, and a finished run for each."""
    received = []
    metrics = {key: 1.0 for key in ROW_METRICS}

    def run_experiment(config, progress=None, **kwargs):
        received.append(config)
        return SimpleNamespace(config=config, test_metrics=metrics, run_dir=Path(f"run-{len(received)}"),
                               history=[{"train_time_s": 1.0, "pairs": 10}], load_model=lambda device="cpu": None)

    def untrained(config, split):
        return [hx.SystemResult(b, "backbone", [metrics], []) for b in config.data.backbones]

    monkeypatch.setattr(hx, "run_experiment", run_experiment)
    monkeypatch.setattr(hr, "run_experiment", run_experiment)  # what hada.book imports inside its functions
    monkeypatch.setattr(hx, "run_test_ranks", lambda run, device=None: (np.zeros(4), np.arange(8)))
    monkeypatch.setattr(hx, "_untrained_systems", untrained)
    monkeypatch.setattr(hx, "shared_data", lambda config, split: SimpleNamespace(caption_image_index=[0, 1]))
    monkeypatch.setattr(hx, "trained_parameters", lambda model: 1)
    monkeypatch.setattr(hx, "baseline_rows", lambda config, split="test", concat=True, progress=None:
                        received.append(config) or [])
    return received


def test_a_setting_is_resolved_once_and_its_runs_flow_down_unchanged(setting, resolutions, handed_down):
    import hada.book as hb

    book = hx.plan(setting)
    assert resolutions["recipe"] > 0 and resolutions["resolved"] > 0  # all of it here
    resolutions.update(recipe=0, resolved=0)
    assert hx.plan(dataclasses.replace(setting, counts={})) is book  # an equal setting: the same plan

    # every chapter's way to its runs, and hada prepare's
    for k in (2, 3):
        hx.result_systems(setting, k)
    hx.recipe_results(setting, 2)
    hx.strength_points(setting)
    hb.ablations(setting)
    hb.train_hada(setting, 2)
    hb.backbone_table(setting)
    hx.hada_seed_rsums(setting, 2)
    book_steps(setting), store_bytes_needed(setting)
    assert resolutions == {"recipe": 0, "resolved": 0}

    # what went down is the plan's own configurations (a second stage: its plan config, warm-started)
    planned = [run.config for run in book.training()] + [book.baselines.config]
    planned += [config for k in book.recipes for _, _, config in book.recipes[k]]
    seconds = [stages.second.config for stages in book.lavis_graph]
    for config in handed_down:
        if config.optim.init_from is None:
            assert any(config is c for c in planned)
        else:
            assert config.override(**{"optim.init_from": None}) in seconds
    assert sum(c.optim.init_from is not None for c in handed_down) == len(seconds)


def test_runs_beyond_the_plan_are_resolved_the_plans_way(setting):
    small = hx.hada_run(setting, 2, width=16)
    assert small.config.model.width == 16 and small.config.device == "cpu"
    assert small.config.model.precision != "auto"
    assert hx.hada_run(setting, 2) is hx.plan(setting).hada[2][0]
    with pytest.raises(HadaError, match="not among the book's ablations"):
        hx.ablation_runs(setting, [("mine", 2, {"gnn": "gcn"})])
    with pytest.raises(HadaError, match="K=4 needs 4 backbones"):
        hx.plan(setting).results(4)


def test_book_steps_train_exactly_the_plans_runs(setting):
    book = hx.plan(setting)
    steps = {s.name: s for s in book_steps(setting) if s.name.startswith("train ")}
    expected = {f"train {name}": (config.to_dict(), name) for name, config in book.training()}
    for stages in book.lavis_graph:
        (first_name, first), (name, second) = stages.first, stages.second
        expected[f"train {name}"] = (first.to_dict(), first_name, second.to_dict(), name)
    assert {name: step.args for name, step in steps.items()} == expected
    # and the plan holds every run a chapter reads, each fully resolved on the setting's exact device
    read = [run for k in book.hada for run in book.results(k)] + [run for k in book.recipes for run in book.recipes[k]]
    read += list(book.strength) + list(book.ablations) + [s.first for s in book.lavis_graph]
    names = {run.name for run in book.training()}
    assert {run.name for run in read} <= names
    for name, config in book.training() + [s.second for s in book.lavis_graph]:
        assert config.device == "cpu" and dataclasses.replace(config.resolved(), device="cpu") == config, name
