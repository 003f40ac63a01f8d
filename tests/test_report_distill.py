"""Distillation report ("Efficiently Robustify Pre-Trained Models"): tables, Pareto plot and claims on a
constructed all_metrics frame whose every number is chosen so the expected cells can be written by hand."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from robustify.eval.schema import COLUMNS, conform
from robustify.report.claims import _FACTORIES, check_claims, claims_markdown
from robustify.report.distill import (
    NO_RUNS,
    distill_models,
    distill_table_data,
    distill_tables,
    efficiently_robustify_claims,
    pareto_front,
    pareto_points,
    write_distill_report,
    write_pareto_plot,
)

S = "tinyclip"
CELLS = {("gaussian_noise", 1): -0.02, ("fog", 3): 0.02}  # photo_c = mean of two cells
# (photo = reference, sketch = domain, photo_c = corruption) per seed, as fractions
ACC: dict[str, list[tuple[float, float, float]]] = {
    "zeroshot": [(0.60, 0.50, 0.40)],
    "lp": [(0.70, 0.45, 0.35), (0.72, 0.47, 0.37)],
    "ft": [(0.80, 0.40, 0.30), (0.84, 0.44, 0.34)],
    "wise-lp-0.5": [(0.66, 0.52, 0.42)] * 2, "wise-lp-1.0": [(0.70, 0.45, 0.35)] * 2,
    "wise-ft-0.5": [(0.75, 0.55, 0.45), (0.77, 0.57, 0.47)], "wise-ft-1.0": [(0.80, 0.40, 0.30)] * 2,
    "three-head": [(0.83, 0.56, 0.50), (0.85, 0.58, 0.52)],
    "apt": [(0.82, 0.50, 0.44), (0.82, 0.52, 0.46)],
    "only-kd": [(0.81, 0.53, 0.47)],
    "vpt-deep": [(0.78, 0.42, 0.33)],
    "three-head-no-kd": [(0.80, 0.50, 0.45), (0.82, 0.52, 0.47)],
    "zs-three-head": [(0.79, 0.55, 0.50)], "zs-apt": [(0.77, 0.50, 0.44)], "zs-ft": [(0.84, 0.45, 0.40)],
    "teacher": [(0.90, 0.60, 0.60)],
}
# trainable params, train ms/img per seed, GFLOPs, GFLOPs overhead
COST = {"lp": (5130, (0.20, 0.22)), "ft": (1_000_000, (2.0, 2.2)), "three-head": (120_000, (0.50, 0.54)),
        "apt": (100_000, (0.40, 0.40)), "only-kd": (100_000, (0.45,)), "vpt-deep": (8_000, (0.9,)),
        "three-head-no-kd": (120_000, (0.5, 0.5)), "zs-three-head": (120_000, (0.6,)), "zs-apt": (100_000, (0.42,)),
        "zs-ft": (1_000_000, (3.0,)), "teacher": (11_000_000, (5.0,))}
SELECT = {"no_kl": -0.01, "no_uncertainty": -0.02, "max_logit": -0.03, "ours": 0.0}  # offsets from accuracy
F_CORRECT = {"ours": [(0.90, 0.80, 0.85), (0.92, 0.80, 0.85)], "no_kl": [(0.70, 0.60, 0.65)] * 2,
             "no_uncertainty": [(0.60, 0.50, 0.55)] * 2, "max_logit": [(0.50, 0.50, 0.50)] * 2}
HEADS = {"clean": (0.84, 0.40, 0.30), "unclean": (0.70, 0.60, 0.55), "combined": (0.80, 0.50, 0.45)}
SETS = (("photo", "reference"), ("sketch", "domain"), ("photo_c", "corruption"))


def _rows(ctx: dict, metrics: dict, n: int = 100, **cols) -> list[dict]:
    base = {**ctx, **cols, "method_params": json.dumps(ctx["method_params"], sort_keys=True)}
    return [{**base, "metric": k, "value": float(v), "n": n} for k, v in metrics.items()]


def _evals(ctx: dict, per_set: dict[str, tuple[float, float, float]]) -> list[dict]:
    """metric -> (photo, sketch, photo_c) as set rows and two corruption cells (+ a per-corruption row)."""
    rows = []
    for i, (name, shift) in enumerate(SETS):
        if shift != "corruption":
            rows += _rows(ctx, {m: v[i] for m, v in per_set.items()}, eval_dataset=name, shift_type=shift)
            continue
        for (corruption, severity), d in CELLS.items():
            rows += _rows(ctx, {m: v[i] + d for m, v in per_set.items()}, 50, eval_dataset=name, shift_type=shift,
                          corruption=corruption, severity=severity)
        rows += _rows(ctx, {"accuracy": 0.0}, eval_dataset=name, shift_type=shift, corruption="fog")  # not a cell
    return rows


def _cost(ctx: dict, params: int, ms: float) -> list[dict]:
    # eval_dataset = the train dataset, here named like the reference eval set: cost rows must not mix in
    overhead = {"three-head": 0.03, "vpt-deep": 0.01}.get(ctx["method"], 0.0)
    return _rows(ctx, {"trainable_params": params, "train_ms_per_image": ms, "inference_gflops": 1.0 + overhead,
                       "inference_gflops_overhead": overhead}, 1, eval_dataset="photo", shift_type="cost")


def build(acc=None, cost=None, f_correct=None, select=None, drop=()) -> pd.DataFrame:
    acc, cost = {**ACC, **(acc or {})}, {**COST, **(cost or {})}
    f_correct, select = {**F_CORRECT, **(f_correct or {})}, {**SELECT, **(select or {})}

    def ctx(model_id, method, seed=None, **params):
        return {"model_id": model_id, "model_family": "open_clip", "arch": S, "method": method,
                "method_params": params, "seed": seed, "train_dataset": "photo"}

    rows = _evals(ctx(f"zeroshot/{S}", "zeroshot"), {"accuracy": acc["zeroshot"][0]})
    rows += _evals(ctx("teachers/rn18", "augmix-jsd", recipe="augmix+noise2net"), {"accuracy": acc["teacher"][0]})
    rows += _cost(ctx("teachers/rn18", "augmix-jsd", recipe="augmix+noise2net"), cost["teacher"][0],
                  cost["teacher"][1][0])
    for method in ("lp", "ft"):
        for seed, a in enumerate(acc[method]):
            c = ctx(f"ft/{S}/{method}/s{seed}", method, seed)
            rows += _evals(c, {"accuracy": a}) + _cost(c, cost[method][0], cost[method][1][seed])
            for alpha in (0.5, 1.0):
                w = ctx(f"wise/{S}/{method}/s{seed}/a{alpha}", "wise", seed, base=method, alpha=alpha)
                rows += _evals(w, {"accuracy": acc[f"wise-{method}-{alpha}"][seed]})
    runs = {"three-head": ("three-head", "visual", "rn18"), "apt": ("apt", "visual", None),
            "only-kd": ("only-kd", "visual", "rn18"), "vpt-deep": ("vpt-deep", "visual", None),
            "three-head-no-kd": ("three-head-no-kd", "visual", None),
            "zs-three-head": ("three-head", "zeroshot", "rn18"), "zs-apt": ("apt", "zeroshot", None),
            "zs-ft": ("zs-ft", "zeroshot", None)}
    for run, (method, setup, teacher) in runs.items():
        for seed, a in enumerate(acc[run]):
            c = ctx(f"distill/{S}/rn18/{run}/s{seed}", method, seed, setup=setup, teacher=teacher, fraction=0.2)
            metrics = {"accuracy": a}
            if method in ("three-head", "three-head-no-kd"):
                metrics |= {f"accuracy_select_{r}": tuple(x + d for x in a) for r, d in select.items()}
            if run == "three-head":
                metrics |= {f"f_correct_{r}": v[seed] for r, v in f_correct.items()}
                metrics |= {f"accuracy_head_{h}": v for h, v in HEADS.items()}
            rows += _evals(c, metrics) + _cost(c, cost[run][0], cost[run][1][seed])
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).assign(created_at="2024-01-01T00:00:00+00:00")
    frame = frame[~frame["model_id"].str.contains("|".join(map(re.escape, drop)))] if drop else frame
    return conform(frame)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return build()


@pytest.fixture(scope="module")
def md(df) -> str:
    return distill_tables(df)["markdown"]


def _table(markdown: str, heading: str) -> dict[str, list[str]]:
    """label -> cells (seeds first) of the markdown table under the first heading containing `heading`."""
    section = markdown.split("## ")
    text = next(s for s in section if s.startswith(heading))
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header[:2] == ["Method", "seeds"]
    return {"columns": header[2:], **{r[0]: r[1:] for r in body}}


# ------------------------------------------------------------------------------------------------ tables
def test_visual_table_rows_columns_and_cells(md):
    t = _table(md, "Table 1/3 analogue")
    assert t["columns"] == ["photo", "sketch", "photo_c", "Avg. shifts", "Train ms/img", "Trainable params"]
    assert [k for k in t if k != "columns"] == [
        "Zero-shot", "LP", "FT", "VPT (deep)", "WiSE-FT (LC, α=0.5)", "WiSE-FT (E2E, α=0.5)",
        "*K.D. from rn18 teacher*", "Only K.D.", "APT", "Ours", "Teacher (rn18)"]
    # seeds, photo, sketch, photo_c (mean of the two cells; the per-corruption 0.0 row is ignored), avg, ms, params
    assert t["Zero-shot"] == ["1", "60.00", "50.00", "40.00", "45.00", "–", "–"]
    assert t["LP"] == ["2", "71.00 ± 1.41", "46.00 ± 1.41", "36.00 ± 1.41", "41.00 ± 1.41", "0.210 ± 0.014",
                       "5,130"]
    assert t["FT"] == ["2", "82.00 ± 2.83", "42.00 ± 2.83", "32.00 ± 2.83", "37.00 ± 2.83", "2.100 ± 0.141",
                       "1,000,000"]
    assert t["Only K.D."] == ["1", "81.00", "53.00", "47.00", "50.00", "0.450", "100,000"]
    assert t["APT"] == ["2", "82.00 ± 0.00", "51.00 ± 1.41", "45.00 ± 1.41", "48.00 ± 1.41", "0.400 ± 0.000",
                        "100,000"]
    # best per column in bold, among baseline and distilled rows only: the teacher is better but never bold
    assert t["Ours"] == ["2", "**84.00** ± 1.41", "**57.00** ± 1.41", "**51.00** ± 1.41", "**54.00** ± 1.41",
                         "0.520 ± 0.028", "120,000"]
    assert t["Teacher (rn18)"] == ["1", "90.00", "60.00", "60.00", "60.00", "5.000", "11,000,000"]
    assert "(overhead): VPT (deep) 1.01 (+1.0%); Ours 1.03 (+3.0%)." in md  # rows predicting at extra cost


def test_wise_picks_alpha_and_shows_its_base_runs_cost(df, md):
    t = _table(md, "Table 1/3 analogue")
    assert t["WiSE-FT (LC, α=0.5)"] == ["2", "66.00 ± 0.00", "52.00 ± 0.00", "42.00 ± 0.00", "47.00 ± 0.00",
                                        "0.210 ± 0.014", "5,130"]  # LP's cost
    assert t["WiSE-FT (E2E, α=0.5)"][-2:] == ["2.100 ± 0.141", "1,000,000"]  # FT's cost
    t1 = _table(distill_tables(df, wise_alpha=1.0)["markdown"], "Table 1/3 analogue")
    assert "WiSE-FT (LC, α=0.5)" not in t1
    assert t1["WiSE-FT (LC, α=1)"][1:4] == ["70.00 ± 0.00", "45.00 ± 0.00", "35.00 ± 0.00"]
    models = distill_models(df).set_index("model_id")
    assert models.at[f"wise/{S}/lp/s1/a0.5", "key"] == "wise-lc"
    assert models.at[f"wise/{S}/lp/s1/a0.5", "cost_id"] == f"ft/{S}/lp/s1"
    assert models.at[f"wise/{S}/ft/s0/a1.0", "key"] == "wise-e2e"


def test_zero_shot_setup_is_its_own_table(md):
    t = _table(md, "Table 2 analogue")
    assert [k for k in t if k != "columns"] == ["Zero-shot", "ZS-Full tuning", "ZS-APT", "Ours (rn18 teacher)"]
    assert t["Ours (rn18 teacher)"] == ["1", "79.00", "**55.00**", "**50.00**", "**52.50**", "0.600", "120,000"]
    assert t["ZS-Full tuning"][1] == "**84.00**"
    assert "ZS-APT" not in _table(md, "Table 1/3 analogue")


def test_ablation_and_f_correct_tables(md):
    t6 = _table(md, "Table 6 analogue")
    assert [k for k in t6 if k != "columns"] == [
        "*Inference-time ablations*", "Ours w/o KLD", "Ours w/o U_mc", "Ours (max logit)",
        "*Knowledge-distillation ablation*", "Ours w/o K.D.", "Ours",
        "*Single heads (no selection)*", "Clean head h_c only", "Unclean head h_u only", "Combined head h_m only"]
    assert t6["columns"] == ["photo", "sketch", "photo_c", "Avg. shifts"]
    assert t6["Ours w/o KLD"] == ["2", "83.00 ± 1.41", "56.00 ± 1.41", "50.00 ± 1.41", "53.00 ± 1.41"]
    assert t6["Ours (max logit)"][1] == "81.00 ± 1.41"
    assert t6["Ours w/o K.D."] == ["2", "81.00 ± 1.41", "51.00 ± 1.41", "46.00 ± 1.41", "48.50 ± 1.41"]
    # single heads are diagnostics: the unclean head is best on the shifts but not bold; Ours is
    assert t6["Ours"] == ["2", "**84.00** ± 1.41", "**57.00** ± 1.41", "**51.00** ± 1.41", "**54.00** ± 1.41"]
    assert t6["Unclean head h_u only"] == ["2", "70.00 ± 0.00", "60.00 ± 0.00", "55.00 ± 0.00", "57.50 ± 0.00"]
    t7 = _table(md, "Table 7 analogue")
    assert t7["columns"] == ["photo", "sketch", "photo_c", "Avg. all sets"]
    assert [k for k in t7 if k != "columns"] == ["Ours w/o KLD", "Ours w/o U_mc", "Ours (max logit)", "Ours"]
    # per seed: (0.90 + 0.80 + 0.85)/3 = 0.85 and (0.92 + 0.80 + 0.85)/3 = 0.8567
    assert t7["Ours"] == ["2", "**0.910** ± 0.014", "**0.800** ± 0.000", "**0.850** ± 0.000", "**0.853** ± 0.005"]
    assert t7["Ours w/o U_mc"] == ["2", "0.600 ± 0.000", "0.500 ± 0.000", "0.550 ± 0.000", "0.550 ± 0.000"]


def test_latex_tables(df):
    tex = distill_tables(df)["latex"]
    assert tex.count("\\begin{tabular}") == 5 and tex.count("\\end{tabular}") == 5  # 1, 2, 6, 7, 6 (zero-shot)
    assert "\\multicolumn{8}{l}{\\textit{K.D. from rn18 teacher}} \\\\" in tex
    assert ("Ours & 2 & \\textbf{84.00} $\\pm$ 1.41 & \\textbf{57.00} $\\pm$ 1.41 & \\textbf{51.00} $\\pm$ 1.41 & "
            "\\textbf{54.00} $\\pm$ 1.41 & 0.520 $\\pm$ 0.028 & 120{,}000 \\\\") in tex
    assert "WiSE-FT (LC, $\\alpha$=0.5) & 2 &" in tex
    assert "Zero-shot & 1 & 60.00 & 50.00 & 40.00 & 45.00 & -- & --" in tex
    assert "Ours w/o U\\_mc" in tex


def test_a_timm_students_start_point_is_the_standard_training_row(df):
    """A unimodal student (Table 3) starts from its imported classifier `timm/<student>`, not a zero-shot head."""
    timm = df.copy()
    start = timm["model_id"] == f"zeroshot/{S}"
    timm.loc[start, "model_id"], timm.loc[start, "method"] = f"timm/{S}", "pretrained"
    t = _table(distill_tables(timm)["markdown"], "Table 1/3 analogue")
    assert [k for k in t if k != "columns"][:2] == ["Standard training", "LP"] and "Zero-shot" not in t
    assert t["Standard training"] == ["1", "60.00", "50.00", "40.00", "45.00", "–", "–"]


def test_two_runs_of_one_method_are_labelled_by_run(df):
    second = df[df["model_id"].str.startswith(f"distill/{S}/rn18/three-head/")].copy()
    second["model_id"] = second["model_id"].str.replace("/three-head/", "/three-head-long/")
    second.loc[second["metric"] == "accuracy", "value"] -= 0.10
    t = _table(distill_tables(pd.concat([df, second]))["markdown"], "Table 1/3 analogue")
    assert t["Ours [three-head]"][1] == "**84.00** ± 1.41" and t["Ours [three-head-long]"][1] == "74.00 ± 1.41"
    assert "Ours" not in t


def test_empty_and_bad_inputs(df, tmp_path):
    for frame in (df.iloc[:0], df[df["model_id"].str.startswith(("ft/", "zeroshot/"))]):
        out = distill_tables(frame)
        assert NO_RUNS in out["markdown"] and NO_RUNS in out["latex"] and "|" not in out["markdown"]
        assert distill_table_data(frame) == []
    bad = df[df["model_id"] == f"distill/{S}/rn18/apt/s0"].copy()
    bad["model_id"], bad["method_params"] = f"distill/{S}/rn18/apt-text/s0", json.dumps({"setup": "textual"})
    with pytest.raises(ValueError, match=f"distill/{S}/rn18/apt-text/s0.*setup must be one of.*'textual'"):
        distill_tables(pd.concat([df, bad]))
    with pytest.raises(ValueError, match="eval set 'imagenet-c'.*known: \\['photo', 'photo_c', 'sketch'\\]"):
        pareto_points(df, eval_set="imagenet-c")


def test_write_distill_report(df, tmp_path):
    paths = write_distill_report(df, tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in paths.values()) == [
        "plots/distill_pareto.png", "tables/distill.md", "tables/distill.tex"]
    assert paths["distill_md"].read_text() == distill_tables(df)["markdown"]
    assert paths["distill_tex"].read_text() == distill_tables(df)["latex"]
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------- Pareto
def test_pareto_front_helper():
    #            fast+good  dominated  tie-in-time worse  slow+best  duplicate of the first
    on = pareto_front([1.0, 2.0, 1.0, 5.0, 1.0], [50.0, 40.0, 45.0, 60.0, 50.0])
    assert on.tolist() == [True, False, False, True, True]


def test_pareto_points_and_front(df):
    pts = pareto_points(df).set_index("label")
    assert set(pts["eval_set"]) == {"photo_c"}
    assert "Zero-shot" not in pts.index and "Teacher (rn18)" not in pts.index
    assert pts.loc["Ours", ["train_ms", "accuracy", "n_seeds"]].tolist() == pytest.approx([0.52, 51.0, 2])
    front = set(pts.index[pts["on_front"]])
    # WiSE LC (0.21 ms, 42 %) dominates LP (0.21 ms, 36 %); Ours (0.52, 51) dominates WiSE E2E (2.1, 46)
    assert front == {"WiSE-FT (LC, α=0.5)", "APT", "Only K.D.", "Ours"}
    assert not pts.at["LP", "on_front"] and not pts.at["ZS-Ours (rn18 teacher)", "on_front"]
    on_sketch = pareto_points(df, eval_set="sketch").set_index("label")
    assert on_sketch.at["Ours", "accuracy"] == pytest.approx(57.0)


def test_pareto_plot_is_deterministic_png(df, tmp_path):
    a, b = write_pareto_plot(df, tmp_path / "a.png"), write_pareto_plot(df, tmp_path / "b.png")
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() == b.read_bytes()
    empty = write_pareto_plot(df.iloc[:0], tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and empty.read_bytes() != a.read_bytes()


# ---------------------------------------------------------------------------------------------- claims
def _verdicts(frame, **options):
    return {c.id.split("/")[1]: (p, e) for c, p, e in check_claims(frame, efficiently_robustify_claims(**options))}


def test_claims_registered():
    title, factory = _FACTORIES["efficiently-robustify"]
    assert title == "Efficiently Robustify Pre-Trained Models" and factory is efficiently_robustify_claims
    assert [c.paper for c in factory(wise_alpha=0.5, tolerance=2.0)] == ["efficiently-robustify"] * 4


def test_claims_pass(df):
    v = _verdicts(df)
    assert {k: p for k, (p, _) in v.items()} == {"beats-apt": True, "f-correct": True, "kl-and-uncertainty": True,
                                                 "faster-than-ft": True}
    assert v["beats-apt"][1] == ("photo_c: Ours 51.00% vs APT 45.00%; reference (photo): Ours 84.00% vs APT 82.00% "
                                 "(Δ +2.00, tolerance 2 points); 2 seeds / 2 seeds")
    assert v["f-correct"][1] == ("mean F_correct 0.853 over 3 eval sets (photo 0.910, sketch 0.800, photo_c 0.850); "
                                 "2 seeds")
    assert v["kl-and-uncertainty"][1] == "Avg. shifts: Ours 54.00% vs w/o KLD 53.00% and w/o U_mc 52.00%; 2 seeds"
    assert v["faster-than-ft"][1] == "Ours 0.52 ms/img vs FT 2.1 ms/img (FT/Ours = 4.04); 2 seeds / 2 seeds"
    md = claims_markdown(build(), efficiently_robustify_claims())
    assert "## Efficiently Robustify Pre-Trained Models" in md and "4 PASS, 0 FAIL, 0 NOT RUN" in md


def test_claims_fail(df):
    worse = build(acc={"three-head": [(0.79, 0.56, 0.50), (0.79, 0.58, 0.52)]})  # reference 3 points below APT
    assert _verdicts(worse)["beats-apt"][0] is False
    assert _verdicts(worse, tolerance=4.0)["beats-apt"][0] is True
    assert _verdicts(build(acc={"apt": [(0.82, 0.50, 0.52)] * 2}))["beats-apt"][0] is False  # APT 52 > Ours 51
    assert _verdicts(build(f_correct={"ours": [(0.80, 0.70, 0.75)] * 2}))["f-correct"] == (
        False, "mean F_correct 0.750 over 3 eval sets (photo 0.800, sketch 0.700, photo_c 0.750); 2 seeds")
    assert _verdicts(build(select={"no_kl": 0.005}))["kl-and-uncertainty"][0] is False
    assert _verdicts(build(cost={"ft": (1_000_000, (0.5, 0.5))}))["faster-than-ft"][0] is False


def test_claims_not_run(df):
    v = _verdicts(build(drop=("/apt/",)))
    assert v["beats-apt"] == (None, "no accuracy rows for APT") and v["f-correct"][0] is True
    no_fc = df[~df["metric"].str.startswith("f_correct")]
    assert _verdicts(no_fc)["f-correct"] == (None, "no f_correct_ours rows for Ours (visual setup)")
    no_sel = df[~df["metric"].isin(["accuracy_select_no_kl"])]
    assert _verdicts(no_sel)["kl-and-uncertainty"] == (None, "no Avg. shifts accuracy for Ours w/o KLD")
    no_cost = df[df["shift_type"] != "cost"]
    assert _verdicts(no_cost)["faster-than-ft"] == (
        None, "no train_ms_per_image cost rows for Ours and FT (visual setup)")
    no_c = df[df["eval_dataset"] != "photo_c"]
    assert _verdicts(no_c)["beats-apt"] == (None, "no corruption set (shift_type 'corruption')")
    none = _verdicts(df[df["model_id"].str.startswith(("ft/", "zeroshot/"))])  # the fine-tuning family only
    assert all(v == (None, "no distillation runs in the results") for v in none.values())


def test_claims_per_student(df):
    other = build(cost={"three-head": (120_000, (3.0, 3.0))})  # a second student that trains slower than FT
    other["model_id"] = other["model_id"].str.replace(f"/{S}", "/tinyvit", regex=False)
    v = _verdicts(pd.concat([df, other[~other["model_id"].str.startswith("teachers/")]], ignore_index=True))
    assert v["beats-apt"][0] is True and v["beats-apt"][1].startswith(f"{S} (PASS): photo_c: Ours 51.00%")
    assert v["faster-than-ft"][0] is False
    assert "; tinyvit (FAIL): Ours 3 ms/img vs FT 2.1 ms/img" in v["faster-than-ft"][1]
