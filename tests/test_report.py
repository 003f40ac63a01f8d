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


# ------------------------------------------------------------------ derived rows: mCE, effective robustness
from robustify.eval.metrics import ALEXNET_ERRORS, TEST_CORRUPTIONS  # noqa: E402
from robustify.report.derived import corruption_rows, effective_robustness_table_rows  # noqa: E402
from robustify.report.tables import robustness_markdown  # noqa: E402


def _cells(model, eval_set, corruptions, error_of):
    parts = []
    for c in corruptions:
        for s in range(1, 6):
            ctx = {"model_id": model, "method": "zeroshot", "eval_dataset": eval_set, "shift_type": "corruption",
                   "corruption": c, "severity": s}
            parts.append(make_rows(ctx, {"accuracy": 1 - error_of(c, s)}, n=10))
    return pd.concat(parts, ignore_index=True)


def test_mce_and_relative_mce_from_cells():
    # errors at half AlexNet's on every corruption: CE = 0.5 everywhere, mCE = 0.5
    cells = _cells("m", "in-c", TEST_CORRUPTIONS, lambda c, s: 0.5 * ALEXNET_ERRORS[c])
    clean = make_rows({"model_id": "m", "method": "zeroshot", "eval_dataset": "in", "shift_type": "reference"},
                      {"accuracy": 0.8}, n=50)
    df = pd.concat([clean, cells], ignore_index=True)
    out = corruption_rows(df, {"in-c": "in"})
    get = lambda metric, c=None: out[(out["metric"] == metric) & (  # noqa: E731
        out["corruption"].isna() if c is None else out["corruption"] == c)]["value"].item()
    assert get("mce") == pytest.approx(0.5)
    assert get("ce", "fog") == pytest.approx(0.5)
    # relative CE, gaussian noise by hand: (0.443214 - 0.2) / (0.886428 - 0.4348)
    assert get("relative_ce", "gaussian_noise") == pytest.approx(0.243214 / 0.451628)
    expected_rel = sum((0.5 * ALEXNET_ERRORS[c] - 0.2) / (ALEXNET_ERRORS[c] - 0.4348) for c in TEST_CORRUPTIONS) / 15
    assert get("relative_mce") == pytest.approx(expected_rel)
    assert (out["eval_dataset"] == "in-c").all() and (out["model_id"] == "m").all()
    assert out[out["metric"] == "mce"]["n"].item() == 15 * 5 * 10

    md = robustness_markdown(pd.concat([df, out], ignore_index=True))
    header = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| model")).split("|")]
    row = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| m ")).split("|")]
    assert header[-3:-1] == ["mCE", "rel. mCE"]
    assert row[header.index("mCE")] == "50.0" and row[header.index("rel. mCE")] == f"{100 * expected_rel:.1f}"

    s = summary(pd.concat([df, out], ignore_index=True))
    assert s["m"]["in-c"]["mce"] == pytest.approx(0.5)
    mean_acc = 1 - 0.5 * sum(ALEXNET_ERRORS[c] for c in TEST_CORRUPTIONS) / 15
    assert s["m"]["in-c"]["accuracy"] == pytest.approx(mean_acc, abs=1e-6)
    assert "ce" not in s["m"]["in-c"]  # per-corruption CE stays in the parquet, not the DVC metric


def test_partial_runs_give_subset_rows_and_incomplete_severities_none():
    three = ["gaussian_noise", "fog", "contrast"]
    cells = _cells("m", "mini-c", three, lambda c, s: 0.1 * s)
    out = corruption_rows(cells)
    assert set(out["metric"]) == {"ce", "mce_subset"}
    sub = out[out["metric"] == "mce_subset"]
    assert sub["corruption"].item() == "gaussian_noise+fog+contrast"
    expected = sum(1.5 / (5 * ALEXNET_ERRORS[c]) for c in three) / 3  # Σ_s 0.1·s = 1.5
    assert sub["value"].item() == pytest.approx(expected)
    # severities 1-3 only: no AlexNet normaliser exists, so no rows at all
    partial = cells[cells["severity"] <= 3]
    assert corruption_rows(partial).empty


def test_effective_robustness_rows_follow_the_baseline_fit():
    import numpy as np

    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    parts = []
    # three baselines exactly on logit(shift) = 0.8·logit(ref) − 0.5, and one model 5 points above it
    for model, ref in (("b1", 0.5), ("b2", 0.7), ("b3", 0.9), ("robust", 0.8)):
        shift = float(sigmoid(0.8 * logit(ref) - 0.5)) + (0.05 if model == "robust" else 0.0)
        parts.append(_rows(model, "photo", "reference", ref))
        parts.append(_rows(model, "sketch", "domain", shift))
    df = pd.concat(parts, ignore_index=True)
    out = effective_robustness_table_rows(df, "photo", ["b1", "b2", "b3"])
    rho = out[out["metric"] == "effective_robustness"].set_index("model_id")["value"]
    assert rho["robust"] == pytest.approx(0.05, abs=1e-9)
    assert rho[["b1", "b2", "b3"]].abs().max() < 1e-9
    fit = out[out["model_id"].isna()].set_index("metric")["value"]
    assert fit["effective_robustness_slope"] == pytest.approx(0.8)
    assert fit["effective_robustness_intercept"] == pytest.approx(-0.5)
    assert effective_robustness_table_rows(df, "photo", ["b1"]).empty  # one baseline: no fit
    with pytest.raises(ValueError, match="baselines: no results for model"):
        effective_robustness_table_rows(df, "photo", ["b1", "nope"])
    md = robustness_markdown(pd.concat([df, out], ignore_index=True))
    assert "Effective robustness" in md and "5.00" in md


def test_flip_rates_relative_to_the_baseline():
    from robustify.report.derived import flip_rate_rows

    def fp(model, values):
        return pd.concat([make_rows({"model_id": model, "eval_dataset": "p", "shift_type": "synthetic",
                                     "corruption": k}, {"flip_probability": v}, n=100) for k, v in values.items()],
                         ignore_index=True)

    df = pd.concat([fp("base", {"rotate": 0.2, "translate": 0.1}), fp("m", {"rotate": 0.1, "translate": 0.15})])
    out = flip_rate_rows(df, "base")
    m = out[out["model_id"] == "m"]
    assert m[m["metric"] == "flip_rate"].set_index("corruption")["value"].to_dict() == pytest.approx(
        {"rotate": 0.5, "translate": 1.5})
    assert m[m["metric"] == "mfr"]["value"].item() == pytest.approx(1.0)
    assert out[(out["model_id"] == "base") & (out["metric"] == "mfr")]["value"].item() == pytest.approx(1.0)
    assert flip_rate_rows(df, None).empty
    md = robustness_markdown(pd.concat([df, out], ignore_index=True))
    assert "flip probability (%) per perturbation" in md
    row = [c.strip() for c in next(ln for ln in md.splitlines() if ln.startswith("| m ")).split("|")]
    assert row[2:5] == ["10.00", "15.00", "100.00"]  # rotate, translate, mFR (%)
