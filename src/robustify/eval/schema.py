"""The results schema (DESIGN §5): long format, one row per measurement.

Every evaluation writes parquet in exactly these columns; the report stage only reads them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

COLUMNS: tuple[str, ...] = (
    "model_id", "model_family", "arch", "method", "method_params", "seed", "train_dataset",
    "eval_dataset", "shift_type", "corruption", "severity", "metric", "value", "n", "run_id", "created_at",
)
_DTYPES = {"seed": "Int64", "severity": "Int64", "n": "Int64", "value": "float64"}


def make_rows(context: Mapping[str, Any], metrics: Mapping[str, float], n: int) -> pd.DataFrame:
    """One row per metric; `context` supplies every other column (missing ones become null)."""
    return make_rows_many([(context, metrics, n)])


def make_rows_many(groups: Sequence[tuple[Mapping[str, Any], Mapping[str, float], int]]) -> pd.DataFrame:
    """`make_rows` for many (context, metrics, n) groups in one frame: one `conform` instead of one per
    group (a corrupted set has 75 cells per model, and building small frames dominated evaluation)."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for context, metrics, n in groups:
        unknown = set(context) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result column(s): {sorted(unknown)}")
        base = {c: context.get(c) for c in COLUMNS}
        if not isinstance(base["method_params"], str):
            base["method_params"] = json.dumps(base["method_params"] or {}, sort_keys=True)
        rows += [{**base, "metric": k, "value": float(v), "n": n, "created_at": base["created_at"] or now}
                 for k, v in metrics.items()]
    return conform(pd.DataFrame(rows, columns=list(COLUMNS)))


def conform(df: pd.DataFrame, source: str = "results") -> pd.DataFrame:
    """Check the columns and normalise dtypes so frames from different jobs concatenate cleanly."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing result column(s) {missing}")
    df = df[list(COLUMNS)].copy()
    for col, dtype in _DTYPES.items():
        df[col] = df[col].astype(dtype)
    for col in set(COLUMNS) - set(_DTYPES):
        df[col] = df[col].astype("string")
    return df
