"""Training on tiny in-memory features: batching, resume == uninterrupted, seeds, early stop, the CLI."""

import json

import numpy as np
import pytest
import torch

import hada.config as hc
import hada.train as ht
from fixtures.toy_features import toy_splits, use_toy_stores
from hada.config import DataConfig, ModelConfig, TrainConfig
from hada.features.batching import FeatureData, PairLoader, compute_stats
from hada.errors import HadaError



@pytest.fixture(autouse=True)
def tiny_world(monkeypatch, tmp_path):
    """HADA_DATA in a temp dir, toy features instead of a store, one torch thread."""
    use_toy_stores(monkeypatch, tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**kw):
    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=32, precision="auto", epochs=2,
                batch_size=16, lr=1e-3, queue_size=32, eval_batch_size=64)
    return TrainConfig().override(**{**base, **kw})


# ------------------------------------------------------------------------------------------ batching
def test_batching_normalises_and_trims():
    splits = toy_splits(n_images=10, seed=0)
    stats = compute_stats(splits)
    data = FeatureData(splits, stats)
    caps = np.array([7, 0, 3, 3])
    img, txt = data.image_batch(splits[0].caption_image_index[caps]), data.text_batch(caps)
    for k, s in enumerate(splits):
        n = s.text_lengths[caps]
        t = txt.tokens[k]
        assert t.dtype == torch.float32 and t.shape == (4, n.max(), s.text_tokens.shape[-1])
        assert torch.equal(txt.lengths[k], torch.from_numpy(n))
        pad = torch.arange(t.shape[1]) >= torch.from_numpy(n)[:, None]
        assert (t[pad] == 0).all()  # padding stays exactly zero
        raw = torch.nn.functional.normalize(torch.from_numpy(s.text_tokens[caps[0], 0].astype(np.float32)), dim=0)
        assert torch.allclose(t[0, 0], (raw - stats.text[k].mean) / stats.text[k].std, atol=1e-5)
        assert img.tokens[k].shape[:2] == (4, s.image_tokens.shape[1])
        assert torch.equal(img.embeds[k], torch.from_numpy(s.image_embeds[s.caption_image_index[caps]]).float())
    # standardised train tokens: mean ~0, std ~1 over valid entries
    allimg = torch.cat([b.tokens[0] for b in data.iter_images(4)])
    assert abs(float(allimg.mean())) < 1e-3 and abs(float(allimg.std()) - 1) < 1e-2
    # the memmap path (not resident) gives the same batches
    lazy = FeatureData(splits, stats, resident=False)
    assert torch.equal(lazy.text_batch(caps).tokens[1], txt.tokens[1])
    assert torch.equal(lazy.image_batch(np.array([3, 1, 1])).tokens[0], data.image_batch(np.array([3, 1, 1])).tokens[0])


def test_pair_loader_covers_every_caption_once():
    data = FeatureData(toy_splits(n_images=10, seed=0), compute_stats(toy_splits(n_images=10, seed=0)))
    loader = PairLoader(data, batch_size=7, rng=np.random.default_rng(0))
    seen = []
    for img, txt, idx in loader:
        assert img.batch_size == txt.batch_size == len(idx)
        seen.append(idx)
    assert len(seen) == len(loader) and sum(len(s) for s in seen) == data.n_captions
    assert sorted(torch.cat(seen).tolist()) == sorted(data.caption_image_index.tolist())


# ------------------------------------------------------------------------------------------ training
def final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return ckpt["model"], json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("options", [dict(distill=True, fused=False),
                                     dict(precision="bf16", head_dim=4, pairs_per_epoch=30)])
