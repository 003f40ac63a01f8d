"""Report plots (matplotlib Agg, no pyplot state): the WiSE-FT α curves and the energy-gap scatter.

Output is deterministic: fixed size and dpi, default style, and no "Software" entry in the PNG metadata,
so the same all_metrics frame gives the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robustify.io import write_bytes
from robustify.report.finetune import SHIFT_MEAN, _measurements, eval_sets, method_rows, method_stats, seed_values

DPI = 120
_PANEL = (5.0, 4.2)  # inches per subplot
_POSTHOC_MARKERS = {"finetune": "o", "tpgm": "D", "tpgm-c": "P", "uniform-soup": "s", "greedy-soup": "X",
                    "greedy-ensemble": "h"}
_ENDS = ((0.0, "s"), (1.0, "^"))
_RELATIVE_LABEL = "relative accuracy = shift acc. / reference acc."


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure, with no software/time metadata."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """Matplotlib's default style (not the user's matplotlibrc) plus a few settings, restored afterwards."""
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
        yield


def _colors(keys: Iterable[str]) -> dict[str, tuple[float, ...]]:
    keys = list(dict.fromkeys(keys))
    cmap = matplotlib.colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(keys)}


def _grid(n: int, legend_width: float = 2.6) -> tuple[Figure, list]:
    ncols = min(max(n, 1), 3)
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(_PANEL[0] * ncols + legend_width, _PANEL[1] * nrows), dpi=DPI)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:max(n, 1)]


def _empty(message: str) -> Figure:
    fig = Figure(figsize=_PANEL, dpi=DPI)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return fig


def _legend(fig: Figure, axes: list) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center right", fontsize=8, frameon=False)


# ------------------------------------------------------------------------------------------ WiSE-FT curves
def wise_curves_figure(df: pd.DataFrame) -> Figure:
    """x = reference accuracy, y = shift-mean accuracy (%), means over seeds. One line per base method over
    the WiSE α sweep (square at α=0, the zero-shot end; triangle at α=1, the fine-tuned end), the zero-shot
    model as a star, fine-tuned and other post-hoc models as markers coloured by their (base) method.
    One panel per backbone."""
    stats = method_stats(df, "accuracy", wise_alpha=None)
    if stats.empty or SHIFT_MEAN not in set(stats["column"]):
        return _empty("no fine-tuned models with reference and shift accuracy")
    backbones = list(dict.fromkeys(stats["backbone"]))
    fig, axes = _grid(len(backbones))
    for ax, backbone in zip(axes, backbones):
        part = stats[stats["backbone"] == backbone]
        ref, shifts = eval_sets(df[df["model_id"].isin(method_rows(df).query("backbone == @backbone")["model_id"])])
        if not ref:
            ax.text(0.5, 0.5, "no reference set", ha="center", transform=ax.transAxes)
            continue
        wide = part.pivot_table(index="row_id", columns="column", values="mean", sort=False)
        meta = part.drop_duplicates("row_id").set_index("row_id")
        wide = wide.reindex(columns=[ref[0], SHIFT_MEAN]).join(meta[["kind", "method", "base", "alpha", "label",
                                                                    "group_label"]])
        wide = wide.dropna(subset=[ref[0], SHIFT_MEAN])
        color_key = wide["base"].where(wide["kind"] == "posthoc", wide["method"])
        colors = _colors(color_key[wide["kind"] != "zeroshot"])
        swept = False
        for base, curve in wide[wide["method"] == "wise"].groupby("base", sort=False):
            curve = curve.sort_values("alpha")
            c = colors[base]
            ax.plot(curve[ref[0]], curve[SHIFT_MEAN], "-", color=c, lw=1.5, marker=".", ms=5,
                    label=curve["group_label"].iloc[0] + " (α sweep)")
            for alpha, marker in _ENDS:
                end = curve[np.isclose(curve["alpha"].astype(float), alpha)]
                if not end.empty:
                    swept = True
                    ax.plot(end[ref[0]], end[SHIFT_MEAN], marker, color=c, ms=8, mec="black", mew=0.6)
        for row_id, r in wide[wide["method"] != "wise"].iterrows():
            if r["kind"] == "zeroshot":
                ax.plot([r[ref[0]]], [r[SHIFT_MEAN]], "*", color="black", ms=14, label="Zero-shot")
                continue
            marker = _POSTHOC_MARKERS["finetune"] if r["kind"] == "finetune" else _POSTHOC_MARKERS.get(r["method"], "v")
            ax.plot([r[ref[0]]], [r[SHIFT_MEAN]], marker, color=colors[color_key[row_id]], ms=8, mec="black",
                    mew=0.6, ls="none", label=r["label"])
        if swept:  # neutral legend entries for the sweep ends
            for alpha, marker in _ENDS:
                ax.plot([], [], marker, color="0.7", ms=8, mec="black", mew=0.6,
                        label=f"WiSE-FT α={alpha:g} ({'zero-shot' if alpha == 0 else 'fine-tuned'} end)")
        ax.set_xlabel(f"reference accuracy (%) — {ref[0]}")
        ax.set_ylabel(f"shift-mean accuracy (%) over {len(shifts)} shift set{'s' if len(shifts) != 1 else ''}")
        ax.set_title(f"WiSE-FT α sweep — {backbone}")
    _legend(fig, axes)
    fig.subplots_adjust(left=0.08, right=1 - 2.6 / fig.get_figwidth(), wspace=0.3, hspace=0.35)
    return fig


def write_wise_curves(df: pd.DataFrame, path: str | Path) -> Path:
    with _style():
        data = figure_png(wise_curves_figure(df))
    write_bytes(path, data)
    return Path(path)


# ------------------------------------------------------------------------------------------- energy gap
def energy_gap_points(df: pd.DataFrame, include_posthoc: bool = False) -> pd.DataFrame:
    """One row per (model, shift set): backbone, model_id, group_label (method row without α), eval_dataset,
    energy_gap, accuracy, reference_accuracy, relative_accuracy = shift accuracy / reference accuracy of the
    same model (Lipsum-FT §4.2: "the distribution shift accuracy divided by the reference accuracy").
    Fine-tuned models (every seed) and the zero-shot model, whose gap is 0 by definition (θ = θ0) when not
    measured; post-hoc models (every WiSE α, TPGM, soups) too with `include_posthoc`."""
    models = method_rows(df)
    if not include_posthoc:
        models = models[models["kind"] != "posthoc"]
    acc = seed_values(df, "accuracy", wise_alpha=None)
    gaps = _measurements(df[df["model_id"].isin(models["model_id"])], "energy_gap")
    gap = gaps.groupby(["model_id", "eval_dataset"], sort=False)["value"].mean()
    cols = ["backbone", "model_id", "group_label", "eval_dataset", "energy_gap", "accuracy", "reference_accuracy",
            "relative_accuracy"]
    recs = []
    for backbone, mods in models.groupby("backbone", sort=False):
        ref, shifts = eval_sets(df[df["model_id"].isin(mods["model_id"])])
        if not ref or acc.empty:
            continue
        for m in mods.itertuples(index=False):
            for s in shifts:
                g = gap.get((m.model_id, s), 0.0 if m.kind == "zeroshot" else np.nan)
                a, r = acc.at[m.model_id, s], acc.at[m.model_id, ref[0]]
                if pd.isna(g) or pd.isna(a) or pd.isna(r) or r == 0:
                    continue
                recs.append({"backbone": backbone, "model_id": m.model_id, "group_label": m.group_label,
                             "eval_dataset": s, "energy_gap": float(g), "accuracy": a / 100,
                             "reference_accuracy": r / 100, "relative_accuracy": float(a / r)})
    return pd.DataFrame(recs, columns=cols)


def energy_gap_figure(df: pd.DataFrame, include_posthoc: bool = False) -> Figure:
    """Lipsum-FT Fig. 4 analogue: per (backbone, shift set) panel, x = energy gap, y = relative accuracy
    (shift accuracy / reference accuracy of the same model), one point per model (every seed), coloured by
    method, with the Pearson correlation over the panel's points in the title."""
    pts = energy_gap_points(df, include_posthoc)
    if pts.empty or (pts["energy_gap"] == 0).all():
        return _empty("no energy_gap rows for fine-tuned models")
    panels = list(dict.fromkeys(zip(pts["backbone"], pts["eval_dataset"])))
    multi = pts["backbone"].nunique() > 1
    colors = _colors(label for label in pts["group_label"] if label != "Zero-shot")
    fig, axes = _grid(len(panels))
    for ax, (backbone, s) in zip(axes, panels):
        part = pts[(pts["backbone"] == backbone) & (pts["eval_dataset"] == s)]
        for label, grp in part.groupby("group_label", sort=False):
            zero_shot = label == "Zero-shot"
            ax.scatter(grp["energy_gap"], grp["relative_accuracy"], s=120 if zero_shot else 36,
                       color="black" if zero_shot else colors[label], edgecolors="black", linewidths=0.5,
                       label=label, marker="*" if zero_shot else "o", zorder=3)
        x, y = part["energy_gap"].to_numpy(float), part["relative_accuracy"].to_numpy(float)
        pcc = float(np.corrcoef(x, y)[0, 1]) if len(x) >= 3 and x.std() > 0 and y.std() > 0 else float("nan")
        title = f"{backbone}: {s}" if multi else str(s)
        ax.set_title(title + (f" — PCC = {pcc:.2f}" if not np.isnan(pcc) else ""))
        ax.set_xlabel("energy gap")
        ax.set_ylabel(_RELATIVE_LABEL)
    _legend(fig, axes)
    fig.subplots_adjust(left=0.08, right=1 - 2.6 / fig.get_figwidth(), wspace=0.35, hspace=0.4)
    return fig


def write_energy_gap_plot(df: pd.DataFrame, path: str | Path, include_posthoc: bool = False) -> Path:
    with _style():
        data = figure_png(energy_gap_figure(df, include_posthoc))
    write_bytes(path, data)
    return Path(path)
