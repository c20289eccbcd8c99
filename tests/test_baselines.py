"""Baselines scored like HADA, the experiment cache (hash keys, reuse, staleness), and ``hada evaluate``."""

import json

import numpy as np
import pytest
import torch

import hada.experiments as hx
import hada.train as ht
from hada.baselines import ConcatPair, averaging_similarity, backbone_similarity, untrained_baselines
from fixtures.toy_features import toy_splits
from hada.features.batching import FeatureData, compute_stats
from hada.cli import main
from hada.evaluate import retrieval_metrics
from hada.model.encoder import ModalityBatch

SEEDS = {"train": 0, "val": 1, "test": 2}


@pytest.fixture(autouse=True)
def tiny_world(monkeypatch, tmp_path):
    monkeypatch.setenv("HADA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    stores = {s: toy_splits(n_images=20 if s == "train" else 10, seed=seed) for s, seed in SEEDS.items()}
    monkeypatch.setattr(ht, "open_splits", lambda config, split: stores[split][: len(config.backbones)])
    hx.clear_cache()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield stores
    torch.set_num_threads(before)
    hx.clear_cache()


def tiny(**kw):
    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, epochs=1, batch_size=16, lr=1e-3,
                queue_size=16, itm=False)
    return ht.TrainConfig(**{**base, **kw})


def test_untrained_rows_match_direct_cosines(tiny_world):
    splits = tiny_world["test"]
    data = FeatureData(splits, compute_stats(splits))
    ci = splits[0].caption_image_index
    cos = []
    for s in splits:
        img = torch.nn.functional.normalize(torch.from_numpy(s.image_embeds.astype(np.float32)), dim=1)
        txt = torch.nn.functional.normalize(torch.from_numpy(s.text_embeds.astype(np.float32)), dim=1)
        cos.append(img @ txt.T)
    assert retrieval_metrics(backbone_similarity(data, 1), ci) == pytest.approx(retrieval_metrics(cos[1], ci))
    avg = retrieval_metrics(averaging_similarity(data), ci)
    assert avg == pytest.approx(retrieval_metrics((cos[0] + cos[1]) / 2, ci))
    rows = untrained_baselines(data, ["a", "b"])
    assert [r[0] for r in rows] == ["a", "b", "average(a + b)"]


def test_concat_pair_reads_embeddings_only():
    pair = ConcatPair((3, 4), (3, 4), out_dim=5)
    batch = ModalityBatch(tokens=[], lengths=[], embeds=[torch.randn(2, 3), torch.randn(2, 4)])
    out = pair.image(batch)
    assert out.shape == (2, 5) and torch.allclose(out.norm(dim=1), torch.ones(2))


def test_run_experiment_caches_and_keys(tiny_world, monkeypatch):
    first = hx.run_experiment(tiny(), "t")
    assert first.run_dir.name.startswith("t-") and (first.run_dir / "metrics.json").exists()
    assert len(first.history) == 1 and 0 <= first.test_metrics["rsum"] <= 600
    model = first.load_model()
    assert model.evaluate(hx.shared_data(first.config, "test")) == pytest.approx(first.test_metrics)

    def no_training(*a, **k):
        raise AssertionError("a finished run must be loaded, not trained")

    monkeypatch.setattr(ht, "train", no_training)
    again = hx.run_experiment(tiny(), "t")
    assert again.run_dir == first.run_dir and again.test_metrics == first.test_metrics
    assert hx.run_dir_for(tiny(width=32), "t") != first.run_dir  # a parameter change is a new run
    tiny_world["train"][1].manifest = {"backbone": "toy1", "weights": "retrained"}  # new features
    assert hx.run_dir_for(tiny(), "t") != first.run_dir  # nothing stale is reused


def test_baseline_table_rows(tiny_world):
    rows = hx.baseline_table("synthetic", ["toy0", "toy1"], split="test", config=tiny())
    assert [r["kind"] for r in rows] == ["backbone", "backbone", "fusion", "fusion"]
    assert rows[-1]["name"].startswith("concat(") and all(0 <= r["rsum"] <= 600 for r in rows)
    keys = {"text_retrieval_recall@1", "image_retrieval_recall@10", "rsum"}
    assert all(keys <= r.keys() for r in rows)
    assert hx.baseline_table("synthetic", ["toy0", "toy1"], split="test", config=tiny()) == rows  # cached


def test_cli_train_then_evaluate(tiny_world, tmp_path, capsys):
    args = ["--backbones", "toy0,toy1", "--width", "16", "--out-dim", "16", "--heads", "2", "--epochs", "1",
            "--batch-size", "16", "--queue-size", "16", "--no-itm", "--name", "cli"]
    assert main(["train", *args]) == 0
    assert "Rsum" in capsys.readouterr().out
    assert main(["train", *args]) == 0
    assert "already trained" in capsys.readouterr().out
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--backbones", "toy0,toy1", "--run", "cli", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["model"] for r in records][:3] == ["toy0", "toy1", "average(toy0 + toy1)"]
    assert records[-1]["model"].startswith("cli-") and records[-1]["task"] == "zeroshot_retrieval"
    assert main(["evaluate", "--run", "nope"]) == 2  # one line, exit 2
    assert "hada: error:" in capsys.readouterr().err
