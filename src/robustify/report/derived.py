"""Robustness numbers that combine several measurements: mCE from the per-corruption × severity rows of
one model, effective robustness from several models. The report stage appends these rows to
all_metrics.parquet, so every table stays a pure function of that file (DESIGN §5)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd

from robustify.eval.metrics import (
    ALEXNET_ERRORS,
    SEVERITIES,
    TEST_CORRUPTIONS,
    effective_robustness,
    effective_robustness_rows,
    fit_effective_robustness,
    flip_rates,
    mce_rows,
    mce_summary,
    mean_flip_rate,
    severity_table,
)
from robustify.eval.schema import make_rows

log = logging.getLogger(__name__)

# Columns a derived row inherits from the measurements it is computed from.
_CONTEXT = ("model_id", "model_family", "arch", "method", "method_params", "seed", "train_dataset",
            "eval_dataset", "shift_type", "run_id")


def _context(part: pd.DataFrame) -> dict[str, object]:
    first = part.iloc[0]
    return {c: (None if pd.isna(first[c]) else first[c]) for c in _CONTEXT}


def clean_accuracy(df: pd.DataFrame, model_id: str, eval_dataset: str) -> float | None:
    rows = df[(df["model_id"] == model_id) & (df["eval_dataset"] == eval_dataset) & (df["metric"] == "accuracy")
              & df["corruption"].isna()]
    return None if rows.empty else float(rows["value"].iloc[0])


def corruption_rows(df: pd.DataFrame, clean_sets: Mapping[str, str] | None = None) -> pd.DataFrame:
    """CE per corruption and mCE (AlexNet-normalised, SPEC §5) for every model × corrupted eval set.

    Only corruptions measured at all five severities have an AlexNet normaliser; mCE is the published
    number when all 15 test corruptions are there, else an `mce_subset` row naming what it averages.
    `clean_sets` maps a corrupted eval set to its clean counterpart (ImageNet-C → ImageNet) for the
    relative CE/mCE; without one only the plain CE/mCE is written.
    """
    clean_sets = clean_sets or {}
    cells = df[(df["metric"] == "accuracy") & df["corruption"].notna() & df["severity"].notna()]
    parts = []
    for (model_id, eval_dataset), part in cells.groupby(["model_id", "eval_dataset"], sort=False):
        errors = 1.0 - severity_table(part)
        complete = [c for c in errors.index if c in ALEXNET_ERRORS
                    and all(s in errors.columns for s in SEVERITIES) and errors.loc[c, list(SEVERITIES)].notna().all()]
        if not complete:
            log.info("%s on %s: no corruption at all 5 severities, no mCE", model_id, eval_dataset)
            continue
        tests = [c for c in TEST_CORRUPTIONS if c in complete]
        subset = None if len(tests) == len(TEST_CORRUPTIONS) else (tests or complete)
        clean = clean_sets.get(str(eval_dataset))
        clean_acc = None if clean is None else clean_accuracy(df, str(model_id), clean)
        if clean is not None and clean_acc is None:
            log.warning("%s: clean set '%s' has no accuracy for %s; relative mCE skipped", eval_dataset, clean, model_id)
        summary = mce_summary(errors.loc[complete, list(SEVERITIES)], None if clean_acc is None else 1.0 - clean_acc, subset)
        parts.append(mce_rows(_context(part), summary, n=int(part["n"].sum())))
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]


def set_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """model × eval set top-1 accuracy of the uncorrupted measurements."""
    acc = df[(df["metric"] == "accuracy") & df["corruption"].isna() & df["model_id"].notna()]
    return acc.pivot_table(index="model_id", columns="eval_dataset", values="value", aggfunc="first", sort=False)


def effective_robustness_table_rows(df: pd.DataFrame, reference: str, baselines: Sequence[str]) -> pd.DataFrame:
    """ρ per model on every shifted eval set, against the logit-linear fit over `baselines` [Taori et al.].

    Baselines that lack an accuracy on the reference or the shifted set are left out of that fit; a
    set whose fit would have fewer than 2 baselines gets no rows (logged), rather than a meaningless line.
    """
    acc = set_accuracy(df)
    if reference not in acc.columns:
        raise ValueError(f"report.effective_robustness.reference: no accuracy rows for eval set '{reference}'")
    unknown = [b for b in baselines if b not in acc.index]
    if unknown:
        raise ValueError(f"report.effective_robustness.baselines: no results for model(s) {unknown}")
    shift_of = df.dropna(subset=["eval_dataset"]).groupby("eval_dataset")["shift_type"].first()
    parts = []
    for target in acc.columns:
        if target == reference:
            continue
        pair = acc[[reference, target]].dropna()
        base = pair.loc[[b for b in baselines if b in pair.index]]
        if len(base) < 2:
            log.info("effective robustness on %s: %d baseline(s) with both accuracies, need 2", target, len(base))
            continue
        fit = fit_effective_robustness(base[reference].tolist(), base[target].tolist())
        rho = effective_robustness(fit, pair[reference].to_dict(), pair[target].to_dict())
        ctx = {"eval_dataset": target, "shift_type": shift_of.get(target), "method_params": {"reference": reference}}
        parts.append(effective_robustness_rows(ctx, rho, fit, n=None))
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]


def flip_rate_rows(df: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """FR_p = FP_p(model) / FP_p(baseline) per perturbation and mFR, for every model × sequence set on which
    `baseline` (a model id run through the same pipeline; SPEC §5) was evaluated too."""
    fp = df[(df["metric"] == "flip_probability") & df["corruption"].notna() & df["model_id"].notna()]
    if baseline is None or fp.empty:
        return df.iloc[:0]
    parts = []
    for eval_dataset, part in fp.groupby("eval_dataset", sort=False):
        base = part[part["model_id"] == baseline].set_index("corruption")["value"].to_dict()
        if not base:
            log.warning("flip rates on %s: baseline %s was not evaluated there", eval_dataset, baseline)
            continue
        for model_id, mp in part.groupby("model_id", sort=False):
            rates = flip_rates(mp.set_index("corruption")["value"].to_dict(), base)
            ctx = {**_context(mp), "severity": None}
            n = int(mp["n"].min())
            parts += [make_rows({**ctx, "corruption": p}, {"flip_rate": v}, n) for p, v in rates.items()]
            parts.append(make_rows({**ctx, "corruption": None}, {"mfr": mean_flip_rate(rates)}, n))
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]
