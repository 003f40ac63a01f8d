"""Report of "Efficiently Robustify Pre-Trained Models" (SPEC §3): the analogues of the paper's Tables 1/3
(visual setup), 2 (zero-shot setup), 6 (head-selection and K.D. ablations) and 7 (F_correct), the Fig. 1
Pareto plot (corruption accuracy vs training time per image) and the paper's claims, all pure functions
of all_metrics.parquet.

Rows of the frame this report reads (model ids; the seed is the `s<seed>` path segment):
- `zeroshot/<student>` (a timm student: `timm/<student>`, its pre-trained classifier, Table 3's "Standard
  training"); `ft/<student>/<run>/s<seed>` (LP, FT); `wise/<student>/<run>/s<seed>/a<α>`
  (method_params base = the run it interpolates: an LP run gives WiSE-FT (LC), an FT run WiSE-FT (E2E));
- `distill/<student>/<teacher>/<run>/s<seed>` (method_params `setup`: visual | zeroshot, `teacher`);
- `teachers/<name>` (the robustified small teacher);
- cost rows (shift_type "cost") per trained model: trainable_params, train_ms_per_image, inference_gflops,
  inference_gflops_overhead. WiSE has none of its own: it is free on top of its base run, whose cost it shows.

A *row* groups the seeds of one run (its model id without the seed segment). Set-level numbers of a
corrupted set are the mean over its corruption × severity cells (the fine-tuning report's convention,
via its `_measurements`); "Avg. shifts" averages each seed over the shift sets first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from robustify.io import write_bytes, write_text

# Private helpers imported on purpose (the brief: reuse, do not duplicate): `_STATUS`/`_memo` render and
# share verdicts exactly as the other papers' claims do; `_fmt`, `_measurements`, `_params` are the
# fine-tuning report's cell format, measurement filter and method_params parser.
from robustify.report.claims import _STATUS, Claim, Verdict, _memo, register_claims
from robustify.report.finetune import _fmt, _measurements, _params, eval_sets, latex_escape

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AVG_SHIFTS = "Avg. shifts"
AVG_SETS = "Avg. all sets"
TRAIN_MS = "Train ms/img"
PARAMS = "Trainable params"
SETUPS: tuple[str, ...] = ("visual", "zeroshot")
RULES: tuple[str, ...] = ("no_kl", "no_uncertainty", "max_logit", "ours")  # paper Table 6/7 order, Ours last
HEADS: tuple[str, ...] = ("clean", "unclean", "combined")
COST_METRICS: tuple[str, ...] = ("trainable_params", "train_ms_per_image", "inference_gflops",
                                 "inference_gflops_overhead")
# Table 1 order: baselines, then per teacher the K.D. block (the brief puts APT there: same tunable layers).
VISUAL_BASELINES: tuple[str, ...] = ("lp", "ft", "vpt-shallow", "vpt-deep", "wise-lc", "wise-e2e")
KD_BLOCK: tuple[str, ...] = ("single-teacher", "only-kd", "combined-head", "apt", "three-head")
KD_METHODS = frozenset({"single-teacher", "only-kd", "combined-head", "three-head"})
ZEROSHOT_ORDER: tuple[str, ...] = ("zs-ft", "apt")  # then other zero-shot-setup runs, then Ours
NAMES: dict[str, str] = {
    "zeroshot": "Zero-shot", "pretrained": "Standard training", "lp": "LP", "ft": "FT",
    "vpt-shallow": "VPT (shallow)", "vpt-deep": "VPT (deep)",
    "single-teacher": "Single-Teacher", "only-kd": "Only K.D.", "combined-head": "Combined head", "apt": "APT",
    "three-head": "Ours", "three-head-no-kd": "Ours w/o K.D.", "zs-ft": "ZS-Full tuning",
}
RULE_NAMES = {"no_kl": "Ours w/o KLD", "no_uncertainty": "Ours w/o U_mc", "max_logit": "Ours (max logit)",
              "ours": "Ours"}
HEAD_NAMES = {"clean": "Clean head h_c only", "unclean": "Unclean head h_u only",
              "combined": "Combined head h_m only"}
_BOLD_KINDS = frozenset({"baseline", "distill"})  # not zero-shot, teacher or single-head diagnostic rows
_MODEL_COLUMNS = ["model_id", "row_id", "student", "family", "key", "method", "setup", "teacher", "run", "seed",
                  "alpha", "cost_id"]


# ------------------------------------------------------------------------------------------------ models
def _seedless(parts: list[str], seed: int | None) -> str:
    return "/".join(parts[:2] + [p for p in parts[2:] if seed is None or p != f"s{seed}"])


def distill_models(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model id this report uses: model_id, row_id (seedless id), student, family (zeroshot |
    ft | wise | distill | teachers), key (the report's method key: lp, ft, wise-lc, wise-e2e, three-head, ...,
    teacher; WiSE on any other base gets "wise-other"), method, setup (distill runs), teacher, run, seed,
    alpha (WiSE), cost_id (the model whose cost rows count: itself, the base run for WiSE, none for zero-shot).
    """
    models = df[["model_id", "method", "method_params", "seed"]]
    models = models[models["model_id"].notna() & models["method"].notna()].drop_duplicates("model_id")
    recs = []
    for r in models.itertuples(index=False):
        model_id, method = str(r.model_id), str(r.method)
        parts = model_id.split("/")
        params = _params(r.method_params)
        seed = None if pd.isna(r.seed) else int(r.seed)
        rec: dict[str, Any] = {"model_id": model_id, "row_id": _seedless(parts, seed), "student": None,
                               "family": parts[0], "key": method, "method": method, "setup": None, "teacher": None,
                               "run": None, "seed": seed, "alpha": None, "cost_id": model_id}
        if method == "zeroshot" or (method == "pretrained" and parts[0] == "timm"):  # the untrained start point
            rec.update(family="zeroshot", student=parts[-1], cost_id=None)
        elif parts[0] == "ft" and len(parts) >= 3:
            rec.update(student=parts[1], run=parts[2])
        elif parts[0] == "wise" and len(parts) >= 3:
            alpha = params.get("alpha")
            if alpha is None:  # older rows carry α only in the id (`a0.5`), as in the fine-tuning report
                alpha = next((float(p[1:]) for p in parts[3:] if p[:1] == "a" and _is_float(p[1:])), None)
            rec.update(student=parts[1], run=str(params.get("base", parts[2])),
                       alpha=None if alpha is None else round(float(alpha), 6))
        elif parts[0] == "distill":
            if len(parts) < 4:
                raise ValueError(f"result row model_id '{model_id}': expected distill/<student>/<teacher>/<run>"
                                 "[/s<seed>]")
            setup = params.get("setup", "visual")
            if setup not in SETUPS:
                raise ValueError(f"result row '{model_id}': method_params.setup must be one of {list(SETUPS)}, "
                                 f"got {setup!r}")
            teacher = params.get("teacher")
            rec.update(student=parts[1], run=parts[3], setup=setup,
                       teacher=str(teacher) if teacher is not None else parts[2])
        elif parts[0] == "teachers" and len(parts) >= 2:
            rec.update(key="teacher", teacher=parts[1], run=parts[1])
        else:
            continue
        recs.append(rec)
    out = pd.DataFrame(recs, columns=_MODEL_COLUMNS)
    # WiSE: its kind follows its base run's method, and its cost is that run's (same seed).
    ft = out[out["family"] == "ft"]
    base_of = {(s, r, sd): (m, mid) for s, r, sd, m, mid in
               zip(ft["student"], ft["run"], ft["seed"], ft["method"], ft["model_id"])}
    for i in out.index[out["family"] == "wise"]:
        seed = out.at[i, "seed"]
        method, cost_id = base_of.get((out.at[i, "student"], out.at[i, "run"], None if pd.isna(seed) else seed),
                                      (out.at[i, "run"], None))
        out.at[i, "key"] = {"lp": "wise-lc", "ft": "wise-e2e"}.get(str(method), "wise-other")
        out.at[i, "cost_id"] = cost_id
    return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def distill_students(df: pd.DataFrame) -> list[str]:
    """Students with at least one distill-stage run, in first-appearance order."""
    models = distill_models(df)
    return [str(s) for s in dict.fromkeys(models.loc[models["family"] == "distill", "student"])]


