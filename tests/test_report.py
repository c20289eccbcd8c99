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
