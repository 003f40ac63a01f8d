"""Collect every metric parquet into one table, and the small summaries built from it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from robustify.eval.schema import COLUMNS, conform


def aggregate(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All metric files as one conformed frame. Read as Arrow tables and converted once: a default
    run has ~550 files, and a pandas frame + dtype pass per file took most of the report stage."""
    tables = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"metric file not found: {p}")
        table = pq.read_table(p)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{p}: missing result column(s) {missing}")
        tables.append(table.select(list(COLUMNS)))
    if not tables:
        raise ValueError("no metric files to aggregate")
    df = conform(pa.concat_tables(tables, promote_options="permissive").to_pandas(), source="metric files")
    key = ["model_id", "eval_dataset", "corruption", "severity", "metric"]
    dupes = df[df.duplicated(key, keep=False)]
    if not dupes.empty:
        raise ValueError(f"duplicate measurements for {dupes[key].drop_duplicates().head().to_dict('records')}")
    return df


def summary(df: pd.DataFrame) -> dict[str, Any]:
    """Nested {model_id: {eval_dataset: {metric: value}}} (a DVC metrics file), plus shift means.

    Kept small enough to diff: a corrupted set contributes the mean of each metric over its
    corruption × severity cells and its mCE rows, not every cell or per-corruption CE.
    """
    out: dict[str, Any] = {}
    df = df[df["model_id"].notna()]
    cells = df["corruption"].notna() & df["severity"].notna()
    per_corruption = df["corruption"].notna() & df["severity"].isna() & ~df["metric"].str.endswith("_subset")
    plain = df[~cells & ~per_corruption]
    means = df[cells].groupby(["model_id", "eval_dataset", "metric"], sort=False)["value"].mean().reset_index()
    for row in pd.concat([means, plain[["model_id", "eval_dataset", "metric", "value"]]]).itertuples(index=False):
        out.setdefault(row.model_id, {}).setdefault(row.eval_dataset, {})[row.metric] = round(float(row.value), 6)
    for model_id, part in df[~per_corruption].groupby("model_id", sort=False):
        shifted = part[(part["shift_type"] != "reference") & (part["metric"] == "accuracy")]
        if not shifted.empty:  # each set counts once, a corrupted one by its mean over cells
            out[model_id]["shift_mean_accuracy"] = round(float(shifted.groupby("eval_dataset")["value"].mean().mean()), 6)
    return out
