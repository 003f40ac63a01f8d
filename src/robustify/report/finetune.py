"""Fine-tuning report: the analogues of Lipsum-FT Tables 1–2 (accuracy, ECE, NLL per eval set, mean ± std
over seeds) from all_metrics.parquet, plus the WiSE/energy-gap plots and the paper's claims.

A *method row* groups the seeds of one recipe: its id is the model id with the seed segment removed
(`ft/<model>/lipsum-ft/s3` → `ft/<model>/lipsum-ft`, `wise/<model>/ft/s0/a0.5` → `wise/<model>/ft/a0.5`).
Kinds: the zero-shot model (`method == "zeroshot"`), fine-tuned runs (model id `ft/...`) and post-hoc
compositions (anything whose method_params name a `base` method: WiSE, TPGM, soups). Rows of other
families (teachers, distilled students) are not part of this report.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from robustify.io import write_text

FINETUNE_METHODS: tuple[str, ...] = ("ft", "scratch-ft", "lp", "lp-ft", "ema", "l2sp", "kd", "car-ft", "featkd",
                                     "lipsum-ft")
POSTHOC_METHODS: tuple[str, ...] = ("wise", "tpgm", "tpgm-c")
SOUP_METHODS: tuple[str, ...] = ("uniform-soup", "greedy-soup", "greedy-ensemble")
DISPLAY_NAMES: dict[str, str] = {
    "zeroshot": "Zero-shot", "pretrained": "Standard training", "ft": "FT", "scratch-ft": "Scratch-FT", "lp": "LP",
    "lp-ft": "LP-FT", "ema": "EMA",
    "l2sp": "L2SP", "kd": "KD", "car-ft": "CAR-FT", "featkd": "FeatKD", "lipsum-ft": "Lipsum-FT",
    "wise": "WiSE-FT", "tpgm": "TPGM", "tpgm-c": "TPGM-C", "uniform-soup": "Uniform soup",
    "greedy-soup": "Greedy soup", "greedy-ensemble": "Greedy ensemble",
}
SHIFT_MEAN = "shift mean"
PERCENT_METRICS = frozenset({"accuracy", "ece"})
TABLE_METRICS: tuple[tuple[str, str, int], ...] = (  # metric, title, decimals
    ("accuracy", "Top-1 accuracy (%)", 2), ("ece", "ECE, 15 bins (%)", 2), ("nll", "NLL", 3))
_HIGHER_IS_BETTER = {"accuracy": True, "ece": False, "nll": False}
_KIND_RANK = {"zeroshot": 0, "finetune": 1, "posthoc": 2}
_MODEL_COLUMNS = ["model_id", "backbone", "row_id", "kind", "method", "base", "alpha", "seed", "label",
                  "group_label", "order"]


def method_label(method: str, base: str | None = None, alpha: float | None = None) -> str:
    """Display name of a method row: "FT", "WiSE-FT (α=0.5) on Lipsum-FT", "Greedy soup of FT", ..."""
    name = DISPLAY_NAMES.get(method, method)
    if base is None:
        return name
    on = DISPLAY_NAMES.get(base, base)
    if method == "wise":
        return f"WiSE-FT (α={alpha:g}) on {on}" if alpha is not None else f"WiSE-FT on {on}"
    return f"{name} of {on}" if method in SOUP_METHODS else f"{name} on {on}"


def _params(raw: object) -> dict:
    if raw is None or (not isinstance(raw, str) and pd.isna(raw)):
        return {}
    try:
        out = json.loads(str(raw))
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def _method_rank(method: str | None) -> float:
    return float(FINETUNE_METHODS.index(method)) if method in FINETUNE_METHODS else math.inf


def method_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model id of the fine-tuning family: model_id, backbone, row_id (seedless id), kind
    (zeroshot | finetune | posthoc), method, base, alpha (WiSE), seed, label, group_label (label without
    α) and order (the table order: zero-shot, fine-tuning methods in FINETUNE_METHODS order then unknown
    ones, then post-hoc compositions by base method and post-hoc kind)."""
    models = df[["model_id", "method", "method_params", "seed"]]
    models = models[models["model_id"].notna() & models["method"].notna()].drop_duplicates("model_id")
    recs = []
    for appearance, r in enumerate(models.itertuples(index=False)):
        model_id, method = str(r.model_id), str(r.method)
        parts = model_id.split("/")
        params = _params(r.method_params)
        seed = None if pd.isna(r.seed) else int(r.seed)
        base: str | None = None
        alpha: float | None = None
        if method == "zeroshot" or (method == "pretrained" and parts[0] == "timm"):  # the start point θ0
            kind = "zeroshot"
        elif parts[0] == "ft":
            kind = "finetune"
        elif "base" in params:
            kind, base = "posthoc", str(params["base"])
            if method == "wise":
                alpha = params.get("alpha")
                if alpha is None:
                    alpha = next((float(p[1:]) for p in parts[2:] if re.fullmatch(r"a[0-9.]+", p)), None)
                alpha = None if alpha is None else round(float(alpha), 6)
        else:
            continue
        row_parts = parts[:2] + [p for p in parts[2:] if seed is None or p != f"s{seed}"]
        post_rank = (POSTHOC_METHODS + SOUP_METHODS).index(method) if method in POSTHOC_METHODS + SOUP_METHODS \
            else len(POSTHOC_METHODS + SOUP_METHODS)
        order = (_KIND_RANK[kind], _method_rank(base if kind == "posthoc" else method), post_rank,
                 -1.0 if alpha is None else alpha, appearance)
        recs.append({"model_id": model_id, "backbone": parts[1] if len(parts) > 1 else model_id,
                     "row_id": "/".join(row_parts), "kind": kind, "method": method, "base": base, "alpha": alpha,
                     "seed": seed, "label": method_label(method, base, alpha),
                     "group_label": method_label(method, base, None), "order": order})
    out = pd.DataFrame(recs, columns=_MODEL_COLUMNS)
    if out.empty:
        return out
    # The order of a row is the order of its first model; appearance breaks ties between unknown methods.
    first: dict[str, tuple] = {}
    for row_id, key in zip(out["row_id"], out["order"]):
        first[row_id] = min(first.get(row_id, key), key)
    rank = {key: i for i, key in enumerate(sorted(set(first.values())))}
    out["order"] = [rank[first[r]] for r in out["row_id"]]
    finetuned = set(out.loc[out["kind"] != "zeroshot", "backbone"])
    out = out[out["backbone"].isin(finetuned)]
    # Two recipes with the same display name (e.g. TPGM-C at two strengths) are told apart by their id.
    names = out.drop_duplicates("row_id").groupby(["backbone", "label"])["row_id"].transform("size")
    clash = set(out.drop_duplicates("row_id")[names > 1]["row_id"])
    out.loc[out["row_id"].isin(clash), "label"] = out["label"] + " [" + out["row_id"] + "]"
    return out.sort_values("order", kind="stable").reset_index(drop=True)


