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
    assert [r[:2] for r in rows] == [("backbone", "a"), ("backbone", "b"), ("average", "average(a + b)")]


def test_concat_pair_reads_embeddings_only():
    pair = ConcatPair((3, 4), (3, 4), out_dim=5)
    batch = ModalityBatch(tokens=[], lengths=[], embeds=[torch.randn(2, 3), torch.randn(2, 4)])
    out = pair.image(batch)
    assert out.shape == (2, 5) and torch.allclose(out.norm(dim=1), torch.ones(2))


def test_run_experiment_caches_and_keys(tiny_world, monkeypatch):
    first = hr.run_experiment(tiny())
    assert first.run_dir.name.startswith("hada-k2-") and (first.run_dir / "metrics.json").exists()
    assert len(first.history) == 1 and 0 <= first.test_metrics["rsum"] <= 600
    model = first.load_model()
    assert model.evaluate(hr.shared_data(first.config, "test")) == pytest.approx(first.test_metrics)

    def no_training(*a, **k):
        raise AssertionError("a finished run must be loaded, not trained")

    monkeypatch.setattr(ht, "train", no_training)
    again = hr.run_experiment(tiny())
    assert again.run_dir == first.run_dir and again.test_metrics == first.test_metrics
    assert hr.run_folder(tiny()) == first.run_dir
    assert hr.run_folder(tiny(width=32)) != first.run_dir  # a parameter change is a new run
    with monkeypatch.context() as m:
        m.setattr(hr, "code_digest", lambda: "other code")  # the code that computes the result changed
        assert hr.run_folder(tiny()) != first.run_dir
    tiny_world["train"][1].manifest = {"backbone": "toy1", "weights": "retrained"}  # new features
    assert hr.run_folder(tiny()) != first.run_dir  # nothing stale is reused


def test_baseline_table_rows(tiny_world):
    rows = hx.baseline_table("synthetic", ["toy0", "toy1"], split="test", config=tiny())
    assert [r["kind"] for r in rows] == ["backbone", "backbone", "average", "concat"]
    assert rows[-1]["name"].startswith("concat(") and all(0 <= r["rsum"] <= 600 for r in rows)
    keys = {"text_retrieval_recall@1", "image_retrieval_recall@10", "rsum"}
    assert all(keys <= r.keys() for r in rows)
    assert hx.baseline_table("synthetic", ["toy0", "toy1"], split="test", config=tiny()) == rows  # cached


def test_cli_train_then_evaluate(tiny_world, tmp_path, capsys):
    args = ["--backbones", "toy0,toy1", "--width", "16", "--out-dim", "16", "--heads", "2", "--epochs", "1",
            "--batch-size", "16", "--queue-size", "16", "--no-itm"]
    assert main(["train", *args]) == 0
    assert "Rsum" in capsys.readouterr().out
    assert main(["train", *args]) == 0
    assert "already trained" in capsys.readouterr().out
    out = tmp_path / "eval"
    assert main(["evaluate", "--backbones", "toy0,toy1", "--run", "hada-k2", "--out", str(out)]) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]  # one CLIP_benchmark file per row
    assert sorted(r["model"] for r in records) == ["average(toy0 + toy1)", "hada(toy0 + toy1)", "toy0", "toy1"]
    run = next(r for r in records if r["model"] == "hada(toy0 + toy1)")
    assert run["pretrained"].split("/")[-1].startswith("hada-k2-") and run["task"] == "zeroshot_retrieval"
    assert main(["evaluate", "--run", "nope"]) == 2  # one line, exit 2
    assert "hada: error:" in capsys.readouterr().err


def test_cli_train_resumes_an_interrupted_run_without_a_flag(tiny_world, monkeypatch, capsys):
    args = ["--backbones", "toy0,toy1", "--width", "16", "--out-dim", "16", "--heads", "2", "--epochs", "2",
            "--batch-size", "16", "--queue-size", "16", "--no-itm"]
    assert main(["train", *args]) == 0
    straight = json.loads(next(runs_dir().glob("hada-k2-*/metrics.json")).read_text())
    capsys.readouterr()
    real_train = ht.train

    def interrupted(*a, **k):  # one epoch, then Ctrl-C
        real_train(*a, **k, max_epochs_this_call=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ht, "train", interrupted)
    assert main(["train", *args, "--restart"]) == 130  # the same run trained anew, cut after one epoch
    assert "rerun the same command to continue" in capsys.readouterr().err
    monkeypatch.setattr(ht, "train", real_train)
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "resuming hada-k2-" in out and "after epoch 1" in out and "exact" in out
    (folder,) = runs_dir().glob("hada-k2-*/metrics.json")  # one folder: the name comes from the configuration
    resumed = json.loads(folder.read_text())
    assert resumed["test"] == straight["test"] and resumed["val"] == straight["val"]  # bit for bit
    assert main(["train", *args, "--restart"]) == 0  # deleted and trained anew: no resume
    assert "resuming" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # one set of resume rules: no --resume flag
        main(["train", *args, "--resume"])
    assert stop.value.code == 2


def test_hada_train_with_the_books_settings_finds_the_books_run(tiny_world, monkeypatch, capsys):
    """One identity: the book's run (``hb.train_hada``) and ``hada train`` with the same settings are one folder,
    named by hada.runs from the configuration; the command trains nothing."""
    import hada.book as hb
    from hada.data.datasets import default_root
    from hada.experiments import Setting

    setting = Setting("synthetic", default_root("synthetic"), ("toy0", "toy1"), epochs=1, pairs_per_epoch=40, seed=3,
                      device="cpu")
    small = dict(width=16, out_dim=16, heads=2, head_dim=32, batch_size=16, queue_size=16)
    book = hb.train_hada(setting, 2, **small)
    assert book.run_dir.name.startswith("hada-k2-") and book.run_dir.name == hr.run_folder(book.config).name

    def no_training(*a, **k):
        raise AssertionError("hada train trained the book's run again")

    monkeypatch.setattr(ht, "train", no_training)
    capsys.readouterr()
    assert main(["train", "--dataset", "synthetic", "--backbones", "toy0,toy1", "--epochs", "1", "--pairs-per-epoch",
                 "40", "--seed", "3", "--device", "cpu", "--width", "16", "--out-dim", "16", "--heads", "2",
                 "--head-dim", "32", "--batch-size", "16", "--queue-size", "16"]) == 0
    out = capsys.readouterr().out
    assert f"{book.run_dir} is already trained" in out
    assert [p.name for p in runs_dir().iterdir() if p.is_dir() and p.name.startswith("hada-")] == [book.run_dir.name]


def test_the_cpu_thread_count_is_part_of_a_run_key(tiny_world, monkeypatch):
    """Training's torch thread count changes a CPU run's numbers, so it is part of the key (scoring runs on one
    thread whatever it is, hada.metrics.SCORING_THREADS)."""
    config = tiny().override(device="cpu")
    monkeypatch.delenv("HADA_THREADS", raising=False)
    one = hr.run_folder(config)
    assert hr.run_folder(config, threads=1) == one
    assert hr.run_folder(config, threads=2) != one
    monkeypatch.setenv("HADA_THREADS", "2")
    assert hr.run_folder(config) == hr.run_folder(config, threads=2)