def test_resume_equals_uninterrupted(tmp_path, options):
    cfg = tiny_config(**options)
    straight = ht.train(cfg, tmp_path / "straight")
    assert ht.train(cfg, tmp_path / "split", max_epochs_this_call=1) is None  # "interrupted" after epoch 1
    assert not (tmp_path / "split" / "metrics.json").exists()
    resumed = ht.train(cfg, tmp_path / "split", resume=True)
    a, ma = final_state(tmp_path / "straight")
    b, mb = final_state(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # parameters, momentum encoders, queue: bit-identical
    assert ma["val"] == mb["val"] and ma["test"] == mb["test"]
    assert straight.test_metrics == resumed.test_metrics
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    hist = json.loads((tmp_path / "split" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and {"tau", "mix_weight", "lr", "val_rsum", "time_s"} <= hist[0].keys()


def test_seed_determines_numbers(tmp_path):
    cfg = tiny_config(epochs=1, itm=False)
    r1 = ht.train(cfg, tmp_path / "a")
    r2 = ht.train(cfg, tmp_path / "b")
    r3 = ht.train(tiny_config(epochs=1, itm=False, seed=1), tmp_path / "c")
    assert r1.history[0]["loss"] == r2.history[0]["loss"] and r1.test_metrics == r2.test_metrics
    assert r1.history[0]["loss"] != r3.history[0]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is CUDA there")
def test_device_cpu_is_the_default_run(tmp_path):
    default = ht.train(tiny_config(epochs=1), tmp_path / "auto")
    cpu = ht.train(tiny_config(epochs=1, device="cpu"), tmp_path / "cpu")
    assert default.history[0]["loss"] == cpu.history[0]["loss"] and default.test_metrics == cpu.test_metrics
    assert json.loads((tmp_path / "cpu" / "config.json").read_text())["device"] == "cpu"  # resolved, as in the key


def test_early_stop_keeps_best(tmp_path):
    cfg = tiny_config(epochs=6, patience=1, lr=0.0, queue_size=0, itm=False, dropout=0.0)
    res = ht.train(cfg, tmp_path / "r")  # nothing changes, so epoch 2 is no better than epoch 1
    assert len(res.history) == 2 and res.best_epoch == 1
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["stopped_early"] and m["val"]["rsum"] == pytest.approx(res.history[0]["val_rsum"])
    model = ht.load_trained(tmp_path / "r")
    assert model.w == pytest.approx(0.5) and model.stats is not None


def test_concat_baseline_and_no_mix_train(tmp_path):
    r = ht.train(tiny_config(arch="concat", epochs=1, mix=False), tmp_path / "c")
    assert 0 <= r.test_metrics["rsum"] <= 600 and r.history[0]["mix_weight"] == 0.0


def test_config_identity_and_guards(tmp_path):
    a, b = tiny_config(), tiny_config(width=32)
    assert a.resolved().identity() == tiny_config().resolved().identity() != b.resolved().identity()
    assert DataConfig(backbones="x, y").backbones == ["x", "y"]
    with pytest.raises(HadaError):
        ModelConfig(arch="nope")
    ht.train(tiny_config(epochs=1), tmp_path / "r", max_epochs_this_call=0)
    with pytest.raises(HadaError):  # a different config in the same folder
        ht.train(b, tmp_path / "r")


def test_pairs_per_epoch_draws_a_fresh_subset_each_epoch(tmp_path):
    data = FeatureData(toy_splits(n_images=10, seed=0), compute_stats(toy_splits(n_images=10, seed=0)))
    loader = PairLoader(data, batch_size=4, rng=np.random.default_rng(0), limit=9)
    epochs = [torch.cat([idx for _, _, idx in loader]) for _ in range(3)]
    assert len(loader) == 3 and all(len(e) == 9 for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == 3  # a new random subset (and order) every epoch
    again = PairLoader(data, batch_size=4, rng=np.random.default_rng(0), limit=9)
    assert torch.equal(torch.cat([idx for _, _, idx in again]), epochs[0])  # deterministic by seed
    res = ht.train(tiny_config(epochs=2, pairs_per_epoch=20, batch_size=8), tmp_path / "r")
    assert [h["pairs"] for h in res.history] == [20, 20]
    with pytest.raises(HadaError):
        tiny_config(pairs_per_epoch=0)


def test_auto_precision_is_fp32_on_the_cpu_and_bf16_on_a_bf16_gpu(monkeypatch):
    """"auto" is fp32 on every CPU, also one that multiplies bfloat16 natively (autocast made the book's step
    slower there), and bf16 on a CUDA GPU that supports it; the run key names what ran."""
    import hada.devices

    monkeypatch.setattr(hc, "cpu_has_bf16", lambda: True)
    assert tiny_config().model.precision == "auto" and tiny_config().resolved().model.precision == "fp32"
    fp32_key = tiny_config().resolved().identity()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = tiny_config(device="cuda").resolved()
    assert (gpu.device, gpu.model.precision) == ("cuda", "bf16")
    assert gpu.identity() == tiny_config(device="cuda", precision="bf16").resolved().identity() != fp32_key
    monkeypatch.undo()  # the real probe (not the stand-ins above) answers yes or no on this CPU
    assert hc.cpu_has_bf16() in (True, False)


def test_thread_count_default_env_and_argument(monkeypatch):
    monkeypatch.delenv("HADA_THREADS", raising=False)
    assert ht.train_threads() == ht.DEFAULT_THREADS == 1
    monkeypatch.setenv("HADA_THREADS", "2")
    assert ht.train_threads() == 2 and ht.train_threads(3) == 3
    monkeypatch.setenv("HADA_THREADS", "two")
    with pytest.raises(HadaError):
        ht.train_threads()
