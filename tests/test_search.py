"""``hada search`` and the "Retrieval, seen" comparison on a tiny run: random-weight embedded backbones on the tiny
synthetic set, features extracted and one epoch trained once for the module."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hada.cli import main
from hada.config import TrainConfig
from hada.search import RunSearch, choose_queries, compare_text_to_image, outcome

BACKBONES = ["tiny-vit:random", "tiny-rn:random"]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def tiny_run(request, tmp_path_factory, tiny_synthetic):
    """(run folder, RunSearch of its test split) under a module-private HADA_DATA, trained and scored in fp32 and
    with bfloat16 autocast (which runs on any CPU)."""
    import hada.runs as hr
    from hada.features.store import ensure_features

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HADA_DATA", str(tmp_path_factory.mktemp("search-data")))
        mp.setenv("HADA_NO_PROGRESS", "1")
        ensure_features("synthetic", BACKBONES, ("train", "val", "test"), tiny_synthetic, device="cpu",
                        progress=False)
        config = TrainConfig().override(
            data={"dataset": "synthetic", "data_root": str(tiny_synthetic), "backbones": BACKBONES},
            width=16, out_dim=16, heads=2, head_dim=16, epochs=1, batch_size=16, queue_size=16, itm=False,
            precision=request.param, device="cpu")
        run = hr.run_experiment(config)
        search = RunSearch.open(run.run_dir, "test", device="cpu")
        yield run, search
        hr.clear_cache()


def _hada_data(tiny_run, monkeypatch):
    monkeypatch.setenv("HADA_DATA", str(tiny_run[0].run_dir.parents[1]))
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")


def test_gallery_is_what_evaluation_scores(tiny_run):
    run, search = tiny_run
    from hada.metrics import retrieval_metrics

    assert retrieval_metrics(search.similarity(), search.caption_image_index) == run.test_metrics


def test_a_caption_of_the_set_finds_its_stored_scores_and_its_image_first(tiny_run):
    """The query path (backbones -> store precision -> train statistics -> encoder) reproduces a stored caption,
    so search ranks as evaluation ranks; for a caption evaluation answers right, its image comes first."""
    _, search = tiny_run
    sims = search.similarity().block(slice(0, search.data.n_images), slice(0, search.data.n_captions))
    ranks = (sims > sims[search.caption_image_index, np.arange(sims.shape[1])][None, :]).sum(0)
    answered = np.flatnonzero(ranks.numpy() == 0)
    assert len(answered), "evaluation answers no caption of the tiny test split"
    j = int(answered[0])
    hits = search.text_to_image(search.captions[j], k=5)
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    own = int(search.caption_image_index[j])
    assert hits[0].row == own and hits[0].correct is True
    assert hits[0].path == Path(search.records[own].path)
    assert [h.score for h in hits] == pytest.approx(sims[[h.row for h in hits], j].tolist(), abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_an_image_of_the_set_finds_its_stored_scores(tiny_run):
    _, search = tiny_run
    sims = search.similarity().block(slice(0, 1), slice(0, search.data.n_captions))[0]
    hits = search.image_to_text(search.records[0].path, k=3)
    assert [h.row for h in hits] == torch.argsort(sims, descending=True, stable=True)[:3].tolist()
    assert [h.score for h in hits] == pytest.approx(sims[[h.row for h in hits]].tolist(), abs=1e-4)
    assert all(h.caption == search.captions[h.row] for h in hits)
    assert all(h.correct == (search.caption_image_index[h.row] == 0) for h in hits)


def test_choice_of_queries_is_seeded_and_shows_wins_and_losses():
    a = np.array([0, 3, 0, 2, 5, 1, 0, 0, 9])
    b = np.array([0, 1, 2, 2, 6, 0, 1, 0, 7])
    assert outcome(a, b).tolist() == [0, 1, -1, 0, -1, 1, -1, 0, 1]
    order = np.random.default_rng(0).permutation(len(a)).tolist()
    chosen = choose_queries(a, b, n_random=2, n_losses=2, n_wins=1, seed=0)
    assert chosen == choose_queries(a, b, n_random=2, n_losses=2, n_wins=1, seed=0)  # the same on every rebuild
    rows, reasons = [j for j, _ in chosen], [r for _, r in chosen]
    assert rows[:2] == order[:2] and reasons[:2] == ["random", "random"] and len(set(rows)) == len(rows)
    wins = [j for j in order[2:] if outcome(a, b)[j] > 0][:1]
    losses = [j for j in order[2:] if outcome(a, b)[j] < 0][:2]
    assert rows[2:] == wins + losses and reasons[2:] == ["win"] * len(wins) + ["loss"] * len(losses)
    everything = choose_queries(a, b, n_random=0, n_losses=9, n_wins=9)
    assert sorted(j for j, r in everything if r == "loss") == [2, 4, 6]  # only three losses exist
    visible = choose_queries(a, b, n_random=0, n_losses=9, n_wins=9, visible=2)
    assert sorted(j for j, _ in visible) == [1, 2, 5, 6]  # 4 and 8: the right image in neither's top 2


def test_comparison_counts_and_figure(tiny_run):
    from hada.baselines import backbone_similarity

    _, search = tiny_run
    seen = compare_text_to_image(search, {"vit": backbone_similarity(search.data, 0), "HADA": search.similarity()},
                                 n_random=2, n_wins=1, n_losses=1, top=3)
    from hada.book.views import RetrievalView

    seen = RetrievalView(seen)  # the book draws what hada.search computes
    counts = seen.counts()
    assert counts["queries"] == search.data.n_captions
    assert counts["wins"] + counts["losses"] + counts["ties"] == counts["queries"]
    assert seen.recall_at("HADA", 1) == tiny_run[0].test_metrics["image_retrieval_recall@1"]
    rows = seen.queries()
    assert len(rows) == len(seen.shown) and all(len(r["results"]["HADA"]) == 3 for r in rows)
    for r in rows:
        own = int(search.caption_image_index[r["row"]])
        rank = int(seen.ranks["HADA"][r["row"]])
        marked = [i for i, hit in enumerate(r["results"]["HADA"]) if hit["correct"]]
        assert marked == ([rank] if rank < 3 else []), own
    assert len(seen.table().rows) == len(seen.shown)
    seen.figure()
    galleries = seen.galleries()  # a gallery per query: the images, ids and scores in columns of their own
    assert len(galleries.tables) == len(seen.shown)
    html = galleries._repr_html_()
    assert html.count('<img class="hada-thumb" src="data:image/png;base64,') == len(seen.shown) * 2 * 3
    assert str(search.records[0].path.parent) not in html and str(search.records[0].path.parent) in str(galleries)
    for table, r in zip(galleries.tables, rows):
        assert [row["own1"] == "yes" for row in table.rows] == [hit["correct"] for hit in r["results"]["HADA"]]
        assert [row["id1"] for row in table.rows] == [str(hit["image_id"]) for hit in r["results"]["HADA"]]
        assert r["caption"] in table.caption


def test_cli_prints_the_table(tiny_run, monkeypatch, capsys):
    _hada_data(tiny_run, monkeypatch)
    run, search = tiny_run
    caption = search.captions[0]
    assert main(["search", "--run", "hada-k2", "--device", "cpu", "--k", "3", caption]) == 0
    out = capsys.readouterr().out
    assert "top 3 images of the test split" in out and "score" in out and str(search.records[0].path.parent) in out
    assert main(["search", "--run", str(run.run_dir), "--image", str(search.records[1].path), "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 2 captions" in out and "query's own" in out


@pytest.mark.parametrize("args, message", [
    (["--run", "no-such-run", "a red star"], "no run 'no-such-run'"),
    (["--run", "hada-k2", "   "], "empty query"),
    (["--run", "hada-k2"], "give either a caption"),
    (["--run", "hada-k2", "--image", "/no/such.png"], "no image file at /no/such.png"),
])
def test_cli_refuses_bad_input_in_one_line(tiny_run, monkeypatch, capsys, args, message):
    _hada_data(tiny_run, monkeypatch)
    assert main(["search", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hada: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_a_file_that_is_not_an_image(tiny_run, monkeypatch, capsys, tmp_path):
    _hada_data(tiny_run, monkeypatch)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["search", "--run", "hada-k2", "--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and len(err.strip().splitlines()) == 1
