"""Fine-tuning report: tables (mean ± std over seeds), claims, plots — on a synthetic all_metrics frame."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from robustify.eval.schema import COLUMNS, conform, make_rows
from robustify.report.claims import Claim, all_claims, check_claims, claims_markdown, lipsum_ft_claims
from robustify.report.finetune import (
    SHIFT_MEAN,
    finetune_latex,
    finetune_markdown,
    method_summary,
    write_finetune_report,
)
from robustify.report.plots import energy_gap_points, write_energy_gap_plot, write_wise_curves

M = "tinyclip-rn32"
SEEDS = (0, 1, 2)
CELL_OFFSETS = {("gaussian_noise", 1): -0.02, ("gaussian_noise", 3): 0.02, ("fog", 1): -0.01, ("fog", 3): 0.01}
# Set-level accuracy per model: photo (reference), sketch (domain), photo_c (corruption, mean over cells).
ZS = (0.60, 0.50, 0.40)
FT = [(0.80, 0.40, 0.30), (0.82, 0.42, 0.31), (0.84, 0.44, 0.32)]
LIP = [(0.81, 0.48, 0.36), (0.82, 0.50, 0.37), (0.83, 0.52, 0.38)]
SOUP = (0.85, 0.58, 0.44)
ALPHAS = [round(0.1 * i, 1) for i in range(11)]


def _ctx(model_id, method, seed=None, params=None):
    return {"model_id": model_id, "model_family": "open_clip", "arch": M, "method": method,
            "method_params": params or {}, "seed": seed, "train_dataset": "miniworld-photo"}


def _rows(ctx, metrics, n, **cols):
    """Schema rows as plain records (one conform at the end keeps building the frame fast)."""
    base = {**ctx, **cols, "method_params": json.dumps(ctx["method_params"], sort_keys=True)}
    return [{**base, "metric": k, "value": float(v), "n": n} for k, v in metrics.items()]


def _model(ctx, acc, ece=0.05, nll=1.0, gap=None):
    """Rows of one model: accuracy/ECE/NLL on photo and sketch, per cell on photo_c, flip probabilities on
    the sequence set, per-corruption rows that are not accuracy cells, and energy gaps."""
    photo, sketch, corrupted = acc
    rows = _rows(ctx, {"accuracy": photo, "ece": ece, "nll": nll}, 100, eval_dataset="photo",
                 shift_type="reference")
    rows += _rows(ctx, {"accuracy": sketch, "ece": ece + 0.1, "nll": nll + 1}, 100, eval_dataset="sketch",
                  shift_type="domain")
    for (corruption, severity), d in CELL_OFFSETS.items():
        rows += _rows(ctx, {"accuracy": corrupted + d, "ece": ece + 0.2, "nll": nll + 2}, 50, eval_dataset="photo_c",
                      shift_type="corruption", corruption=corruption, severity=severity)
    for corruption in ("gaussian_noise", "fog"):  # per-corruption rows (severity null): never accuracy cells
        rows += _rows(ctx, {"accuracy": 0.0, "ce": 0.9}, 100, eval_dataset="photo_c", shift_type="corruption",
                      corruption=corruption)
        rows += _rows(ctx, {"flip_probability": 0.1}, 100, eval_dataset="photo_p", shift_type="synthetic",
                      corruption=corruption)
    rows += _rows(ctx, {"mce": 0.7}, 200, eval_dataset="photo_c", shift_type="corruption")
    if gap is not None:
        for s in ("photo", "sketch", "photo_c"):
            rows += _rows(ctx, {"energy_gap": gap}, 100, eval_dataset=s, shift_type="x")
    return rows


def _wise(zs, ft, alpha, bump):
    """Linear path between zero-shot and fine-tuned accuracy, shift sets lifted by bump·4α(1−α)."""
    lin = [(1 - alpha) * z + alpha * f for z, f in zip(zs, ft)]
    lift = bump * 4 * alpha * (1 - alpha)
    return (lin[0], lin[1] + lift, lin[2] + lift)


def build(zs=ZS, ft=FT, lip=LIP, soup=SOUP, wise_bump=0.05, tpgm_shift=0.0, with_ft=True,
          with_lipsum_posthoc=True) -> pd.DataFrame:
    # The zero-shot model goes through make_rows (the writers' path); the rest as records, conformed once.
    zs_rows = pd.DataFrame(_model(_ctx(f"zeroshot/{M}", "zeroshot", params={"templates": ["a {}."]}), zs,
                                  ece=0.03, nll=1.2))
    frames = [make_rows({c: r[c] for c in r.index if c not in ("metric", "value", "n") and not pd.isna(r[c])},
                        {r["metric"]: r["value"]}, n=int(r["n"])) for _, r in zs_rows.iterrows()]
    parts = []
    runs = {"ft": ft, "lipsum-ft": lip} if with_ft else {"lipsum-ft": lip}
    for method, accs in runs.items():
        for seed, acc in zip(SEEDS, accs):
            gap = (4.0 if method == "ft" else 1.0) + seed
            ece = 0.02 if method == "lipsum-ft" else 0.06 + 0.01 * seed
            parts += _model(_ctx(f"ft/{M}/{method}/s{seed}", method, seed), acc, ece=ece, nll=0.5 + 0.1 * seed,
                            gap=gap)
            if method == "lipsum-ft" and not with_lipsum_posthoc:
                continue
            for alpha in ALPHAS:
                parts += _model(_ctx(f"wise/{M}/{method}/s{seed}/a{alpha}", "wise", seed,
                                     {"base": method, "alpha": alpha}), _wise(zs, acc, alpha, wise_bump),
                                gap=gap * alpha ** 2)
            if method == "lipsum-ft":
                tp = (acc[0], acc[1] + tpgm_shift, acc[2] + tpgm_shift)
                parts += _model(_ctx(f"tpgm/{M}/lipsum-ft/s{seed}", "tpgm", seed, {"base": "lipsum-ft"}), tp)
    if with_lipsum_posthoc:
        parts += _model(_ctx(f"greedy-soup/{M}/lipsum-ft", "greedy-soup", None, {"base": "lipsum-ft"}), soup,
                        ece=0.04, nll=0.45)
    records = pd.DataFrame(parts, columns=list(COLUMNS)).assign(created_at="2024-01-01T00:00:00+00:00")
    return pd.concat([*frames, conform(records)], ignore_index=True)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return build()


def _shift(acc):  # per-seed shift mean in %
    return (acc[1] + acc[2]) / 2 * 100


# ------------------------------------------------------------------------------------------------- tables
def test_method_summary_mean_std_order_and_shift_mean(df):
    table = method_summary(df, "accuracy")
    assert list(table.index) == ["Zero-shot", "FT", "Lipsum-FT", "WiSE-FT (α=0.5) on FT",
                                 "WiSE-FT (α=0.5) on Lipsum-FT", "TPGM on Lipsum-FT", "Greedy soup of Lipsum-FT"]
    assert list(table.columns.get_level_values(0).unique()) == ["photo", "sketch", "photo_c", SHIFT_MEAN]
    ft = table.loc["FT"]
    for col, values in (("photo", [80, 82, 84]), ("sketch", [40, 42, 44]), ("photo_c", [30, 31, 32]),
                        (SHIFT_MEAN, [_shift(a) for a in FT])):
        assert ft[(col, "mean")] == pytest.approx(np.mean(values))
        assert ft[(col, "std")] == pytest.approx(np.std(values, ddof=1))
        assert ft[(col, "n")] == 3
    assert ft[(SHIFT_MEAN, "mean")] == pytest.approx(36.5) and ft[(SHIFT_MEAN, "std")] == pytest.approx(1.5)
    zs = table.loc["Zero-shot"]
    assert zs[(SHIFT_MEAN, "mean")] == pytest.approx(45.0) and zs[(SHIFT_MEAN, "n")] == 1
    assert np.isnan(zs[(SHIFT_MEAN, "std")])
    # The whole WiSE sweep when asked for, one row per α and base.
    sweep = method_summary(df, "accuracy", wise_alpha=None)
    assert sum(lab.startswith("WiSE-FT") for lab in sweep.index) == 2 * len(ALPHAS)
    assert "WiSE-FT (α=0.1) on FT" in sweep.index and "WiSE-FT (α=0.1) on FT" not in table.index


def test_a_timm_start_point_is_the_zero_shot_kind_row(df):
    """A unimodal model fine-tuned from its imported classifier `timm/<model>` (paper Table 3)."""
    timm = df.copy()
    start = timm["model_id"] == f"zeroshot/{M}"
    timm.loc[start, "model_id"], timm.loc[start, "method"] = f"timm/{M}", "pretrained"
    table = method_summary(timm, "accuracy")
    assert list(table.index)[:2] == ["Standard training", "FT"] and "Zero-shot" not in table.index
    assert table.loc["Standard training"][(SHIFT_MEAN, "mean")] == pytest.approx(45.0)


def test_ece_nll_tables(df):
    ece = method_summary(df, "ece")
    assert ece.loc["FT", ("photo", "mean")] == pytest.approx(7.0)  # 6, 7, 8 %
    assert ece.loc["FT", ("photo", "std")] == pytest.approx(1.0)
    assert ece.loc["FT", ("photo_c", "mean")] == pytest.approx(27.0)
    nll = method_summary(df, "nll")
    assert nll.loc["Lipsum-FT", (SHIFT_MEAN, "mean")] == pytest.approx(0.6 + 1.5)


def test_markdown_cells(df):
    md = finetune_markdown(df)
    assert "| Zero-shot | 1 | 60.00 | 50.00 | 40.00 | 45.00 |" in md
    assert "| FT | 3 | 82.00 ± 2.00 | 42.00 ± 2.00 | 31.00 ± 1.00 | 36.50 ± 1.50 |" in md
    assert "| Greedy soup of Lipsum-FT | 1 | **85.00** | **58.00** | **44.00** | **51.00** |" in md
    assert md.index("## Top-1 accuracy") < md.index("## ECE") < md.index("## NLL")
    assert "photo_p" not in md.split("## ")[1]  # the sequence set has no accuracy column


def _latex_block(tex: str, title: str) -> list[str]:
    block = tex.split(f"% {title}")[1].split("\\end{tabular}")[0]
    return [line for line in block.splitlines() if line.endswith("\\\\")]


def test_latex_bold_marks_best_and_escapes(df):
    tex = finetune_latex(df)
    assert tex.count("\\begin{tabular}") == 3 and "\\toprule" in tex and "\\bottomrule" in tex
    acc = _latex_block(tex, "Top-1 accuracy (\\%)")
    assert acc[0].startswith("Method & Seeds & photo & sketch & photo\\_c & shift mean")
    soup = next(line for line in acc if line.startswith("Greedy soup"))
    assert soup.count("\\textbf") == 4 and sum(line.count("\\textbf") for line in acc) == 4
    assert any(line.startswith("WiSE-FT ($\\alpha$=0.5) on FT & 3 &") for line in acc)
    assert "82.00 $\\pm$ 2.00" in next(line for line in acc if line.startswith("FT &"))
    # ECE: lowest is best; Lipsum-FT (2 %) beats the soup (4 %) and FT; the zero-shot row (3 %) is not ranked.
    ece = _latex_block(tex, "ECE, 15 bins (\\%)")
    lip = next(line for line in ece if line.startswith("Lipsum-FT &"))
    assert lip.count("\\textbf") == 4
    assert "\\textbf" not in next(line for line in ece if line.startswith("Zero-shot"))
    nll = _latex_block(tex, "NLL")
    assert "\\textbf{0.450}" in next(line for line in nll if line.startswith("Greedy soup"))


# ------------------------------------------------------------------------------------------------- claims
def _verdicts(frame, only=None, **options):
    claims = [c for c in lipsum_ft_claims(**options) if only is None or c.id.endswith(only)]
    return {c.id.split("/")[1]: (p, e) for c, p, e in check_claims(frame, claims)}


def test_claims_pass_on_the_synthetic_results(df):
    v = _verdicts(df)
    assert {k: p for k, (p, _) in v.items()} == {"ft-lowers-shift": True, "wise-recovers": True,
                                                 "lipsum-beats-ft": True, "posthoc-on-lipsum": True}
    assert "FT shift mean 36.50% (3 seeds) vs zero-shot 45.00%" in v["ft-lowers-shift"][1]
    assert "best: Greedy soup of Lipsum-FT shift mean 51.00% vs Lipsum-FT 43.50%" in v["posthoc-on-lipsum"][1]
    assert "|Δ| = 0.00 points" in v["lipsum-beats-ft"][1]
    md = claims_markdown(df, lipsum_ft_claims())
    assert md.count("- **PASS** — ") == 4 and "**Summary:** 4 PASS, 0 FAIL, 0 NOT RUN" in md


def test_claims_fail_on_constructed_numbers():
    low_zs = _verdicts(build(zs=(0.60, 0.30, 0.20)), "ft-lowers-shift")  # zero-shot shift mean 25 % < FT's 36.5 %
    assert low_zs["ft-lowers-shift"][0] is False
    assert _verdicts(build(wise_bump=-0.2), "wise-recovers")["wise-recovers"][0] is False
    far = build(lip=[(0.87, 0.48, 0.36), (0.88, 0.50, 0.37), (0.89, 0.52, 0.38)])  # reference 6 points above FT
    assert _verdicts(far, "lipsum-beats-ft")["lipsum-beats-ft"][0] is False
    assert _verdicts(far, "lipsum-beats-ft", tolerance=7.0)["lipsum-beats-ft"][0] is True
    worse = build(lip=[(0.82, 0.30, 0.20)] * 3)
    assert _verdicts(worse, "lipsum-beats-ft")["lipsum-beats-ft"][0] is False
    v = _verdicts(build(soup=(0.85, 0.40, 0.30), wise_bump=-0.2, tpgm_shift=-0.01), "posthoc-on-lipsum")
    assert v["posthoc-on-lipsum"][0] is False and "best: TPGM on Lipsum-FT" in v["posthoc-on-lipsum"][1]
    md = claims_markdown(build(zs=(0.60, 0.30, 0.20)), lipsum_ft_claims())
    assert "- **FAIL** — Fine-tuning (FT) lowers" in md
    assert f"{md.count('- **PASS**')} PASS, {md.count('- **FAIL**')} FAIL, 0 NOT RUN" in md


def test_claims_not_run_when_rows_are_missing():
    v = _verdicts(build(with_ft=False))
    for key in ("ft-lowers-shift", "wise-recovers", "lipsum-beats-ft"):
        assert v[key][0] is None and "no shift-mean accuracy for FT" in v[key][1]
    assert v["posthoc-on-lipsum"][0] is True
    v = _verdicts(build(with_lipsum_posthoc=False))
    assert v["posthoc-on-lipsum"] == (None, "no shift-mean accuracy for any post-hoc method on Lipsum-FT in the "
                                            "results")
    md = claims_markdown(build(with_ft=False), lipsum_ft_claims())
    assert md.count("**NOT RUN**") == 3 and "1 PASS, 0 FAIL, 3 NOT RUN" in md


def test_claim_registry_is_open(df):
    extra = Claim("other/always", "Something else holds", lambda frame: (None, "not measured"), "other")
    assert {c.paper for c in all_claims(wise_alpha=0.5)} == {"lipsum-ft", "efficiently-robustify"}
    md = claims_markdown(df, [*lipsum_ft_claims(wise_alpha=0.5), extra])
    assert "## Other" not in md and "## other" in md
    assert "- **NOT RUN** — Something else holds: not measured" in md
    assert "4 PASS, 0 FAIL, 1 NOT RUN (of 5 claims)" in md


# ------------------------------------------------------------------------------------------ plots, report
def test_energy_gap_points_use_relative_accuracy(df):
    pts = energy_gap_points(df)
    row = pts[(pts["model_id"] == f"ft/{M}/ft/s0") & (pts["eval_dataset"] == "sketch")].iloc[0]
    assert row["energy_gap"] == pytest.approx(4.0)
    assert row["relative_accuracy"] == pytest.approx(0.40 / 0.80)
    zs = pts[pts["model_id"] == f"zeroshot/{M}"]
    assert set(zs["eval_dataset"]) == {"sketch", "photo_c"} and (zs["energy_gap"] == 0).all()
    assert "photo" not in set(pts["eval_dataset"])  # the reference set is not a shift set
    assert set(pts["group_label"]) == {"Zero-shot", "FT", "Lipsum-FT"}  # post-hoc models only when asked
    assert len(energy_gap_points(df, include_posthoc=True)) == len(pts) + 2 * (2 * 3 * len(ALPHAS))


def test_plots_are_written_and_deterministic(df, tmp_path):
    for write in (write_wise_curves, write_energy_gap_plot):
        a, b = write(df, tmp_path / "a.png").read_bytes(), write(df, tmp_path / "b.png").read_bytes()
        assert a.startswith(b"\x89PNG") and len(a) > 10_000
        assert a == b
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_finetune_report(df, tmp_path):
    paths = write_finetune_report(df, tmp_path)
    assert set(paths) == {"finetune_md", "finetune_tex", "wise_curves", "energy_gap", "claims"}
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths.values())
    assert rel == ["claims.md", "plots/energy_gap.png", "plots/wise_curves.png", "tables/finetune.md",
                   "tables/finetune.tex"]
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert re.search(r"4 PASS", paths["claims"].read_text())


def test_zero_shot_only_frame_writes_nothing(df, tmp_path):
    zs_only = df[df["method"] == "zeroshot"]
    assert write_finetune_report(zs_only, tmp_path / "out") == {}
    assert not (tmp_path / "out").exists()


def test_report_without_posthoc_or_energy_gap(df, tmp_path):
    small = df[df["method"].isin(["zeroshot", "ft"]) & (df["metric"] != "energy_gap")]
    paths = write_finetune_report(small, tmp_path, claims=lipsum_ft_claims())
    assert all(p.stat().st_size > 0 for p in paths.values())
    claims = paths["claims"].read_text()
    assert claims.count("**PASS**") == 1 and claims.count("**NOT RUN**") == 3
    assert "no shift-mean accuracy for WiSE-FT (α=0.5) on FT" in claims
    assert list(method_summary(small, "accuracy").index) == ["Zero-shot", "FT"]
