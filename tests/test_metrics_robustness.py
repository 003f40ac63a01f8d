"""Top-k, CE/mCE, flip probability/mFR, effective robustness and their result rows, against values
computed by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from robustify.eval.metrics import (
    ALEXNET_ERRORS,
    EXTRA_CORRUPTIONS,
    TEST_CORRUPTIONS,
    classification_metrics,
    corruption_accuracy,
    corruption_error,
    effective_robustness,
    effective_robustness_rows,
    fit_effective_robustness,
    flip_probability,
    flip_rates,
    flip_rows,
    mce_rows,
    mce_summary,
    mean_flip_rate,
    severity_table,
    top_k_accuracy,
)
from robustify.eval.schema import COLUMNS, make_rows

CTX = {"model_id": "m", "eval_dataset": "imagenet-c", "shift_type": "corruption"}


def _sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t))


# --------------------------------------------------------------------------- top-k


def test_top_k_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    labels = torch.tensor([2, 2])
    # ranks of the label: sample 0 → 2nd, sample 1 → 3rd.
    assert top_k_accuracy(logits, labels, 1) == pytest.approx(0.0)
    assert top_k_accuracy(logits, labels, 2) == pytest.approx(0.5)
    assert top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="1 <= k"):
        top_k_accuracy(logits, labels, 4)


def test_classification_metrics_reports_top5_only_with_5_or_more_classes():
    # 6 classes: sample 0's label (0) has the 5th-highest logit, sample 1's label (5) the lowest.
    logits = torch.tensor([[2.0, 6, 5, 4, 3, 1], [6.0, 5, 4, 3, 2, 1]])
    m = classification_metrics(logits, torch.tensor([0, 5]))
    assert list(m) == ["accuracy", "ece", "nll", "top5"]
    assert m["top5"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.0)
    assert "top5" not in classification_metrics(torch.randn(3, 4), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- per-corruption accuracy


def _long_rows() -> pd.DataFrame:
    rows = [make_rows(CTX, {"accuracy": 0.9}, n=10)]  # the clean set: no corruption/severity
    for c, accs in (("fog", [0.8, 0.7, 0.6, 0.5, 0.4]), ("snow", [0.9, 0.9, 0.8, 0.8, 0.6])):
        for s, a in enumerate(accs, start=1):
            rows.append(make_rows({**CTX, "corruption": c, "severity": s}, {"accuracy": a, "nll": 1.0}, n=10))
    return pd.concat(rows, ignore_index=True)


def test_severity_table_and_corruption_accuracy():
    table = severity_table(_long_rows())
    assert list(table.index) == ["fog", "snow"] and list(table.columns) == [1, 2, 3, 4, 5]
    assert table.loc["snow", 5] == pytest.approx(0.6)
    acc = corruption_accuracy(_long_rows())
    assert acc["fog"] == pytest.approx(0.6)  # (0.8+0.7+0.6+0.5+0.4)/5
    assert acc["snow"] == pytest.approx(0.8)  # (0.9+0.9+0.8+0.8+0.6)/5


def test_severity_table_refuses_mixed_models():
    df = _long_rows()
    other = df.assign(model_id="other")
    with pytest.raises(ValueError, match="filter to one model_id"):
        severity_table(pd.concat([df, other]))


# --------------------------------------------------------------------------- CE / mCE


def test_corruption_error_by_hand():
    # Σ_s E = 0.1+0.2+0.3+0.4+0.5 = 1.5; Σ_s E^AlexNet = 5 × 0.886428 = 4.43214 → 0.338437.
    assert corruption_error([0.1, 0.2, 0.3, 0.4, 0.5], "gaussian_noise") == pytest.approx(0.338437, abs=1e-6)
    # relative, E_clean = 0.2: (1.5 − 5·0.2) / (5·(0.819324 − 0.4348)) = 0.5 / 1.92262 = 0.260062.
    assert corruption_error([0.3] * 5, "fog", clean_error=0.2) == pytest.approx(0.260062, abs=1e-6)


def test_corruption_error_needs_all_five_severities():
    with pytest.raises(ValueError, match="'fog' needs errors at severities"):
        corruption_error([0.3] * 4, "fog")
    with pytest.raises(ValueError, match="no AlexNet normaliser for corruption 'style'"):
        corruption_error([0.3] * 5, "style")


def _errors(corruptions=TEST_CORRUPTIONS) -> pd.DataFrame:
    # Half AlexNet's error everywhere (CE 0.5), except brightness = AlexNet's (CE 1.0) and
    # gaussian_noise = 0.1..0.5 (CE 0.338437 above).
    rows = {}
    for c in corruptions:
        rows[c] = [ALEXNET_ERRORS[c] * (1.0 if c == "brightness" else 0.5)] * 5
    if "gaussian_noise" in rows:
        rows["gaussian_noise"] = [0.1, 0.2, 0.3, 0.4, 0.5]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[1, 2, 3, 4, 5])


def test_mce_by_hand_averages_only_the_15_test_corruptions():
    errors = _errors(TEST_CORRUPTIONS + EXTRA_CORRUPTIONS)
    s = mce_summary(errors)
    assert s.ce["brightness"] == pytest.approx(1.0) and s.ce["fog"] == pytest.approx(0.5)
    assert s.ce["speckle_noise"] == pytest.approx(0.5)  # extras get a CE but are not averaged
    # (13 × 0.5 + 1.0 + 0.338437) / 15 = 0.522562
    assert s.mce == pytest.approx(0.522562, abs=1e-6)
    assert s.averaged == TEST_CORRUPTIONS and not s.partial and s.relative_mce is None


def test_relative_mce_by_hand():
    # E_{s,c} = E^AlexNet_c at every severity and E_clean = 0.4348 → every CE and relative CE is 1.
    errors = pd.DataFrame.from_dict({c: [ALEXNET_ERRORS[c]] * 5 for c in TEST_CORRUPTIONS}, orient="index",
                                    columns=[1, 2, 3, 4, 5])
    s = mce_summary(errors, clean_error=0.4348)
    assert s.relative_mce == pytest.approx(1.0) and s.mce == pytest.approx(1.0)
    # With E_clean = 0.2 fog's relative CE is (5·0.819324 − 1.0) / (5·0.384524) = 3.09662/1.92262 = 1.610626.
    assert mce_summary(errors, clean_error=0.2).relative_ce["fog"] == pytest.approx(1.610626, abs=1e-6)


def test_missing_corruption_is_named():
    errors = _errors([c for c in TEST_CORRUPTIONS if c != "fog"])
    with pytest.raises(ValueError, match=r"missing corruption\(s\) \['fog'\].*subset"):
        mce_summary(errors)


def test_missing_severity_and_unknown_corruption_fail():
    errors = _errors()
    errors.loc["fog", 3] = float("nan")
    with pytest.raises(ValueError, match="'fog' needs errors"):
        mce_summary(errors)
    with pytest.raises(ValueError, match="lacks severities \\[5\\]"):
        mce_summary(_errors().drop(columns=[5]))
    with pytest.raises(ValueError, match="'style'"):
        mce_summary(pd.concat([_errors(), pd.DataFrame({s: [0.5] for s in range(1, 6)}, index=["style"])]))


def test_explicit_subset_is_partial_and_reported_as_such():
    errors = _errors(["gaussian_noise", "brightness"])
    s = mce_summary(errors, clean_error=0.2, subset=["gaussian_noise", "brightness"])
    assert s.partial and s.mce == pytest.approx((0.338437 + 1.0) / 2, abs=1e-6)
    rows = mce_rows(CTX, s, n=50)
    assert tuple(rows.columns) == COLUMNS
    assert list(rows["metric"]) == ["ce", "ce", "relative_ce", "relative_ce", "mce_subset", "relative_mce_subset"]
    assert "mce" not in set(rows["metric"])
    assert rows["corruption"].iloc[-1] == "gaussian_noise+brightness"
    assert rows["severity"].isna().all() and rows["n"].eq(50).all()


def test_full_mce_rows():
    rows = mce_rows(CTX, mce_summary(_errors()), n=None)
    assert list(rows["metric"]).count("ce") == 15
    last = rows.iloc[-1]
    assert last["metric"] == "mce" and pd.isna(last["corruption"])
    assert last["value"] == pytest.approx(0.522562, abs=1e-6)


# --------------------------------------------------------------------------- ImageNet-P


SEQS = torch.tensor([[0, 1, 1, 1, 0], [2, 2, 2, 2, 2]])


def test_flip_probability_consecutive_frames():
    # seq 0 pairs (0,1)(1,1)(1,1)(1,0) → 2 flips / 4; seq 1 → 0; mean over sequences 0.25.
    assert flip_probability(SEQS, noise=False) == pytest.approx(0.25)


def test_flip_probability_noise_compares_with_first_frame():
    # seq 0 against frame 0 (label 0): 1,1,1,0 → 3/4; seq 1 → 0; mean 0.375.
    assert flip_probability(SEQS, noise=True) == pytest.approx(0.375)


def test_flip_probability_step_uses_interleaved_subsequences():
    # step 2, seq 0: frames [0,1,0] → 2 flips, frames [1,1] → 0; 2/3 for the sequence; seq 1 → 0 → 1/3.
    assert flip_probability(SEQS, noise=False, step=2) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="step 1"):
        flip_probability(SEQS, noise=True, step=2)


def test_flip_probability_from_logits_and_ragged_sequences():
    one_hot = torch.nn.functional.one_hot(SEQS, 3).float()
    assert flip_probability(one_hot, noise=False) == pytest.approx(0.25)
    # [0,1] → 1/1, [0,0,0,1] → 1/3; each sequence weighs the same: (1 + 1/3)/2 = 2/3 (pooled would be 1/2).
    assert flip_probability([torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1])], noise=False) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no comparison"):
        flip_probability(torch.tensor([[1], [2]]), noise=False)


def test_flip_rates_and_mfr_by_hand():
    fp, base = {"brightness": 0.1, "gaussian_noise": 0.3}, {"brightness": 0.2, "gaussian_noise": 0.2}
    rates = flip_rates(fp, base)
    assert rates == pytest.approx({"brightness": 0.5, "gaussian_noise": 1.5})
    assert mean_flip_rate(rates) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'gaussian_noise'"):
        flip_rates(fp, {"brightness": 0.2})
    with pytest.raises(ValueError, match="is 0"):
        flip_rates(fp, {"brightness": 0.0, "gaussian_noise": 0.2})
    rows = flip_rows({**CTX, "eval_dataset": "imagenet-p"}, fp, base, n=2)
    assert list(rows["metric"]) == ["flip_probability"] * 2 + ["flip_rate"] * 2 + ["mfr"]
    assert list(rows["corruption"][:2]) == ["brightness", "gaussian_noise"] and pd.isna(rows["corruption"].iloc[-1])
    assert rows["value"].iloc[-1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- effective robustness


def test_effective_robustness_exact_line():
    # Baselines on logit(y) = 0.5·logit(x): x = 0.5, 0.75, 0.9 (logits 0, ln3, ln9) →
    # y = 0.5, sigmoid(ln√3) = √3/(1+√3) = 0.633975, sigmoid(ln3) = 0.75.
    fit = fit_effective_robustness([0.5, 0.75, 0.9], [0.5, 0.633975, 0.75])
    assert fit.slope == pytest.approx(0.5, abs=1e-5) and fit.intercept == pytest.approx(0.0, abs=1e-5)
    # f: β(0.9) = 0.75 → ρ = 0.8 − 0.75 = 0.05; g: β(0.5) = 0.5 → ρ = 0.45 − 0.5 = −0.05.
    rho = effective_robustness(fit, {"f": 0.9, "g": 0.5}, {"f": 0.8, "g": 0.45})
    assert rho == pytest.approx({"f": 0.05, "g": -0.05}, abs=1e-5)


def test_effective_robustness_least_squares_by_hand():
    # logits x = 0, 1, 2 and y = 0, 1, 1: x̄ = 1, ȳ = 2/3, Sxy = (−1)(−2/3) + 0 + (1)(1/3) = 1, Sxx = 2
    # → slope 0.5, intercept 2/3 − 0.5 = 1/6.
    x = [_sigmoid(t) for t in (0, 1, 2)]
    y = [_sigmoid(t) for t in (0, 1, 1)]
    fit = fit_effective_robustness(x, y)
    assert fit.slope == pytest.approx(0.5) and fit.intercept == pytest.approx(1 / 6) and fit.n_models == 3
    # β(sigmoid(2)) = sigmoid(0.5·2 + 1/6) = sigmoid(7/6) = 1/(1 + e^(−7/6)) = 1/1.311403 = 0.762542
    assert fit.baseline(_sigmoid(2)) == pytest.approx(0.762542, abs=1e-6)


def test_effective_robustness_rejects_accuracy_0_or_1_in_the_fit():
    with pytest.raises(ValueError, match=r"strictly in \(0, 1\).*\(1, 1.0, 0.5\)"):
        fit_effective_robustness([0.5, 1.0], [0.4, 0.5])
    with pytest.raises(ValueError, match="strictly"):
        fit_effective_robustness([0.5, 0.7], [0.0, 0.5])
    with pytest.raises(ValueError, match="at least 2"):
        fit_effective_robustness([0.5, 0.5], [0.4, 0.3])


def test_baseline_at_accuracy_0_and_1_takes_the_limit():
    fit = fit_effective_robustness([0.5, 0.75, 0.9], [0.5, 0.633975, 0.75])
    assert fit.baseline(1.0) == pytest.approx(1.0) and fit.baseline(0.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit.baseline(1.2)


def test_effective_robustness_rows():
    fit = fit_effective_robustness([0.5, 0.75, 0.9], [0.5, 0.633975, 0.75])
    rows = effective_robustness_rows({"eval_dataset": "imagenet-r", "shift_type": "natural"},
                                     {"f": 0.05, "g": -0.05}, fit, n=100)
    assert tuple(rows.columns) == COLUMNS
    assert list(rows["metric"]) == ["effective_robustness"] * 2 + ["effective_robustness_slope",
                                                                   "effective_robustness_intercept"]
    assert list(rows["model_id"][:2]) == ["f", "g"] and rows["model_id"][2:].isna().all()
    assert list(rows["n"]) == [100, 100, 3, 3]
    with pytest.raises(ValueError, match=r"\['h'\]"):
        effective_robustness(fit, {"f": 0.9, "h": 0.5}, {"f": 0.8})
