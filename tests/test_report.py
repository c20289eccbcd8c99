from hada.book.tables import METRIC_COLUMNS, ResultsTable, Table, metric_row, relative_gain


def _metrics(value):
    return {key: value for key, _ in METRIC_COLUMNS}


def test_relative_gain_is_percent_of_the_reference():
    assert relative_gain(103.6, 100.0) == __import__("pytest").approx(3.6)
    assert relative_gain(90.0, 100.0) == -10.0


def test_results_table_finds_best_backbone_and_gains():
    table = ResultsTable([
        metric_row("a", _metrics(50.0), kind="backbone"),
        metric_row("b", _metrics(60.0), kind="backbone"),
        metric_row("similarity averaging", _metrics(55.0), kind="average"),
        metric_row("HADA", _metrics(66.0), kind="hada"),
    ])
    assert table.best_backbone["name"] == "b"
    assert table.gain_over_best_backbone == __import__("pytest").approx(10.0)
    assert table.gain_over("average") == __import__("pytest").approx(20.0)
    assert [r["name"] for r in table.fusion_rows()] == ["similarity averaging", "HADA"]


def test_table_renders_text_and_escaped_html():
    table = Table([metric_row("<x>", _metrics(1.25))], caption="demo")
    assert "demo" in str(table) and "1.2" in str(table)
    assert "&lt;x&gt;" in table._repr_html_()


def test_strength_table_measures_the_fusion_gain_against_the_better_single_and_ranks_it():
    import math

    from hada.book.tables import StrengthTable
    from hada.experiments import StrengthPoint

    def point(a, b, pair_rsum):
        return StrengthPoint(("A", "B"), (a, b), (100.0, 90.0), pair_rsum, 30.0)

    points = [point(200, 50, 203), point(200, 100, 215), point(150, 200, 230), point(200, 190, 240)]
    assert [p.gain for p in points] == [3, 15, 30, 40] and points[2].ratio == 0.75  # over the better single
    table = StrengthTable.of(points, noise=6.0)
    assert [p.gain for p in table.helped()] == [15, 30, 40] and [p.gain for p in table.not_helped()] == [3]
    assert [r["beyond"] for r in table.rows if r["point"].gain == 3] == ["no"]
    assert table.rank_correlation() == 1.0  # closer in strength, larger gain, in every pair
    flipped = StrengthTable.of([point(200, 50, 240), point(200, 100, 215), point(200, 190, 203)], noise=6.0)
    assert flipped.rank_correlation() == -1.0
    assert math.isnan(StrengthTable.of(points[:2], noise=6.0).rank_correlation())
    assert StrengthTable.of([], noise=6.0).figure() is None  # real backbones: no snapshots, no plot


def test_strength_prose_and_recipe_ratios_come_from_the_rows():
    from hada.book.tables import RecipeTable, StrengthTable, seed_band
    from hada.experiments import RecipeResult, StrengthPoint

    points = [StrengthPoint(("A", "B@1"), (200.0, 50.0), (1.0, 1.0), 203.0, 30.0),
              StrengthPoint(("A", "B"), (200.0, 190.0), (1.0, 1.0), 240.0, 30.0)]
    table = StrengthTable.of(points, noise=seed_band([220.0, 224.0, 222.0]))
    assert table.noise == 4.0 and table.lowest().gain == 3.0 and table.highest().gain == 40.0
    assert table.describe([table.lowest()]) == "A + B@1 (+3.0 at a strength ratio of 0.25)"
    assert table.describe([]) == "no pair" and StrengthTable.describe([None]) == "no pair"

    metrics = {key: 1.0 for key in ("text_retrieval_recall@1", "text_retrieval_recall@5", "text_retrieval_recall@10",
                                    "image_retrieval_recall@1", "image_retrieval_recall@5",
                                    "image_retrieval_recall@10", "rsum")}
    recipes = RecipeTable.of([RecipeResult("miniature", "a", metrics, 10, 1500.0, 400, 1024, 1024, 15000),
                              RecipeResult("paper", "b", metrics, 7, 50.0, 8000, 6621, 64000, 15000)])
    assert recipes.slowdown("paper") == 30.0 and recipes.size_ratio("paper") == 20.0
    assert "1,500" in str(recipes) and "8,000" in str(recipes)
