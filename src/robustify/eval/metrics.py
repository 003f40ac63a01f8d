"""Classification and robustness metrics (SPEC §5).

Per-sample metrics are computed over a whole dataset (never averaged per batch). Robustness metrics
(mCE, mFR, effective robustness) combine those dataset-level numbers across corruptions, perturbation
sequences or models, and `*_rows` turn them into DESIGN §5 result rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from robustify.corruptions.names import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES  # noqa: F401 (re-exported)
from robustify.eval.schema import make_rows_many


# ImageNet-C names, in the corruptions layer (re-exported here for the metric functions' users).
TEST_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS

# AlexNet top-1 error per corruption, *averaged over the 5 severities* (SPEC §5, Hendrycks & Dietterich
# 2019). The CE denominator Σ_s E^AlexNet_{s,c} is therefore 5 × this mean.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
    "speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
}
ALEXNET_CLEAN_ERROR: float = 0.4348


# --------------------------------------------------------------------------- per-sample metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Fraction of samples whose label is among the `k` highest logits (ImageNet reports top-1/top-5).
    Same number as torchmetrics' micro `multiclass_accuracy(top_k=k)` (tested); see `ece` for why it is
    not called here."""
    n_classes = logits.shape[1]
    if not 1 <= k <= n_classes:
        raise ValueError(f"top-{k} accuracy needs 1 <= k <= number of classes ({n_classes})")
    hits = logits.topk(k, dim=1).indices.eq(labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    return F.cross_entropy(logits.double(), labels, reduction="mean").item()


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: max-probability confidence in `n_bins` equal-width bins over
    the whole dataset, |accuracy − confidence| weighted by bin size (Guo et al. 2017).

    Computed as torchmetrics' `multiclass_calibration_error(norm="l1")` does, step for step (float32
    confidences, right-closed `bucketize`, so a confidence of exactly 1 gets a bin of its own), and
    tested equal to it. Deviation from "use torchmetrics", with the reason: importing torchmetrics (and
    scipy with it) costs ~1.5 s of CPU in every evaluation job, about 20 s of the 15-minute demo.
    """
    probs = logits.double().softmax(dim=1)
    confidences, predictions = probs.max(dim=1)
    confidences = confidences.float()
    accuracies = predictions.eq(labels).float()
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype, device=confidences.device)
    index = torch.bucketize(confidences, bounds, right=True) - 1
    count = torch.zeros(len(bounds), dtype=confidences.dtype, device=confidences.device)
    count.scatter_add_(0, index, torch.ones_like(confidences))
    conf_bin = torch.nan_to_num(torch.zeros_like(count).scatter_add_(0, index, confidences) / count)
    acc_bin = torch.nan_to_num(torch.zeros_like(count).scatter_add_(0, index, accuracies) / count)
    return torch.sum(torch.abs(acc_bin - conf_bin) * (count / count.sum())).item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """accuracy, ece, nll, and top5 when there are at least 5 classes (top-5 is trivial below that)."""
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    out = {"accuracy": accuracy(logits, labels), "ece": ece(logits, labels, n_bins), "nll": nll(logits, labels)}
    if logits.shape[1] >= 5:
        out["top5"] = top_k_accuracy(logits, labels, 5)
    return out


# --------------------------------------------------------------------------- ImageNet-C: CE / mCE


def severity_table(results: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """corruption × severity table of `metric` from long-schema rows of ONE model on ONE eval set.

    Rows without a corruption or severity (the clean set) are ignored. Duplicate (corruption, severity)
    pairs mean several models/eval sets are mixed in, which would silently average them, so they fail.
    """
    part = results[(results["metric"] == metric) & results["corruption"].notna() & results["severity"].notna()]
    if part.empty:
        raise ValueError(f"no '{metric}' rows with a corruption and severity")
    dup = part.duplicated(["corruption", "severity"], keep=False)
    if dup.any():
        pairs = sorted({(str(c), int(s)) for c, s in zip(part.loc[dup, "corruption"], part.loc[dup, "severity"])})
        raise ValueError(f"several '{metric}' values for {pairs[:5]}: filter to one model_id and eval_dataset")
    table = part.pivot(index="corruption", columns="severity", values="value").astype("float64")
    table.columns = [int(s) for s in table.columns]
    table.index = table.index.astype(str)
    return table.sort_index(axis=1)


def corruption_accuracy(results: pd.DataFrame, metric: str = "accuracy") -> pd.Series:
    """Per-corruption accuracy: mean over the severities present (per-severity: `severity_table`)."""
    return severity_table(results, metric).mean(axis=1)


def corruption_error(errors: Sequence[float], corruption: str, clean_error: float | None = None) -> float:
    """CE_c = Σ_s E_{s,c} / Σ_s E^AlexNet_{s,c}, with Σ_s E^AlexNet_{s,c} = 5 · ALEXNET_ERRORS[c].

    With `clean_error`, the relative CE: Σ_s (E_{s,c} − E_clean) / Σ_s (E^AlexNet_{s,c} − 0.4348)
    = (Σ_s E_{s,c} − 5·E_clean) / (5 · (ALEXNET_ERRORS[c] − 0.4348)). `errors` are the 5 severities'
    top-1 errors; the AlexNet normaliser only exists for the full 1..5 sum.
    """
    if corruption not in ALEXNET_ERRORS:
        raise ValueError(f"no AlexNet normaliser for corruption '{corruption}'")
    errs = [float(e) for e in errors]
    if len(errs) != len(SEVERITIES) or any(math.isnan(e) for e in errs):
        raise ValueError(f"corruption '{corruption}' needs errors at severities {list(SEVERITIES)}, got {errs}")
    k = len(SEVERITIES)
    if clean_error is None:
        return sum(errs) / (k * ALEXNET_ERRORS[corruption])
    return (sum(errs) - k * clean_error) / (k * (ALEXNET_ERRORS[corruption] - ALEXNET_CLEAN_ERROR))


@dataclass(frozen=True)
class CorruptionSummary:
    """CE per corruption (extras included) and their mean over `averaged`.

    `partial` is True when `averaged` is not exactly the 15 test corruptions: such a mean is not the
    published mCE and is written as `mce_subset` rows.
    """

    ce: dict[str, float]
    relative_ce: dict[str, float] | None
    mce: float
    relative_mce: float | None
    averaged: tuple[str, ...]
    partial: bool


def mce_summary(
    errors: pd.DataFrame, clean_error: float | None = None, subset: Sequence[str] | None = None
) -> CorruptionSummary:
    """CE_c for every corruption (row) of a corruption × severity *error* table, and mCE.

    mCE averages the 15 test corruptions only; any missing one is an error unless `subset` names the
    corruptions of a partial run explicitly. Relative CE/mCE need `clean_error` (the model's clean top-1
    error). Typical use: `mce_summary(1 - severity_table(rows), clean_error=1 - clean_acc)`.
    """
    unknown = sorted(set(errors.index) - set(ALEXNET_ERRORS))
    if unknown:
        raise ValueError(f"no AlexNet normaliser for corruption(s) {unknown}")
    missing_sev = [s for s in SEVERITIES if s not in errors.columns]
    if missing_sev:
        raise ValueError(f"error table lacks severities {missing_sev}")
    averaged = tuple(TEST_CORRUPTIONS) if subset is None else tuple(subset)
    if not averaged:
        raise ValueError("empty corruption subset")
    absent = [c for c in averaged if c not in errors.index]
    if absent:
        hint = "" if subset is not None else "; pass subset=[...] to report a partial-run mean (mce_subset)"
        raise ValueError(f"missing corruption(s) {absent} for mCE{hint}")
    table = errors[list(SEVERITIES)]
    ce = {c: corruption_error(table.loc[c].tolist(), c) for c in table.index}
    rel = None
    if clean_error is not None:
        rel = {c: corruption_error(table.loc[c].tolist(), c, clean_error) for c in table.index}
    return CorruptionSummary(
        ce=ce,
        relative_ce=rel,
        mce=float(np.mean([ce[c] for c in averaged])),
        relative_mce=None if rel is None else float(np.mean([rel[c] for c in averaged])),
        averaged=averaged,
        partial=set(averaged) != set(TEST_CORRUPTIONS),
    )


def mce_rows(context: Mapping[str, Any], summary: CorruptionSummary, n: int | None = None) -> pd.DataFrame:
    """Rows `ce`/`relative_ce` per corruption, then `mce`/`relative_mce` (corruption null); a partial
    mean is named `mce_subset`/`relative_mce_subset` with the averaged corruptions '+'-joined in
    `corruption`, so it can never be tabulated as the full mCE."""
    ctx = {**context, "severity": None}
    groups = [({**ctx, "corruption": c}, {"ce": v}, n) for c, v in summary.ce.items()]
    if summary.relative_ce is not None:
        groups += [({**ctx, "corruption": c}, {"relative_ce": v}, n) for c, v in summary.relative_ce.items()]
    suffix = "_subset" if summary.partial else ""
    agg = {f"mce{suffix}": summary.mce}
    if summary.relative_mce is not None:
        agg[f"relative_mce{suffix}"] = summary.relative_mce
    groups.append(({**ctx, "corruption": "+".join(summary.averaged) if summary.partial else None}, agg, n))
    return make_rows_many(groups)  # one frame: building one per row made the report stage take ~20 s


# --------------------------------------------------------------------------- ImageNet-P: flip rate


def _flips(frames: torch.Tensor, noise: bool, step: int) -> torch.Tensor:
    """Per-comparison flip indicators along the last (frame) axis, as in ImageNet-P/test.py:
    interleaved subsequences frames[i::step]; noise compares each frame with the subsequence's
    first frame, other perturbations compare consecutive frames of the subsequence."""
    out = []
    for i in range(step):
        sub = frames[..., i::step]
        ref = sub[..., :1] if noise else sub[..., :-1]
        out.append(sub[..., 1:] != ref)
    flips = torch.cat(out, dim=-1)
    if flips.shape[-1] == 0:
        raise ValueError(f"sequences of {frames.shape[-1]} frame(s) give no comparison at step {step}")
    return flips


def flip_probability(
    predictions: torch.Tensor | Sequence[torch.Tensor], noise: bool, step: int = 1
) -> float:
    """ImageNet-P flip probability FP: per sequence the fraction of compared frame pairs whose top-1
    prediction differs, then the mean over sequences (each sequence weighs the same).

    `predictions`: (n_sequences, n_frames) predicted labels, (n_sequences, n_frames, n_classes) logits,
    or a list of per-sequence label vectors of varying length. Noise perturbations compare every frame
    with the first; others compare consecutive frames. `step` is the reference's difficulty for
    non-noise perturbations (frames `step` apart, over the `step` interleaved subsequences); noise
    difficulties are separate sequence sets, so noise requires step 1.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if noise and step != 1:
        raise ValueError("noise perturbations compare against the first frame with step 1")
    if isinstance(predictions, torch.Tensor):
        preds = predictions.argmax(dim=-1) if predictions.ndim == 3 else predictions
        if preds.ndim != 2 or preds.shape[0] == 0:
            raise ValueError(f"expected (n_sequences, n_frames[, n_classes]), got {tuple(predictions.shape)}")
        per_seq = _flips(preds, noise, step).double().mean(dim=1)
    else:
        if len(predictions) == 0:
            raise ValueError("no sequences")
        per_seq = torch.stack([_flips(torch.as_tensor(p), noise, step).double().mean() for p in predictions])
    return per_seq.mean().item()