# ------------------------------------------------------------------------------------------------ tables
@dataclass(frozen=True)
class Cell:
    mean: float
    std: float  # sample std over seeds (NaN for one seed)
    n: int


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # zeroshot | baseline | distill | teacher | head
    key: str  # report method key (three-head, wise-lc, teacher, ...)
    metric: str  # the metric its eval-set cells show
    row_id: str
    block: str  # heading of the row's block ("" for none)
    seeds: int
    cells: dict[str, Cell]


@dataclass(frozen=True)
class DistillTable:
    key: str  # visual | zeroshot | ablation-<setup> | fcorrect-<setup>
    title: str
    student: str
    columns: tuple[str, ...]
    eval_sets: tuple[str, ...]
    shift_types: dict[str, str]  # eval set -> shift_type
    decimals: dict[str, int]
    rows: tuple[Row, ...]
    note: str

    def row(self, key: str, metric: str | None = None) -> Row | None:
        """The first row (table order) with this method key (and metric)."""
        return next((r for r in self.rows if r.key == key and (metric is None or r.metric == metric)), None)

    def first_set(self, shift_type: str) -> str | None:
        return next((s for s in self.eval_sets if self.shift_types.get(s) == shift_type), None)


@dataclass(frozen=True)
class _Spec:  # a table row before its numbers
    label: str
    kind: str
    key: str
    metric: str
    row_id: str
    block: str
    run: str
    model_ids: tuple[str, ...]
    cost_ids: tuple[str | None, ...]


def _specs(models: pd.DataFrame, kind: str, metric: str, block: str = "",
           label: Callable[[pd.Series], str] | None = None) -> list[_Spec]:
    """One spec per row_id of `models` (table order = their order)."""
    out = []
    for row_id, part in models.groupby("row_id", sort=False):
        first = part.iloc[0]
        name = label(first) if label else NAMES.get(str(first["key"]), str(first["key"]))
        out.append(_Spec(name, kind, str(first["key"]), metric, str(row_id), block, str(first["run"]),
                         tuple(part["model_id"]), tuple(part["cost_id"])))
    return out


