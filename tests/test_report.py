"""Results schema, aggregation and tables (pure functions of all_metrics.parquet)."""

from __future__ import annotations

import pandas as pd
import pytest

from robustify.eval.schema import COLUMNS, make_rows
from robustify.io import write_parquet
from robustify.report.aggregate import aggregate, summary
from robustify.report.tables import metric_table, zeroshot_markdown


def _rows(model, eval_set, shift, acc):
    ctx = {"model_id": model, "method": "zeroshot", "eval_dataset": eval_set, "shift_type": shift, "seed": 0,
           "method_params": {"templates": ["a {}."]}}
    return make_rows(ctx, {"accuracy": acc, "ece": 0.1, "nll": 1.0}, n=100)


def test_rows_follow_the_design_schema():
    df = _rows("zeroshot/m", "photo", "reference", 0.5)
    assert tuple(df.columns) == COLUMNS
    assert list(df["metric"]) == ["accuracy", "ece", "nll"]
    assert df["method_params"].iloc[0] == '{"templates": ["a {}."]}'
    with pytest.raises(ValueError, match="unknown result column"):
        make_rows({"modle_id": "x"}, {"accuracy": 1.0}, n=1)


def test_aggregate_tables_and_summary(tmp_path):
    paths = []
    for i, (name, shift, acc) in enumerate([("photo", "reference", 0.4), ("sketch", "domain", 0.7), ("clip", "domain", 0.9)]):
        paths.append(tmp_path / f"{i}.parquet")
        write_parquet(paths[-1], _rows("zeroshot/m", name, shift, acc))
    df = aggregate(paths)
    table = metric_table(df, "accuracy")
    assert list(table.columns) == ["photo", "sketch", "clip", "shift mean"]
    assert table.loc["zeroshot/m"].tolist() == pytest.approx([40.0, 70.0, 90.0, 80.0])
    s = summary(df)
    assert s["zeroshot/m"]["sketch"]["accuracy"] == 0.7
    assert s["zeroshot/m"]["shift_mean_accuracy"] == pytest.approx(0.8)
    md = zeroshot_markdown(df)
    assert "| zeroshot/m |" in md and "80.00" in md


def test_duplicate_measurements_are_refused(tmp_path):
    for i in range(2):
        write_parquet(tmp_path / f"{i}.parquet", _rows("zeroshot/m", "photo", "reference", 0.4))
    with pytest.raises(ValueError, match="duplicate measurements"):
        aggregate(sorted(tmp_path.glob("*.parquet")))


def test_foreign_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"model_id": ["x"]}).to_parquet(bad)
    with pytest.raises(ValueError, match="bad.parquet: missing result column"):
        aggregate([bad])
