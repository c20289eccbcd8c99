"""Numbers with their uncertainty: the paired bootstrap over test images (known answers and a brute-force
loop), the results' seeds as runs of ``hada.experiments``, and the seed spread the ablation chapter reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hada.errors import HadaError
from hada.metrics import (bootstrap_counts, metrics_from_ranks, paired_bootstrap, retrieval_metrics,
                          retrieval_ranks)


def toy_ranks(n_images=30, per_image=3, seed=0):
    """Random similarities of a split with ``per_image`` captions per image, their ranks and caption index."""
    gen = torch.Generator().manual_seed(seed)
    ci = np.repeat(np.arange(n_images), per_image)
    sims = torch.rand(n_images, ci.size, generator=gen)
    return retrieval_ranks(sims, ci), ci, sims


def test_identical_systems_give_an_interval_of_exactly_zero():
    ranks, ci, _ = toy_ranks()
    result = paired_bootstrap([ranks], [ranks], ci, n_boot=500)
    assert result.difference == 0.0 and result.difference_interval == (0.0, 0.0)
    assert result.relative_interval == (0.0, 0.0) and result.verdict == "within noise"


def test_a_system_better_on_every_query_has_a_strictly_positive_interval_and_the_exact_point():
    ranks, ci, sims = toy_ranks(seed=1)
    perfect = sims.clone()
    perfect[torch.as_tensor(ci), torch.arange(ci.size)] = 2.0  # every positive above every negative
    best = retrieval_ranks(perfect, ci)
    assert metrics_from_ranks(*best)["rsum"] == 600.0
    worse = (ranks[0] + 10, ranks[1] + 10)  # every query misses at every k: Rsum 0
    result = paired_bootstrap([best], [worse], ci, n_boot=300)
    assert result.difference == 600.0 and result.difference_interval == (600.0, 600.0)
    # strictly better on every query, by different margins: a positive interval around the exact difference
    result = paired_bootstrap([best], [ranks], ci, n_boot=300)
    expect = 600.0 - retrieval_metrics(sims, ci)["rsum"]
    assert result.difference == pytest.approx(expect, abs=1e-9)
    low, high = result.difference_interval
    assert 0 < low <= result.difference <= high and result.verdict == "holds"
    assert paired_bootstrap([ranks], [best], ci, n_boot=300).verdict == "reversed"


def brute_force(a, b, ci, counts):
    """Rsum(a) - Rsum(b) on each resample, by building the resampled query lists and scoring them."""
    out = []
    for row in counts.astype(int):
        images = np.repeat(np.arange(row.size), row)
        captions = np.concatenate([np.flatnonzero(ci == i) for i in images])
        rsum = [metrics_from_ranks(i2t[images], t2i[captions])["rsum"] for i2t, t2i in (a, b)]
        out.append(rsum[0] - rsum[1])
    return np.array(out)


def test_bootstrap_equals_a_brute_force_loop_on_a_tiny_case():
    n_images = 12
    ci = np.array([i for i in range(n_images) for _ in range(1 + i % 3)])  # 1 to 3 captions per image
    gen = torch.Generator().manual_seed(3)
    a = retrieval_ranks(torch.rand(n_images, ci.size, generator=gen), ci)
    b = retrieval_ranks(torch.rand(n_images, ci.size, generator=gen), ci)
    n_boot, seed = 200, 7
    loop = brute_force(a, b, ci, bootstrap_counts(n_images, n_boot, seed))
    result = paired_bootstrap([a], [b], ci, n_boot=n_boot, seed=seed)
    low, high = np.percentile(loop, [2.5, 97.5])
    assert result.difference_interval == pytest.approx((low, high), abs=1e-9)
    assert result.difference == pytest.approx(metrics_from_ranks(*a)["rsum"] - metrics_from_ranks(*b)["rsum"])
    assert paired_bootstrap([a], [b], ci, n_boot=n_boot, seed=seed) == result  # seeded: the same interval
    assert paired_bootstrap([a], [b], ci, n_boot=n_boot, seed=seed + 1) != result


def test_several_seeds_are_their_mean_system():
    (r1, ci, _), (r2, _, _) = toy_ranks(seed=4), toy_ranks(seed=5)
    base, _, _ = toy_ranks(seed=6)
    result = paired_bootstrap([r1, r2], [base], ci, n_boot=100)
    mean = (metrics_from_ranks(*r1)["rsum"] + metrics_from_ranks(*r2)["rsum"]) / 2
    assert result.difference == pytest.approx(mean - metrics_from_ranks(*base)["rsum"])


def test_counts_draw_every_image_count_once_per_resample():
    counts = bootstrap_counts(50, 40, seed=0)
    assert counts.shape == (40, 50) and (counts.sum(axis=1) == 50).all()


def test_bad_bootstrap_input_is_one_clear_error():
    ranks, ci, _ = toy_ranks()
    with pytest.raises(HadaError, match="list of"):
        paired_bootstrap(ranks, [ranks], ci)  # one pair, not a list of pairs
    with pytest.raises(HadaError, match="captions"):
        paired_bootstrap([ranks], [(ranks[0], ranks[1][:-1])], ci)
    with pytest.raises(HadaError, match="level"):
        paired_bootstrap([ranks], [ranks], ci, level=95)


# ------------------------------------------------------------------------------------ seeds as runs
def test_results_train_three_seeds_for_k2_and_one_for_k3_and_prepare_makes_them(tiny_synthetic):
    import hada.experiments as hx

    setting = hx.resolve(data_root=tiny_synthetic, backbones="tiny-vit:random,tiny-rn:random,tiny-vit-gray:random",
                         seed=5)
    book = hx.plan(setting)
    k2 = book.results(2)
    assert [(name, c.seed, c.model.arch) for name, c in k2] == [
        ("concat-tiny-vit_random+tiny-rn_random", 5, "concat"), ("hada-k2", 5, "hada"),
        ("concat-tiny-vit_random+tiny-rn_random-seed6", 6, "concat"), ("hada-k2-seed6", 6, "hada"),
        ("concat-tiny-vit_random+tiny-rn_random-seed7", 7, "concat"), ("hada-k2-seed7", 7, "hada")]
    assert [c.seed for _, c in book.results(3)] == [5, 5]
    assert [name for name, _ in book.hada[2]] == ["hada-k2", "hada-k2-seed6", "hada-k2-seed7"]
    names = [name for name, _ in book.training()]
    assert {name for name, _ in k2} <= set(names) and len(names) == len(set(names))
    # the seeds differ only in the seed: the default K=2 run is the ablations' default, trained once
    base = book.hada[2][0].config.to_dict()
    assert all({**c.to_dict(), "seed": 5} == base for name, c in k2 if name.startswith("hada"))


@pytest.fixture
def toy_world(monkeypatch, tmp_path):
    """Small random feature stores in place of extracted ones (as tests/test_baselines.py does): runs train in
    seconds, with no backbone and no extraction."""
    import hada.runs as hr
    import hada.train as ht
    from fixtures.toy_features import toy_splits

    monkeypatch.setenv("HADA_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    stores = {s: toy_splits(n_images=20 if s == "train" else 10, seed=seed)
              for s, seed in {"train": 0, "val": 1, "test": 2}.items()}
    monkeypatch.setattr(ht, "open_splits", lambda config, split: stores[split][: len(config.data.backbones)])
    hr.clear_cache()
    yield
    hr.clear_cache()


@pytest.fixture
def two_torch_threads():
    """The chapter's process on two threads (training runs on one): scores must not follow the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["fp32", "bf16"])