def _dedupe(specs: list[_Spec]) -> list[_Spec]:
    """Two rows with the same label (two runs of one method) are told apart by their run name."""
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.label] = counts.get(s.label, 0) + 1
    return [s if counts[s.label] == 1 else replace(s, label=f"{s.label} [{s.run}]") for s in specs]


class _Values:
    """Per-model numbers of one frame, computed once per metric: model × eval set and model × cost metric."""

    def __init__(self, df: pd.DataFrame, model_ids: Iterable[str]) -> None:
        ids = set(model_ids)
        part = df[df["model_id"].isin(ids)]
        cost = part["shift_type"] == "cost"
        self.evals = part[~cost.fillna(False)]
        costs = part[cost.fillna(False) & part["metric"].isin(COST_METRICS)]
        self.costs = costs.pivot_table(index="model_id", columns="metric", values="value", aggfunc="mean")
        self._cache: dict[str, pd.DataFrame] = {}

    def sets(self, metric: str) -> pd.DataFrame:
        if metric not in self._cache:
            vals = _measurements(self.evals, metric)
            table = vals.pivot_table(index="model_id", columns="eval_dataset", values="value", aggfunc="mean")
            self._cache[metric] = table * 100 if metric.startswith("accuracy") else table
        return self._cache[metric]

    def cost(self, cost_ids: Sequence[str | None], metric: str) -> pd.Series:
        col = self.costs[metric] if metric in self.costs.columns else pd.Series(dtype=float)
        return pd.Series([col.get(c, np.nan) if c is not None else np.nan for c in cost_ids], dtype=float)


def _stats(values: pd.Series) -> Cell:
    v = values.dropna().astype(float)
    return Cell(float(v.mean()) if len(v) else math.nan, float(v.std()) if len(v) > 1 else math.nan, int(len(v)))


def _build(vals: _Values, specs: list[_Spec], sets: list[str], shifts: list[str], avg: str | None,
           with_cost: bool) -> list[Row]:
    rows = []
    for s in _dedupe(specs):
        per_seed = vals.sets(s.metric).reindex(index=list(s.model_ids), columns=sets).astype(float)
        averaged = shifts if avg == AVG_SHIFTS else sets
        if avg is not None:  # per seed first; a seed missing one of the sets has no average
            per_seed[avg] = per_seed[averaged].mean(axis=1, skipna=False) if averaged else np.nan
        cells = {c: _stats(per_seed[c]) for c in per_seed.columns}
        if all(c.n == 0 for c in cells.values()):
            continue  # a run without this metric is absent, not a row of dashes
        if with_cost:
            cells[TRAIN_MS] = _stats(vals.cost(s.cost_ids, "train_ms_per_image"))
            cells[PARAMS] = _stats(vals.cost(s.cost_ids, "trainable_params"))
        rows.append(Row(s.label, s.kind, s.key, s.metric, s.row_id, s.block, max(c.n for c in cells.values()), cells))
    return rows


