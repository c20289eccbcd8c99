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
        metric_row("similarity averaging", _metrics(55.0), kind="fusion"),
        metric_row("HADA", _metrics(66.0), kind="hada"),
    ])
    assert table.best_backbone["name"] == "b"
    assert table.gain_over_best_backbone == __import__("pytest").approx(10.0)
    assert table.gain_over("averaging") == __import__("pytest").approx(20.0)
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