def test_results_carry_seeds_ranks_that_reproduce_each_run_and_gain_intervals(toy_world, two_torch_threads, tmp_path,
                                                                              monkeypatch, native_bf16):
    """The bootstrap's ranks (scored by the chapter's process, on its thread count) equal each run's own test
    scores (scored by training, on one thread) exactly, also where "auto" precision means bfloat16 (a GPU's)."""
    import hada.book as hb
    import hada.config
    from hada.experiments import Setting, plan
    from hada.metrics import metrics_from_ranks

    # "auto" resolved as on a device that trains in bfloat16, on this CPU (autocast runs on any)
    monkeypatch.setattr(hada.config, "has_bf16", lambda device_type: native_bf16)

    setting = Setting("synthetic", tmp_path / "unused", ("toy0", "toy1"), epochs=1, pairs_per_epoch=None, seed=0,
                      device="cpu")
    table = hb.results(setting, k=2)
    assert plan(setting).hada[2][0].config.model.precision == ("bf16" if native_bf16 else "fp32")
    hada = next(s for s in table.systems if s.kind == "hada")
    assert hada.seeds == (0, 1, 2) and len(hada.ranks) == 3
    assert len({m["rsum"] for m in hada.metrics}) > 1  # the seeds are different runs
    for system in table.systems:
        for metrics, ranks in zip(system.metrics, system.ranks):
            again = metrics_from_ranks(*(torch.from_numpy(r) for r in ranks))
            assert again == {k: metrics[k] for k in again}, system.name
    assert table.hada["rsum"] == pytest.approx(sum(m["rsum"] for m in hada.metrics) / 3)
    assert table.hada["rsum_std"] == f"{np.std([m['rsum'] for m in hada.metrics], ddof=1):.1f}"
    assert all(r["seeds"] == "" for r in table.of_kind("backbone"))
    gains = hb.gains(table, n_boot=200)
    assert [r["key"] for r in gains.rows] == ["best", "average", "concat"]
    best = gains.gain("best")
    assert best["difference"] == pytest.approx(table.hada["rsum"] - table.best_backbone["rsum"], abs=1e-6)
    assert best["low"] <= best["difference"] <= best["high"] and best["verdict"] in best["phrase"]
    assert gains.summary().startswith("the gain") and "Δ Rsum" in str(gains)
    ablations = hb.ablations(setting, variants=hb.ABLATIONS[:2])
    assert ablations.seed_rsums == [m["rsum"] for m in hada.metrics]
    assert ablations.default["rsum"] == ablations.seed_rsums[0]  # the default is the chapter seed's run
    # training keeps the test ranks it scored with; without them the book computes the same from the best model
    from hada.experiments import run_test_ranks
    from hada.metrics import load_ranks
    from hada.runs import run_experiment
    from hada.train import TEST_RANKS_FILE

    run = run_experiment(plan(setting).hada[2][0].config)
    saved = load_ranks(run.run_dir / TEST_RANKS_FILE)
    (run.run_dir / TEST_RANKS_FILE).unlink()
    assert all(np.array_equal(a, b) for a, b in zip(run_test_ranks(run), saved))


def test_ablation_table_marks_variants_beyond_the_seed_spread():
    from hada.book.tables import AblationTable

    rows = [{"name": "default", "rsum": 200.0}, {"name": "a", "rsum": 203.0}, {"name": "b", "rsum": 190.0}]
    for row in rows:
        row["delta"] = row["rsum"] - 200.0
    table = AblationTable(rows, seed_rsums=[200.0, 202.0, 198.0]).mark_spread()  # std 2: band +-4
    assert table.spread == pytest.approx(4.0)
    assert [r["name"] for r in table.beyond_spread()] == ["b"]
    assert [r["beyond"] for r in table.variants] == ["no", "yes"] and "beyond ±4.0" in str(table)