def _columns(df: pd.DataFrame, model_ids: Iterable[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(reference sets, shift sets, shift type per set) of these models' accuracy rows, cost rows excluded."""
    part = df[df["model_id"].isin(set(model_ids)) & (df["shift_type"] != "cost").fillna(True)]
    ref, shifts = eval_sets(part)
    types = _measurements(part, "accuracy").groupby("eval_dataset", sort=False)["shift_type"].first()
    return ref, shifts, {str(k): str(v) for k, v in types.items()}


def _ms_decimals(rows: Sequence[Row]) -> int:
    """Three significant digits on the smallest training time (mini-world models take fractions of a ms)."""
    means = [r.cells[TRAIN_MS].mean for r in rows if TRAIN_MS in r.cells and r.cells[TRAIN_MS].mean > 0]
    return 1 if not means else max(1, min(4, 2 - math.floor(math.log10(min(means)))))


def _set_note(ref: list[str], shifts: list[str], types: dict[str, str]) -> str:
    return (f"Reference: {', '.join(ref) or 'none'}. Shift sets: "
            + (", ".join(f"{s} ({types.get(s, '?')})" for s in shifts) or "none") + ".")


def _gflops_note(vals: _Values, rows: Sequence[Row], specs: dict[str, _Spec]) -> str:
    parts = []
    for r in rows:
        spec = specs.get(r.row_id)
        if spec is None:
            continue
        g = _stats(vals.cost(spec.cost_ids, "inference_gflops"))
        o = _stats(vals.cost(spec.cost_ids, "inference_gflops_overhead"))
        if o.n and o.mean != 0:  # the models that predict with more than the initial model does
            parts.append(f"{r.label} " + (f"{g.mean:.3g}" if g.n else "–") + f" ({o.mean * 100:+.1f}%)")
    return ("Inference GFLOPs per image where it exceeds the initial model's (overhead): " + "; ".join(parts)
            + ".") if parts else ""


def _table(key: str, title: str, student: str, df: pd.DataFrame, vals: _Values, specs: list[_Spec], avg: str,
           with_cost: bool, decimals: int, note: str, column_models: Iterable[str] | None = None,
           ) -> DistillTable | None:
    if not specs:
        return None
    ids = [m for s in specs for m in s.model_ids] if column_models is None else list(column_models)
    ref, shifts, types = _columns(df, ids)
    sets = ref + shifts
    rows = _build(vals, specs, sets, shifts, avg, with_cost)
    if not rows or not sets:
        return None
    columns = [*sets, avg] + ([TRAIN_MS, PARAMS] if with_cost else [])
    dec = {c: decimals for c in [*sets, avg]}
    notes = [_set_note(ref, shifts, types), note]
    if with_cost:
        dec.update({TRAIN_MS: _ms_decimals(rows), PARAMS: 0})
        notes.append(_gflops_note(vals, rows, {s.row_id: s for s in specs}))
    return DistillTable(key, title, student, tuple(columns), tuple(sets), types, dec, tuple(rows),
                        " ".join(n for n in notes if n))


def _student_tables(df: pd.DataFrame, models: pd.DataFrame, vals: _Values, student: str,
                    wise_alpha: float) -> list[DistillTable]:
    mine = models[models["student"] == student]
    zs = mine[mine["family"] == "zeroshot"]
    distill = mine[mine["family"] == "distill"]
    cost_note = ("Train ms/img: median training-step time / batch size; WiSE-FT rows show their base run's "
                 "cost (interpolation is free), Zero-shot trains nothing.")
    tables: list[DistillTable | None] = []

    # Table 1/3: visual setup
    vis = distill[distill["setup"] == "visual"]
    specs = _specs(zs, "zeroshot", "accuracy")
    for key in VISUAL_BASELINES:
        if key.startswith("wise"):
            part = mine[(mine["key"] == key) & np.isclose(mine["alpha"].astype(float), wise_alpha)]
            kind = "LC" if key == "wise-lc" else "E2E"
            specs += _specs(part, "baseline", "accuracy",
                            label=lambda r, kind=kind: f"WiSE-FT ({kind}, α={wise_alpha:g})")
        else:
            part = mine[mine["family"] == "ft"] if key in ("lp", "ft") else vis
            specs += _specs(part[part["key"] == key], "baseline", "accuracy")
    kd = vis[vis["key"].isin(KD_BLOCK)]
    others = vis[~vis["key"].isin(set(KD_BLOCK) | set(VISUAL_BASELINES) | {"three-head-no-kd"})]
    for teacher in dict.fromkeys(kd["teacher"]):
        block = kd[kd["teacher"] == teacher]
        title = f"K.D. from {teacher} teacher" if block["key"].isin(KD_METHODS).any() else "Augmentation only (no K.D.)"
        for key in KD_BLOCK:
            specs += _specs(block[block["key"] == key], "distill", "accuracy", title)
        specs += _specs(models[(models["family"] == "teachers") & (models["teacher"] == teacher)], "teacher",
                        "accuracy", title, label=lambda r: f"Teacher ({r['teacher']})")
    specs += _specs(others, "distill", "accuracy", "Other runs" if not others.empty else "")
    student_ids = [m for s in specs if s.kind != "teacher" for m in s.model_ids]
    if not vis.empty:
        tables.append(_table("visual", "Table 1/3 analogue — visual evaluation: top-1 accuracy (%)", student, df,
                             vals, specs, AVG_SHIFTS, True, 2,
                             f"{cost_note} WiSE-FT at α={wise_alpha:g}; LC = on LP, E2E = on FT.", student_ids))

    # Table 2: zero-shot setup (text tower as the head)
    zsd = distill[distill["setup"] == "zeroshot"]
    if not zsd.empty:
        specs = _specs(zs, "zeroshot", "accuracy")
        skip = (*ZEROSHOT_ORDER, "three-head", "three-head-no-kd")  # the last one is Table 6's
        order = [*ZEROSHOT_ORDER, *[k for k in dict.fromkeys(zsd["key"]) if k not in skip], "three-head"]
        for key in order:
            specs += _specs(zsd[zsd["key"] == key], "distill", "accuracy", label=_zs_label)
        tables.append(_table("zeroshot", "Table 2 analogue — zero-shot setup: top-1 accuracy (%)", student, df,
                             vals, specs, AVG_SHIFTS, True, 2, cost_note))

    # Tables 6 and 7: head-selection and K.D. ablations, per setup with a three-head run
    for setup in SETUPS:
        runs = distill[(distill["setup"] == setup) & (distill["key"] == "three-head")]
        if runs.empty:
            continue
        suffix = "" if setup == "visual" else " (zero-shot setup)"
        no_kd = distill[(distill["setup"] == setup) & (distill["key"] == "three-head-no-kd")]
        inf, kdb, heads = "Inference-time ablations", "Knowledge-distillation ablation", "Single heads (no selection)"
        specs = [s for rule in RULES[:-1] for s in _specs(runs, "distill", f"accuracy_select_{rule}", inf,
                                                          label=lambda r, rule=rule: RULE_NAMES[rule])]
        specs += _specs(no_kd, "distill", "accuracy_select_ours", kdb)
        specs += _specs(runs, "distill", "accuracy_select_ours", kdb)
        specs += [s for h in HEADS for s in _specs(runs, "head", f"accuracy_head_{h}", heads,
                                                   label=lambda r, h=h: HEAD_NAMES[h])]
        tables.append(_table(f"ablation-{setup}", "Table 6 analogue — head selection and K.D. ablations: top-1 "
                             f"accuracy (%){suffix}", student, df, vals, specs, AVG_SHIFTS, False, 2,
                             "Ours w/o KLD / w/o U_mc / (max logit): Ours' student with another head-selection rule; "
                             "Ours w/o K.D.: three heads trained without distillation. Bold ignores single-head rows."))
        specs = [s for rule in RULES for s in _specs(runs, "distill", f"f_correct_{rule}",
                                                     label=lambda r, rule=rule: RULE_NAMES[rule])]
        tables.append(_table(f"fcorrect-{setup}", f"Table 7 analogue — F_correct{suffix}", student, df, vals, specs,
                             AVG_SETS, False, 3,
                             "F_correct: share of samples routed to the right head (clean on the reference set, "
                             f"unclean on shift sets); \"{AVG_SETS}\" averages every eval set, reference included."))
    return [t for t in tables if t is not None]


def _zs_label(r: pd.Series) -> str:
    key = str(r["key"])
    if key == "three-head":
        return f"Ours ({r['teacher']} teacher)"
    name = NAMES.get(key, key)
    return name if name.startswith("ZS-") else f"ZS-{name}"


def distill_table_data(df: pd.DataFrame, wise_alpha: float = 0.5) -> list[DistillTable]:
    """Every distillation table of every student (students in first-appearance order)."""
    models = distill_models(df)
    students = [str(s) for s in dict.fromkeys(models.loc[models["family"] == "distill", "student"])]
    if not students:
        return []
    vals = _Values(df, models["model_id"])
    return [t for s in students for t in _student_tables(df, models, vals, s, wise_alpha)]


# ------------------------------------------------------------------------------------------- rendering
def _best(table: DistillTable) -> dict[str, set[int]]:
    """Per eval-set / average column, the indices of the rows (bold kinds only) with the best displayed mean."""
    best: dict[str, set[int]] = {}
    for col in table.columns:
        if col in (TRAIN_MS, PARAMS):
            continue
        means = {i: round(r.cells[col].mean, table.decimals[col]) for i, r in enumerate(table.rows)
                 if r.kind in _BOLD_KINDS and col in r.cells and r.cells[col].n}
        if means:
            top = max(means.values())
            best[col] = {i for i, m in means.items() if m == top}
    return best


def _cell(table: DistillTable, i: int, col: str, best: dict[str, set[int]], latex: bool) -> str:
    c = table.rows[i].cells.get(col)
    if c is None or c.n == 0:
        return "--" if latex else "–"
    if col == PARAMS:  # counts: exact integers, thousands separated
        text = f"{int(round(c.mean)):,}"
        if c.n > 1 and c.std > 0:
            text += (" $\\pm$ " if latex else " ± ") + f"{int(round(c.std)):,}"
        return text.replace(",", "{,}") if latex else text
    return _fmt(c.mean, c.std, c.n, table.decimals[col], i in best.get(col, set()), latex)


def _markdown_table(t: DistillTable) -> list[str]:
    best = _best(t)
    lines = [f"## {t.title} — {t.student}", "", t.note, "",
             "| " + " | ".join(["Method", "seeds", *t.columns]) + " |",
             "|" + "|".join([":---", "---:"] + ["---:"] * len(t.columns)) + "|"]
    block = ""
    for i, r in enumerate(t.rows):
        if r.block != block:
            block = r.block
            if block:
                lines.append(f"| *{block}* |" + " |" * (len(t.columns) + 1))
        lines.append("| " + " | ".join([r.label, str(r.seeds), *(_cell(t, i, c, best, False) for c in t.columns)])
                     + " |")
    return [*lines, ""]


def _latex_table(t: DistillTable) -> list[str]:
    best = _best(t)
    width = len(t.columns) + 2
    out = [f"% {latex_escape(t.title)} -- {latex_escape(t.student)}", "% " + latex_escape(t.note),
           "\\begin{tabular}{l" + "r" * (len(t.columns) + 1) + "}", "\\toprule",
           " & ".join(["Method", "Seeds", *(latex_escape(c) for c in t.columns)]) + " \\\\", "\\midrule"]
    block, previous_kind = "", t.rows[0].kind if t.rows else ""
    for i, r in enumerate(t.rows):
        if r.block != block:
            block = r.block
            if i:
                out.append("\\midrule")
            if block:
                out.append(f"\\multicolumn{{{width}}}{{l}}{{\\textit{{{latex_escape(block)}}}}} \\\\")
        elif not block and r.kind != previous_kind and i:
            out.append("\\midrule")
        previous_kind = r.kind
        out.append(" & ".join([latex_escape(r.label), str(r.seeds), *(_cell(t, i, c, best, True) for c in t.columns)])
                   + " \\\\")
    return [*out, "\\bottomrule", "\\end{tabular}", ""]


NO_RUNS = "No distillation runs (model ids distill/...) in the results."


def distill_tables(df: pd.DataFrame, wise_alpha: float = 0.5) -> dict[str, str]:
    """{"markdown": ..., "latex": ...}: every table of `distill_table_data`, each cell mean ± sample std over
    seeds (std omitted for one seed), the best baseline/distilled row per accuracy column in bold (the
    zero-shot model, the teacher and single-head rows are shown but never bold; cost columns are not bolded)."""
    tables = distill_table_data(df, wise_alpha)
    md = ["# Efficiently Robustify Pre-Trained Models (distillation)", ""]
    tex = ["% Efficiently Robustify Pre-Trained Models: mean $\\pm$ sample std over seeds.",
           "% Requires \\usepackage{booktabs}.", ""]
    if not tables:
        return {"markdown": "\n".join([*md, NO_RUNS, ""]), "latex": "\n".join([*tex, "% " + NO_RUNS, ""])}
    md += ["Cells: mean ± sample standard deviation over seeds (column `seeds`). Bold: best value per column "
           "among baseline and distilled rows. Corrupted sets count by their mean over corruption × severity "
           "cells; averages take each seed's mean over the sets first.", ""]
    for t in tables:
        md += _markdown_table(t)
        tex += _latex_table(t)
    return {"markdown": "\n".join(md), "latex": "\n".join(tex)}


def write_distill_report(df: pd.DataFrame, out_dir: str | Path, wise_alpha: float = 0.5) -> dict[str, Path]:
    """Write tables/distill.md, tables/distill.tex and plots/distill_pareto.png under `out_dir` (atomically;
    always written, with a "no distillation runs" text / empty panel when there are none)."""
    out = Path(out_dir)
    paths = {"distill_md": out / "tables" / "distill.md", "distill_tex": out / "tables" / "distill.tex",
             "distill_pareto": out / "plots" / "distill_pareto.png"}
    text = distill_tables(df, wise_alpha)
    write_text(paths["distill_md"], text["markdown"])
    write_text(paths["distill_tex"], text["latex"])
    write_pareto_plot(df, paths["distill_pareto"], wise_alpha=wise_alpha)
    return paths


# ---------------------------------------------------------------------------------------------- Pareto
def pareto_front(time: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Boolean mask of the non-dominated points (minimise time, maximise accuracy): a point is off the front
    iff another is at least as fast and at least as accurate, and strictly better in one."""
    t, a = np.asarray(time, float), np.asarray(accuracy, float)
    no_worse = (t[None, :] <= t[:, None]) & (a[None, :] >= a[:, None])
    better = (t[None, :] < t[:, None]) | (a[None, :] > a[:, None])
    return ~(no_worse & better).any(axis=1)


_POINT_COLUMNS = ["student", "eval_set", "label", "key", "table", "train_ms", "train_ms_std", "accuracy",
                  "accuracy_std", "n_seeds", "on_front"]


def pareto_points(df: pd.DataFrame, eval_set: str | None = None, wise_alpha: float = 0.5) -> pd.DataFrame:
    """One point per trained row of Tables 1 and 2 (not zero-shot, which trains nothing, nor the teacher,
    whose cost is the small model's): train ms/img and accuracy (%) on `eval_set` (default: each student's
    first set with shift_type "corruption"), means and stds over seeds, and its Pareto-front membership
    within the student."""
    tables = [t for t in distill_table_data(df, wise_alpha) if t.key in ("visual", "zeroshot")]
    if eval_set is not None and tables and not any(eval_set in t.eval_sets for t in tables):
        known = sorted({s for t in tables for s in t.eval_sets})
        raise ValueError(f"pareto plot: eval set '{eval_set}' has no accuracy rows in the distillation tables; "
                         f"known: {known}")
    recs = []
    for student in dict.fromkeys(t.student for t in tables):
        mine = [t for t in tables if t.student == student]
        target = eval_set or next((s for t in mine if (s := t.first_set("corruption"))), None)
        if target is None:
            continue
        for t in mine:
            for r in t.rows:
                ms, acc = r.cells.get(TRAIN_MS), r.cells.get(target)
                if r.kind not in _BOLD_KINDS or ms is None or acc is None or not ms.n or not acc.n or ms.mean <= 0:
                    continue
                label = r.label if t.key == "visual" or r.label.startswith("ZS-") else f"ZS-{r.label}"
                recs.append({"student": student, "eval_set": target, "label": label, "key": r.key, "table": t.key,
                             "train_ms": ms.mean, "train_ms_std": ms.std, "accuracy": acc.mean,
                             "accuracy_std": acc.std, "n_seeds": max(ms.n, acc.n)})
    out = pd.DataFrame(recs, columns=_POINT_COLUMNS)
    out["on_front"] = False
    for _, idx in out.groupby("student", sort=False).groups.items():
        out.loc[idx, "on_front"] = pareto_front(out.loc[idx, "train_ms"], out.loc[idx, "accuracy"])
    return out.astype({"on_front": bool})


def pareto_figure(df: pd.DataFrame, eval_set: str | None = None, wise_alpha: float = 0.5) -> Figure:
    """Fig. 1 analogue: per student, x = training time per image (ms, log scale), y = accuracy (%) on the
    corruption set, one labelled point per method row (error bars: std over seeds), the Pareto front as a
    step line (best accuracy reachable within a time budget)."""
    from matplotlib.ticker import FuncFormatter

    from robustify.report.plots import _colors, _empty, _grid

    pts = pareto_points(df, eval_set, wise_alpha)
    if pts.empty:
        return _empty("no distillation runs with training time and corruption-set accuracy")
    students = list(dict.fromkeys(pts["student"]))
    fig, axes = _grid(len(students), legend_width=0.0)
    for ax, student in zip(axes, students):
        part = pts[pts["student"] == student]
        colors = _colors(part["label"])
        for p in part.itertuples(index=False):
            yerr = p.accuracy_std if p.n_seeds > 1 and not math.isnan(p.accuracy_std) else None
            xerr = None
            if p.n_seeds > 1 and not math.isnan(p.train_ms_std):  # keep the lower bar positive on a log axis
                xerr = [[min(p.train_ms_std, 0.5 * p.train_ms)], [p.train_ms_std]]
            ax.errorbar([p.train_ms], [p.accuracy], yerr=yerr, xerr=xerr, fmt="*" if p.key == "three-head" else "o",
                        ms=12 if p.key == "three-head" else 7, color=colors[p.label], mec="black", mew=0.5,
                        capsize=2, zorder=3)
            ax.annotate(p.label, (p.train_ms, p.accuracy), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = part[part["on_front"]].sort_values(["train_ms", "accuracy"])
        ax.step(front["train_ms"], front["accuracy"], where="post", color="black", ls="--", lw=1, zorder=2,
                label="Pareto front (max accuracy, min time)")
        ax.set_xscale("log")  # plain tick labels (1, 2, 5 per decade), room on the right for the point labels
        ax.set_xlim(part["train_ms"].min() / 1.5, part["train_ms"].max() * 4)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("training time per image (ms, log scale)")
        ax.set_ylabel(f"accuracy on {part['eval_set'].iloc[0]} (%)")
        ax.set_title(f"Accuracy vs training cost — {student}")
        ax.legend(loc="lower right", fontsize=7)
    fig.subplots_adjust(left=0.1, right=0.97, wspace=0.3, hspace=0.35)
    return fig


def write_pareto_plot(df: pd.DataFrame, path: str | Path, eval_set: str | None = None,
                      wise_alpha: float = 0.5) -> Path:
    from robustify.report.plots import _style, figure_png

    with _style():
        data = figure_png(pareto_figure(df, eval_set, wise_alpha))
    write_bytes(path, data)
    return Path(path)


# ---------------------------------------------------------------------------------------------- claims
def _tables_by_student(df: pd.DataFrame, wise_alpha: float) -> dict[str, dict[str, DistillTable]]:
    def compute() -> dict[str, dict[str, DistillTable]]:
        out: dict[str, dict[str, DistillTable]] = {}
        for t in distill_table_data(df, wise_alpha):
            out.setdefault(t.student, {})[t.key] = t
        return out
    return _memo(("distill-tables", id(df), wise_alpha), compute)


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def _per_student(check: Callable[[dict[str, DistillTable]], Verdict], wise_alpha: float
                 ) -> Callable[[pd.DataFrame], Verdict]:
    """Check every student with distillation runs: FAIL if any fails, PASS if the others pass, NOT RUN if
    none could be checked (as the fine-tuning claims' per_backbone)."""
    def run(df: pd.DataFrame) -> Verdict:
        students = _memo(("distill-students", id(df)), lambda: distill_students(df))
        if not students:
            return None, "no distillation runs in the results"
        tables = _tables_by_student(df, wise_alpha)
        verdicts = [(s, *check(tables.get(s, {}))) for s in students]
        if len(verdicts) == 1:
            return verdicts[0][1], verdicts[0][2]
        ran = [p for _, p, _ in verdicts if p is not None]
        return (all(ran) if ran else None), "; ".join(f"{s} ({_STATUS[p]}): {e}" for s, p, e in verdicts)
    return run


@register_claims("efficiently-robustify", "Efficiently Robustify Pre-Trained Models")
def efficiently_robustify_claims(wise_alpha: float = 0.5, tolerance: float = 2.0, **_: Any) -> list[Claim]:
    """The paper's headline claims on our numbers (visual setup, means over seeds); `tolerance` (accuracy
    points) bounds "keeping clean accuracy"."""

    def beats_apt(tables: dict[str, DistillTable]) -> Verdict:
        t = tables.get("visual")
        if t is None:
            return None, "no visual-setup distillation runs"
        ours, apt = t.row("three-head"), t.row("apt")
        if ours is None or apt is None:
            missing = [n for n, r in (("Ours", ours), ("APT", apt)) if r is None]
            return None, "no accuracy rows for " + " and ".join(missing)
        corr, ref = t.first_set("corruption"), t.first_set("reference")
        if corr is None or ref is None:
            return None, "no " + " and no ".join(n for n, s in (("corruption set (shift_type 'corruption')", corr),
                                                               ("reference set", ref)) if s is None)
        oc, ac, orf, arf = ours.cells[corr], apt.cells[corr], ours.cells[ref], apt.cells[ref]
        if not all(c.n for c in (oc, ac, orf, arf)):
            return None, f"Ours or APT lacks accuracy on {corr} or {ref}"
        passed = oc.mean > ac.mean and orf.mean >= arf.mean - tolerance
        return bool(passed), (f"{corr}: Ours {oc.mean:.2f}% vs APT {ac.mean:.2f}%; reference ({ref}): Ours "
                              f"{orf.mean:.2f}% vs APT {arf.mean:.2f}% (Δ {orf.mean - arf.mean:+.2f}, tolerance "
                              f"{tolerance:g} points); {_seeds(oc.n)} / {_seeds(ac.n)}")

    def routes_right(tables: dict[str, DistillTable]) -> Verdict:
        t = tables.get("fcorrect-visual")
        ours = t.row("three-head", "f_correct_ours") if t is not None else None
        if t is None or ours is None:
            return None, "no f_correct_ours rows for Ours (visual setup)"
        per_set = {s: ours.cells[s].mean for s in t.eval_sets if ours.cells[s].n}
        if not per_set:
            return None, "no f_correct_ours rows for Ours (visual setup)"
        mean = float(np.mean(list(per_set.values())))
        sets = ", ".join(f"{s} {v:.3f}" for s, v in per_set.items())
        return bool(mean >= 0.8), (f"mean F_correct {mean:.3f} over {len(per_set)} eval sets ({sets}); "
                                   f"{_seeds(ours.seeds)}")

    def both_help(tables: dict[str, DistillTable]) -> Verdict:
        t = tables.get("ablation-visual")
        ours = t.row("three-head", "accuracy_select_ours") if t is not None else None
        if t is None or ours is None:
            return None, "no head-selection accuracy rows for Ours (visual setup)"
        rows = {rule: next((r for r in t.rows if r.row_id == ours.row_id and r.metric == f"accuracy_select_{rule}"),
                           None) for rule in ("no_kl", "no_uncertainty")}
        vals = {k: r.cells[AVG_SHIFTS] for k, r in {"ours": ours, **rows}.items() if r is not None}
        missing = [RULE_NAMES[k] for k in ("ours", "no_kl", "no_uncertainty") if k not in vals or not vals[k].n]
        if missing:
            return None, f"no {AVG_SHIFTS} accuracy for " + " and ".join(missing)
        o, kl, u = vals["ours"].mean, vals["no_kl"].mean, vals["no_uncertainty"].mean
        return bool(o >= kl and o >= u), (f"{AVG_SHIFTS}: Ours {o:.2f}% vs w/o KLD {kl:.2f}% and w/o U_mc "
                                          f"{u:.2f}%; {_seeds(vals['ours'].n)}")

    def faster_than_ft(tables: dict[str, DistillTable]) -> Verdict:
        t = tables.get("visual")
        ours, ft = (t.row("three-head"), t.row("ft")) if t is not None else (None, None)
        cells = {n: r.cells.get(TRAIN_MS) if r is not None else None for n, r in (("Ours", ours), ("FT", ft))}
        missing = [n for n, c in cells.items() if c is None or not c.n]
        if missing:
            return None, "no train_ms_per_image cost rows for " + " and ".join(missing) + " (visual setup)"
        o, f = cells["Ours"], cells["FT"]
        assert o is not None and f is not None
        ratio = f" (FT/Ours = {f.mean / o.mean:.2f})" if o.mean > 0 else ""
        return bool(o.mean < f.mean), (f"Ours {o.mean:.4g} ms/img vs FT {f.mean:.4g} ms/img{ratio}; "
                                       f"{_seeds(o.n)} / {_seeds(f.n)}")

    paper = "efficiently-robustify"
    return [
        Claim("efficiently-robustify/beats-apt", "The three-head student beats APT on the corruption set while keeping "
              f"clean accuracy (reference accuracy ≥ APT's − {tolerance:g} points)",
              _per_student(beats_apt, wise_alpha), paper),
        Claim("efficiently-robustify/f-correct", "Head selection routes most samples to the right head: F_correct ≥ "
              "0.8 (Ours, mean over the eval sets)", _per_student(routes_right, wise_alpha), paper),
        Claim("efficiently-robustify/kl-and-uncertainty", "KL and uncertainty both help: Ours ≥ w/o KLD and Ours ≥ "
              "w/o U_mc on the mean accuracy over shift sets", _per_student(both_help, wise_alpha), paper),
        Claim("efficiently-robustify/faster-than-ft", "Ours trains faster per image than full fine-tuning "
              "(train_ms_per_image)", _per_student(faster_than_ft, wise_alpha), paper),
    ]
