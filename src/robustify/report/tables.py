"""Markdown tables from all_metrics.parquet. Column order = first appearance (the params order)."""

from __future__ import annotations

import pandas as pd

from robustify.corruptions.names import ALL_CORRUPTIONS

_PERCENT = {"accuracy", "ece", "effective_robustness"}


def metric_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """model × eval set for one metric (accuracy and ECE in %), with the mean over shifted sets.
    A corrupted set shows the mean over its corruption × severity cells; per-perturbation rows of
    sequence sets (corruption without severity) belong to the robustness table, not here."""
    part = df[(df["metric"] == metric) & df["model_id"].notna() & ~(df["corruption"].notna() & df["severity"].isna())]
    if part.empty:
        raise ValueError(f"no '{metric}' rows to tabulate")
    order = list(dict.fromkeys(part["eval_dataset"]))
    table = part.pivot_table(index="model_id", columns="eval_dataset", values="value", aggfunc="mean", sort=False)
    table = table[order]
    shifted = [c for c in order if (part[part["eval_dataset"] == c]["shift_type"] != "reference").all()]
    if shifted and len(shifted) < len(order):
        table["shift mean"] = table[shifted].mean(axis=1)
    if metric in _PERCENT:
        table = table * 100
    table.index.name = "model"
    table.columns.name = None
    return table


def zeroshot_markdown(df: pd.DataFrame) -> str:
    zs = df[df["method"] == "zeroshot"]
    n = zs.groupby("eval_dataset", sort=False)["n"].first()
    parts = ["# Zero-shot evaluation", ""]
    for metric, title in (("accuracy", "Top-1 accuracy (%)"), ("ece", "ECE, 15 bins (%)"), ("nll", "NLL")):
        parts += [f"## {title}", "", metric_table(zs, metric).to_markdown(floatfmt=".2f" if metric != "nll" else ".3f"), ""]
    parts += ["Images per eval set: " + ", ".join(f"{k} {v}" for k, v in n.items()), ""]
    return "\n".join(parts)


def _models(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["model_id"].dropna()))


def corruption_tables(df: pd.DataFrame, eval_dataset: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(model × corruption accuracy % averaged over severities, with CE/mCE columns where computed;
    model × severity accuracy % averaged over corruptions) for one corrupted eval set."""
    part = df[df["eval_dataset"] == eval_dataset]
    cells = part[(part["metric"] == "accuracy") & part["corruption"].notna() & part["severity"].notna()]
    by_corruption = cells.pivot_table(index="model_id", columns="corruption", values="value", aggfunc="mean", sort=False) * 100
    known = {c: i for i, c in enumerate(ALL_CORRUPTIONS)}  # the paper's order: noise, blur, weather, digital
    by_corruption = by_corruption[sorted(dict.fromkeys(cells["corruption"]), key=lambda c: known.get(c, len(known)))]
    by_corruption["mean"] = by_corruption.mean(axis=1)
    for metric, label in (("mce", "mCE"), ("relative_mce", "rel. mCE"), ("mce_subset", "mCE (subset)"),
                          ("relative_mce_subset", "rel. mCE (subset)")):
        agg = part[part["metric"] == metric].set_index("model_id")["value"]
        if not agg.empty:
            by_corruption[label] = agg.reindex(by_corruption.index) * 100
    by_severity = cells.pivot_table(index="model_id", columns="severity", values="value", aggfunc="mean", sort=True) * 100
    by_severity.columns = [f"s{int(c)}" for c in by_severity.columns]
    for t in (by_corruption, by_severity):
        t.index.name, t.columns.name = "model", None
    return by_corruption, by_severity


def robustness_markdown(df: pd.DataFrame) -> str:
    """Corrupted sets (accuracy per corruption/severity, mCE, relative mCE) and effective robustness."""
    parts = ["# Robustness", ""]
    corrupted = list(dict.fromkeys(df.loc[df["corruption"].notna() & df["severity"].notna(), "eval_dataset"]))
    for name in corrupted:
        by_corruption, by_severity = corruption_tables(df, name)
        subset = df[(df["eval_dataset"] == name) & df["metric"].isin(["mce_subset", "relative_mce_subset"])]
        parts += [f"## {name}: top-1 accuracy (%) per corruption, mean over severities", "",
                  by_corruption.to_markdown(floatfmt=".1f"), ""]
        parts += ["mCE and relative mCE in %, normalised by AlexNet's ImageNet-C errors (Hendrycks & Dietterich "
                  "2019); relative mCE uses each model's error on the clean counterpart set."]
        if not subset.empty:
            parts += [f"Subset means average only: {subset['corruption'].iloc[0].replace('+', ', ')}."]
        parts += ["", f"## {name}: top-1 accuracy (%) per severity, mean over corruptions", "",
                  by_severity.to_markdown(floatfmt=".1f"), ""]
    if not corrupted:
        parts += ["No corrupted eval sets in this run.", ""]
    for name in dict.fromkeys(df.loc[df["metric"] == "flip_probability", "eval_dataset"]):
        part = df[(df["eval_dataset"] == name) & df["model_id"].notna()]
        fp = part[part["metric"] == "flip_probability"]
        table = fp.pivot_table(index="model_id", columns="corruption", values="value", aggfunc="first", sort=False)
        table = table[list(dict.fromkeys(fp["corruption"]))] * 100
        for metric, label in (("mfr", "mFR"),):
            agg = part[part["metric"] == metric].set_index("model_id")["value"]
            if not agg.empty:
                table[label] = agg.reindex(table.index) * 100
        table.index.name, table.columns.name = "model", None
        parts += [f"## {name}: flip probability (%) per perturbation", "", table.to_markdown(floatfmt=".2f"), "",
                  "mFR in %: mean over perturbations of FP(model) / FP(baseline), the baseline being "
                  "`report.flip_rate_baseline` evaluated in the same run (SPEC §5).", ""]
    er = df[df["metric"] == "effective_robustness"]
    if not er.empty:
        ref = er["method_params"].iloc[0]
        parts += ["## Effective robustness (accuracy points above the baseline fit)", "",
                  f"Logit-linear fit over the baseline models ({ref}).", "",
                  metric_table(er, "effective_robustness").to_markdown(floatfmt=".2f"), ""]
    return "\n".join(parts)
