"""Baselines scored like HADA, the run cache (hash keys, reuse, staleness, resume), ``hada train`` and
``hada evaluate``."""

import json

import numpy as np
import pytest
import torch

import hada.experiments as hx
import hada.runs as hr
import hada.train as ht
from hada.config import TrainConfig
from hada.baselines import ConcatPair, averaging_similarity, backbone_similarity, untrained_baselines
from fixtures.toy_features import use_toy_stores
from hada.features.batching import FeatureData, compute_stats
from hada.cli import main
from hada.metrics import retrieval_metrics
from hada.model.encoder import ModalityBatch
from hada.paths import runs_dir



@pytest.fixture(autouse=True)
def tiny_world(monkeypatch, tmp_path):
    stores = use_toy_stores(monkeypatch, tmp_path, n_train=20, n_eval=10)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield stores
    torch.set_num_threads(before)
    hr.clear_cache()


def tiny(**kw):
    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, epochs=1, batch_size=16, lr=1e-3,
                queue_size=16, itm=False, head_dim=32, precision="auto")
    return TrainConfig().override(**{**base, **kw})


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
    first = hr.run_experiment(tiny(), "t")
    assert first.run_dir.name.startswith("t-") and (first.run_dir / "metrics.json").exists()
    assert len(first.history) == 1 and 0 <= first.test_metrics["rsum"] <= 600
    model = first.load_model()
    assert model.evaluate(hr.shared_data(first.config, "test")) == pytest.approx(first.test_metrics)

    def no_training(*a, **k):
        raise AssertionError("a finished run must be loaded, not trained")

    monkeypatch.setattr(ht, "train", no_training)
    again = hr.run_experiment(tiny(), "t")
    assert again.run_dir == first.run_dir and again.test_metrics == first.test_metrics
    assert hr.run_folder(tiny(), "t") == first.run_dir
    assert hr.run_folder(tiny(width=32), "t") != first.run_dir  # a parameter change is a new run
    with monkeypatch.context() as m:
        m.setattr(hr, "code_digest", lambda: "other code")  # the code that computes the result changed
        assert hr.run_folder(tiny(), "t") != first.run_dir
    tiny_world["train"][1].manifest = {"backbone": "toy1", "weights": "retrained"}  # new features
    assert hr.run_folder(tiny(), "t") != first.run_dir  # nothing stale is reused


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
    out = tmp_path / "eval"
    assert main(["evaluate", "--backbones", "toy0,toy1", "--run", "cli", "--out", str(out)]) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]  # one CLIP_benchmark file per row
    assert sorted(r["model"] for r in records) == ["average(toy0 + toy1)", "hada(toy0 + toy1)", "toy0", "toy1"]
    run = next(r for r in records if r["model"] == "hada(toy0 + toy1)")
    assert run["pretrained"].split("/")[-1].startswith("cli-") and run["task"] == "zeroshot_retrieval"
    assert main(["evaluate", "--run", "nope"]) == 2  # one line, exit 2
    assert "hada: error:" in capsys.readouterr().err


def test_cli_train_resumes_an_interrupted_run_without_a_flag(tiny_world, monkeypatch, capsys):
    args = ["--backbones", "toy0,toy1", "--width", "16", "--out-dim", "16", "--heads", "2", "--epochs", "2",
            "--batch-size", "16", "--queue-size", "16", "--no-itm"]
    assert main(["train", *args, "--name", "straight"]) == 0
    straight = json.loads(next(runs_dir().glob("straight-*/metrics.json")).read_text())
    capsys.readouterr()
    real_train = ht.train

    def interrupted(*a, **k):  # one epoch, then Ctrl-C
        real_train(*a, **k, max_epochs_this_call=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ht, "train", interrupted)
    assert main(["train", *args, "--name", "cut"]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    monkeypatch.setattr(ht, "train", real_train)
    assert main(["train", *args, "--name", "cut"]) == 0
    out = capsys.readouterr().out
    assert "resuming cut-" in out and "after epoch 1" in out and "exact" in out
    resumed = json.loads(next(runs_dir().glob("cut-*/metrics.json")).read_text())
    assert resumed["test"] == straight["test"] and resumed["val"] == straight["val"]  # bit for bit
    assert main(["train", *args, "--name", "cut", "--restart"]) == 0  # deleted and trained anew: no resume
    assert "resuming" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # one set of resume rules: no --resume flag
        main(["train", *args, "--name", "cut", "--resume"])
    assert stop.value.code == 2