def has_finetune_rows(df: pd.DataFrame) -> bool:
    """Whether the frame holds any fine-tuned or post-hoc model (the zero-shot-only pipeline does not)."""
    return not method_rows(df).empty


def _measurements(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows of one metric that are set-level values or corruption × severity cells."""
    per_corruption = df["corruption"].notna() & df["severity"].isna()
    keep = (df["metric"] == metric).fillna(False) & df["model_id"].notna() & df["eval_dataset"].notna()
    return df[keep & ~per_corruption]


def eval_sets(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(reference sets, shift sets) with accuracy rows, in first-appearance order; sets without accuracy
    (ImageNet-P-like sequence sets) are not table columns."""
    acc = _measurements(df, "accuracy")
    shift_of = acc.groupby("eval_dataset", sort=False)["shift_type"].first()
    ref = [str(s) for s, t in shift_of.items() if t == "reference"]
    return ref, [str(s) for s, t in shift_of.items() if t != "reference"]


def seed_values(df: pd.DataFrame, metric: str, wise_alpha: float | None = 0.5) -> pd.DataFrame:
    """model_id × column (eval sets, then "shift mean") for one metric, one row per model (= per seed).

    A corrupted set counts by its mean over corruption × severity cells; "shift mean" is the mean over the
    backbone's shift sets and is missing when the model lacks any of them. Accuracy and ECE in %.
    `wise_alpha` keeps only that WiSE α (None keeps the whole sweep).
    """
    return _seed_values(df, metric, wise_alpha, method_rows(df))


def _seed_values(df: pd.DataFrame, metric: str, wise_alpha: float | None, models: pd.DataFrame) -> pd.DataFrame:
    if wise_alpha is not None:
        models = models[(models["method"] != "wise") | np.isclose(models["alpha"].astype(float), wise_alpha)]
    frames = []
    for backbone, mods in models.groupby("backbone", sort=False):
        part = df[df["model_id"].isin(mods["model_id"])]
        ref, shifts = eval_sets(part)
        vals = _measurements(part, metric)
        vals = vals[vals["eval_dataset"].isin(ref + shifts)]
        table = vals.pivot_table(index="model_id", columns="eval_dataset", values="value", aggfunc="mean")
        table = table.reindex(index=list(mods["model_id"]), columns=ref + shifts).astype(float)
        if shifts:
            table[SHIFT_MEAN] = table[shifts].mean(axis=1, skipna=False)
        frames.append(table)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames)
    out = out[[c for c in dict.fromkeys(c for f in frames for c in f.columns) if c != SHIFT_MEAN]
              + ([SHIFT_MEAN] if SHIFT_MEAN in out.columns else [])]
    if metric in PERCENT_METRICS:
        out = out * 100
    out.columns.name = None
    return out