def flip_rates(flip_probs: Mapping[str, float], baseline_flip_probs: Mapping[str, float]) -> dict[str, float]:
    """FR_p = FP_p(model) / FP_p(baseline), per perturbation. SPEC: AlexNet FPs are not published in code,
    so the baseline is a model run through the same pipeline."""
    missing = [p for p in flip_probs if p not in baseline_flip_probs]
    if missing:
        raise ValueError(f"baseline has no flip probability for perturbation(s) {missing}")
    zero = [p for p in flip_probs if baseline_flip_probs[p] <= 0]
    if zero:
        raise ValueError(f"baseline flip probability is 0 for {zero}: flip rate undefined")
    return {p: fp / baseline_flip_probs[p] for p, fp in flip_probs.items()}


def mean_flip_rate(rates: Mapping[str, float]) -> float:
    """mFR: unweighted mean of the normalised flip rates over the perturbations given."""
    if not rates:
        raise ValueError("no flip rates to average")
    return float(np.mean(list(rates.values())))


def flip_rows(
    context: Mapping[str, Any],
    flip_probs: Mapping[str, float],
    baseline_flip_probs: Mapping[str, float] | None = None,
    n: int | None = None,
) -> pd.DataFrame:
    """Rows `flip_probability` per perturbation (in `corruption`), plus `flip_rate` per perturbation
    and `mfr` (corruption null) when a baseline is given. `n` = number of sequences."""
    ctx = {**context, "severity": None}
    groups = [({**ctx, "corruption": p}, {"flip_probability": v}, n) for p, v in flip_probs.items()]
    if baseline_flip_probs is not None:
        rates = flip_rates(flip_probs, baseline_flip_probs)
        groups += [({**ctx, "corruption": p}, {"flip_rate": v}, n) for p, v in rates.items()]
        groups.append(({**ctx, "corruption": None}, {"mfr": mean_flip_rate(rates)}, n))
    return make_rows_many(groups)


