"""Markdown tables from all_metrics.parquet. Column order = first appearance (the params order)."""

from __future__ import annotations

import pandas as pd

_PERCENT = {"accuracy", "ece"}


def metric_table(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """model × eval set for one metric (accuracy and ECE in %), with the mean over shifted sets."""
    part = df[df["metric"] == metric]
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