def method_stats(df: pd.DataFrame, metric: str, wise_alpha: float | None = 0.5) -> pd.DataFrame:
    """Long table, one row per method row × column: backbone, row_id, label, group_label, kind, method, base,
    alpha, column, mean, std (sample std over seeds, NaN for one seed), n_seeds; in table order."""
    all_models = method_rows(df)
    values = _seed_values(df, metric, wise_alpha, all_models)
    cols = ["backbone", "row_id", "label", "group_label", "kind", "method", "base", "alpha", "column", "mean",
            "std", "n_seeds"]
    if values.empty:
        return pd.DataFrame(columns=cols)
    models = all_models.set_index("model_id").loc[values.index]
    long = values.rename_axis(index="model_id", columns="column").stack(future_stack=True).rename("value")
    long = long.reset_index().join(models, on="model_id")
    stats = long.groupby(["row_id", "column"], sort=False)["value"].agg(["mean", "std", "count"])
    stats = stats.rename(columns={"count": "n_seeds"}).reset_index()
    meta = models.drop_duplicates("row_id").drop(columns=["seed"])
    out = stats.merge(meta, on="row_id", how="left")
    col_rank = {c: i for i, c in enumerate(values.columns)}
    backbone_rank = {b: i for i, b in enumerate(dict.fromkeys(all_models["backbone"]))}
    out["_b"] = out["backbone"].map(backbone_rank)
    out["_c"] = out["column"].map(col_rank)
    out = out.sort_values(["_b", "order", "_c"], kind="stable").reset_index(drop=True)
    return out[cols]


def method_summary(df: pd.DataFrame, metric: str, wise_alpha: float | None = 0.5,
                   backbone: str | None = None) -> pd.DataFrame:
    """Method row × (column, stat): columns = reference set(s), shift sets in first-appearance order, then
    "shift mean" (per-seed mean over shift sets, then mean/std over seeds); stats = mean, std, n.

    Accuracy and ECE in %. With several backbones and `backbone=None` each label is prefixed with its
    backbone.
    """
    stats = method_stats(df, metric, wise_alpha)
    if backbone is not None:
        stats = stats[stats["backbone"] == backbone]
    if stats.empty:
        return pd.DataFrame()
    multi = stats["backbone"].nunique() > 1
    stats = stats.assign(row=stats["backbone"] + ": " + stats["label"] if multi else stats["label"])
    rows = list(dict.fromkeys(stats["row"]))
    columns = list(dict.fromkeys(stats["column"]))
    wide = stats.pivot(index="row", columns="column", values=["mean", "std", "n_seeds"])
    wide = wide.rename(columns={"n_seeds": "n"}, level=0).swaplevel(0, 1, axis=1)
    wide = wide.reindex(index=rows, columns=pd.MultiIndex.from_product([columns, ["mean", "std", "n"]]))
    wide.index.name = "method"
    return wide