# --------------------------------------------------------------------------- effective robustness


def _logit(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class LogitFit:
    """logit(acc_shift) ≈ slope · logit(acc_ref) + intercept, fitted on `n_models` baseline models."""

    slope: float
    intercept: float
    n_models: int

    def baseline(self, acc_ref: float | np.ndarray) -> float | np.ndarray:
        """β(x) = sigmoid(slope · logit(x) + intercept). x ∈ {0, 1} maps to the limit (0 or 1 for a
        positive slope) through ±inf arithmetic."""
        x = np.asarray(acc_ref, dtype=np.float64)
        if np.any((x < 0) | (x > 1)):
            raise ValueError(f"accuracies must lie in [0, 1], got {acc_ref}")
        with np.errstate(invalid="ignore", over="ignore"):
            z = self.slope * _logit(x) + self.intercept
            out = 1.0 / (1.0 + np.exp(-z))
        return float(out) if out.ndim == 0 else out


def fit_effective_robustness(acc_ref: Sequence[float], acc_shift: Sequence[float]) -> LogitFit:
    """Least-squares line through (logit acc_ref, logit acc_shift) of baseline models [Taori et al. 2020].

    Accuracies must lie strictly in (0, 1): a 0 or 1 has an infinite logit and would dominate the fit,
    so it is an error rather than silently clipped. Needs >= 2 distinct reference accuracies.
    """
    x, y = np.asarray(acc_ref, dtype=np.float64), np.asarray(acc_shift, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"acc_ref {x.shape} and acc_shift {y.shape} must be equal-length vectors")
    bad = [(i, float(a), float(b)) for i, (a, b) in enumerate(zip(x, y)) if not (0 < a < 1 and 0 < b < 1)]
    if bad:
        raise ValueError(f"baseline accuracies must lie strictly in (0, 1) for the logit fit; (index, ref, shift): "
                         f"{bad}")
    if len(np.unique(x)) < 2:
        raise ValueError("the fit needs at least 2 baseline models with different reference accuracy")
    design = np.stack([_logit(x), np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, _logit(y), rcond=None)
    return LogitFit(float(slope), float(intercept), len(x))


def effective_robustness(
    fit: LogitFit, acc_ref: Mapping[str, float], acc_shift: Mapping[str, float]
) -> dict[str, float]:
    """ρ(f) = acc_shift(f) − β(acc_ref(f)) per model id: accuracy above what the baseline trend predicts."""
    missing = sorted(set(acc_ref) ^ set(acc_shift))
    if missing:
        raise ValueError(f"model(s) {missing} lack a reference or shifted accuracy")
    return {m: float(acc_shift[m]) - float(fit.baseline(acc_ref[m])) for m in acc_ref}


def effective_robustness_rows(
    context: Mapping[str, Any], rho: Mapping[str, float], fit: LogitFit, n: int | None = None
) -> pd.DataFrame:
    """Rows `effective_robustness` per model (model_id = key; `context` gives the shifted eval set), plus
    `effective_robustness_slope`/`_intercept` of the baseline fit with model_id null and n = #baselines."""
    groups = [({**context, "model_id": m}, {"effective_robustness": v}, n) for m, v in rho.items()]
    fit_metrics = {"effective_robustness_slope": fit.slope, "effective_robustness_intercept": fit.intercept}
    groups.append(({**context, "model_id": None}, fit_metrics, fit.n_models))
    return make_rows_many(groups)