# ----------------------------------------------------------------------------------------------- formatting
def _fmt(mean: float, std: float, n: int, decimals: int, bold: bool, latex: bool) -> str:
    if n == 0 or pd.isna(mean):
        return "–" if not latex else "--"
    m = f"{mean:.{decimals}f}"
    m = (f"\\textbf{{{m}}}" if latex else f"**{m}**") if bold else m
    if n < 2 or pd.isna(std):
        return m
    return f"{m} $\\pm$ {std:.{decimals}f}" if latex else f"{m} ± {std:.{decimals}f}"


def _best(block: pd.DataFrame, kinds: pd.Series, metric: str, decimals: int) -> dict[str, set[str]]:
    """Per column the rows (among the non-zero-shot ones) whose displayed mean is the best."""
    best: dict[str, set[str]] = {}
    for col in block.columns.get_level_values(0).unique():
        means = block[(col, "mean")][kinds != "zeroshot"].astype(float).round(decimals).dropna()
        if means.empty:
            continue
        target = means.max() if _HIGHER_IS_BETTER.get(metric, True) else means.min()
        best[col] = set(means.index[means == target])
    return best


def _blocks(df: pd.DataFrame, wise_alpha: float) -> list[tuple[str, str, str, int, pd.DataFrame, pd.Series]]:
    """(backbone, metric, title, decimals, summary block, kind per row) for every backbone × table metric."""
    models = method_rows(df)
    out = []
    for backbone in dict.fromkeys(models["backbone"]):
        for metric, title, decimals in TABLE_METRICS:
            block = method_summary(df, metric, wise_alpha, backbone=backbone)
            if block.empty or block.xs("mean", axis=1, level=1).isna().all().all():
                continue
            stats = method_stats(df, metric, wise_alpha)
            kinds = stats[stats["backbone"] == backbone].drop_duplicates("label").set_index("label")["kind"]
            out.append((str(backbone), metric, title, decimals, block, kinds.reindex(block.index)))
    return out


def _rows(block: pd.DataFrame, kinds: pd.Series, metric: str, decimals: int, latex: bool) -> list[list[str]]:
    best = _best(block, kinds, metric, decimals)
    cols = list(block.columns.get_level_values(0).unique())
    rows = []
    for label in block.index:
        n = int(np.nanmax(block.loc[label].xs("n", level=1).astype(float).fillna(0).to_numpy()))
        cells = [_fmt(block.at[label, (c, "mean")], block.at[label, (c, "std")],
                      int(0 if pd.isna(block.at[label, (c, "n")]) else block.at[label, (c, "n")]), decimals,
                      label in best.get(c, set()), latex) for c in cols]
        rows.append([label, str(n), *cells])
    return rows


def _set_note(df: pd.DataFrame) -> list[str]:
    ref, shifts = eval_sets(df[df["model_id"].isin(method_rows(df)["model_id"])])
    kinds = _measurements(df, "accuracy").groupby("eval_dataset", sort=False)["shift_type"].first()
    cells = _measurements(df, "accuracy")
    corrupted = list(dict.fromkeys(cells.loc[cells["corruption"].notna(), "eval_dataset"]))
    note = [f"Reference: {', '.join(ref) or 'none'}. Shift sets: "
            + (", ".join(f"{s} ({kinds[s]})" for s in shifts) or "none") + "."]
    if corrupted:
        note.append(f"Corrupted sets ({', '.join(corrupted)}) count by their mean over corruption × severity cells.")
    return note


def finetune_markdown(df: pd.DataFrame, wise_alpha: float = 0.5) -> str:
    """Markdown analogue of Lipsum-FT Tables 1–2: accuracy (%), ECE (%) and NLL per eval set, each cell
    mean ± std over seeds (std omitted for one seed), the best non-zero-shot value per column in bold."""
    parts = ["# Robust fine-tuning", ""]
    parts += _set_note(df)
    parts += ["", f"Cells: mean ± sample standard deviation over seeds (column `seeds`); \"{SHIFT_MEAN}\" averages "
              "each seed's values over the shift sets first. Bold: best value per column among fine-tuned and "
              f"post-hoc rows (highest accuracy, lowest ECE/NLL). WiSE-FT rows use α={wise_alpha:g}; the whole "
              "α sweep is in plots/wise_curves.png.", ""]
    for backbone, metric, title, decimals, block, kinds in _blocks(df, wise_alpha):
        cols = list(block.columns.get_level_values(0).unique())
        rows = _rows(block, kinds, metric, decimals, latex=False)
        header = ["Method", "seeds", *cols]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * len(cols)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts += [f"## {title} — {backbone}", "", *lines, ""]
    return "\n".join(parts)


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "α": r"$\alpha$", "×": r"$\times$", "±": r"$\pm$", "–": "--"}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (and the few non-ASCII symbols used in labels)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def finetune_latex(df: pd.DataFrame, wise_alpha: float = 0.5) -> str:
    """One booktabs tabular per backbone × metric (needs \\usepackage{booktabs}); best value per column
    among the non-zero-shot rows in bold."""
    out = [f"% Robust fine-tuning: mean $\\pm$ sample std over seeds; WiSE-FT at alpha={wise_alpha:g}.",
           "% Requires \\usepackage{booktabs}.", ""]
    for backbone, metric, title, decimals, block, kinds in _blocks(df, wise_alpha):
        cols = list(block.columns.get_level_values(0).unique())
        rows = _rows(block, kinds, metric, decimals, latex=True)
        out += [f"% {latex_escape(title)} -- {latex_escape(backbone)}",
                "\\begin{tabular}{l" + "r" * (len(cols) + 1) + "}", "\\toprule",
                " & ".join(["Method", "Seeds", *(latex_escape(c) for c in cols)]) + " \\\\", "\\midrule"]
        previous = None
        for row, kind in zip(rows, kinds.tolist()):
            if previous is not None and kind != previous:
                out.append("\\midrule")
            previous = kind
            out.append(" & ".join([latex_escape(row[0]), *row[1:]]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def write_finetune_report(df: pd.DataFrame, out_dir: str | Path, wise_alpha: float = 0.5,
                          claims: Sequence[object] | None = None, tolerance: float = 2.0) -> dict[str, Path]:
    """Write tables/finetune.{md,tex}, plots/wise_curves.png, plots/energy_gap.png and claims.md under
    `out_dir` (atomically); {} and nothing written when the frame has no fine-tuned or post-hoc model."""
    from robustify.report.claims import all_claims, claims_markdown
    from robustify.report.plots import write_energy_gap_plot, write_wise_curves

    if not has_finetune_rows(df):
        return {}
    out = Path(out_dir)
    paths = {"finetune_md": out / "tables" / "finetune.md", "finetune_tex": out / "tables" / "finetune.tex",
             "wise_curves": out / "plots" / "wise_curves.png", "energy_gap": out / "plots" / "energy_gap.png",
             "claims": out / "claims.md"}
    write_text(paths["finetune_md"], finetune_markdown(df, wise_alpha))
    write_text(paths["finetune_tex"], finetune_latex(df, wise_alpha))
    write_wise_curves(df, paths["wise_curves"])
    write_energy_gap_plot(df, paths["energy_gap"])
    chosen = list(claims) if claims is not None else all_claims(wise_alpha=wise_alpha, tolerance=tolerance)
    write_text(paths["claims"], claims_markdown(df, chosen))  # type: ignore[arg-type]
    return paths
