"""Paper claims checked against our numbers (results/claims.md).

A claim is an id, a statement and a check `df -> (passed, evidence)`: passed is True/False, or None when
the rows it needs are missing (rendered NOT RUN with the reason). Claims come from per-paper factories
registered with `@register_claims(paper, title)`; a factory takes keyword options (e.g. `wise_alpha`) and
ignores the ones it does not use, so `all_claims(**options)` can build every paper's claims at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robustify.report.finetune import SHIFT_MEAN, eval_sets, method_label, method_rows, method_stats

Verdict = tuple[bool | None, str]


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    check: Callable[[pd.DataFrame], Verdict]
    paper: str = ""


ClaimFactory = Callable[..., list[Claim]]
_FACTORIES: dict[str, tuple[str, ClaimFactory]] = {}


def register_claims(paper: str, title: str) -> Callable[[ClaimFactory], ClaimFactory]:
    """Decorator registering a factory `(**options) -> list[Claim]` for one paper."""
    def wrap(factory: ClaimFactory) -> ClaimFactory:
        _FACTORIES[paper] = (title, factory)
        return factory
    return wrap


def paper_title(paper: str) -> str:
    return _FACTORIES[paper][0] if paper in _FACTORIES else paper


def all_claims(**options: Any) -> list[Claim]:
    """Every registered paper's claims, built with the given options."""
    return [c for _, factory in _FACTORIES.values() for c in factory(**options)]


# ----------------------------------------------------------------------------------- helpers for the checks
@dataclass(frozen=True)
class _Row:
    label: str
    reference: float  # mean over seeds, %
    shift: float  # mean over seeds of the per-seed shift mean, %
    n_seeds: int


# While check_claims runs, derived tables are memoised per frame (claims share them); never across calls.
_MEMO: dict[tuple, Any] | None = None


def _memo(key: tuple, compute: Callable[[], Any]) -> Any:
    if _MEMO is None:
        return compute()
    if key not in _MEMO:
        _MEMO[key] = compute()
    return _MEMO[key]


def fine_tuned_backbones(df: pd.DataFrame) -> list[str]:
    return _memo(("backbones", id(df)), lambda: list(dict.fromkeys(method_rows(df)["backbone"])))


def _rows(df: pd.DataFrame, backbone: str, wise_alpha: float) -> tuple[pd.DataFrame, str | None]:
    """Accuracy stats of one backbone and its (first) reference set."""
    def compute() -> tuple[pd.DataFrame, dict[str, str | None]]:
        models = method_rows(df)
        refs = {}
        for b, mods in models.groupby("backbone", sort=False):
            ref, _ = eval_sets(df[df["model_id"].isin(mods["model_id"])])
            refs[str(b)] = ref[0] if ref else None
        return method_stats(df, "accuracy", wise_alpha), refs

    stats, refs = _memo(("accuracy", id(df), wise_alpha), compute)
    return stats[stats["backbone"] == backbone], refs.get(backbone)


def _find(stats: pd.DataFrame, ref: str | None, method: str, base: str | None = None) -> list[_Row]:
    sel = stats[(stats["method"] == method) & (stats["base"].isna() if base is None else stats["base"] == base)]
    out = []
    for _, part in sel.groupby("row_id", sort=False):
        cells = part.set_index("column")
        shift = cells["mean"].get(SHIFT_MEAN, np.nan)
        reference = cells["mean"].get(ref, np.nan) if ref is not None else np.nan
        n = int(cells["n_seeds"].get(SHIFT_MEAN, 0))
        out.append(_Row(str(part["label"].iloc[0]), float(reference), float(shift), n))
    return out


def _one(stats: pd.DataFrame, ref: str | None, method: str, base: str | None = None) -> _Row | None:
    rows = [r for r in _find(stats, ref, method, base) if not np.isnan(r.shift)]
    return rows[0] if rows else None


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


_NO_SHIFT: Verdict = (None, "no shift eval sets with accuracy rows in the results")


def _missing(*names: str) -> Verdict:
    return None, "no shift-mean accuracy for " + " and ".join(names) + " in the results"


def per_backbone(check: Callable[[pd.DataFrame, str], Verdict]) -> Callable[[pd.DataFrame], Verdict]:
    """Run a backbone-level check on every fine-tuned backbone: FAIL if any fails, PASS if the others pass,
    NOT RUN if none could be checked; evidence names each backbone when there are several."""
    def run(df: pd.DataFrame) -> Verdict:
        backbones = fine_tuned_backbones(df)
        if not backbones:
            return None, "no fine-tuned models in the results"
        verdicts = [(b, *check(df, b)) for b in backbones]
        if len(verdicts) == 1:
            return verdicts[0][1], verdicts[0][2]
        ran = [p for _, p, _ in verdicts if p is not None]
        evidence = "; ".join(f"{b} ({_STATUS[p]}): {e}" for b, p, e in verdicts)
        return (all(ran) if ran else None), evidence
    return run


# ------------------------------------------------------------------------------------- Lipsum-FT (ICLR 2024)
@register_claims("lipsum-ft", "Lipsum-FT: Robust fine-tuning of zero-shot models using random text guidance "
                              "(Nam et al., ICLR 2024)")
def lipsum_ft_claims(wise_alpha: float = 0.5, tolerance: float = 2.0, **_: Any) -> list[Claim]:
    """The paper's four headline claims; `tolerance` (accuracy points) bounds "similar reference accuracy"."""
    wise_ft = method_label("wise", "ft", wise_alpha)

    def ft_lowers_shift(df: pd.DataFrame, backbone: str) -> Verdict:
        stats, ref = _rows(df, backbone, wise_alpha)
        if SHIFT_MEAN not in set(stats["column"]):
            return _NO_SHIFT
        zs, ft = _one(stats, ref, "zeroshot"), _one(stats, ref, "ft")
        if zs is None or ft is None:
            return _missing(*[n for n, r in (("zero-shot", zs), ("FT", ft)) if r is None])
        return ft.shift < zs.shift, (f"FT shift mean {ft.shift:.2f}% ({_seeds(ft.n_seeds)}) vs zero-shot "
                                     f"{zs.shift:.2f}%")

    def wise_recovers(df: pd.DataFrame, backbone: str) -> Verdict:
        stats, ref = _rows(df, backbone, wise_alpha)
        if SHIFT_MEAN not in set(stats["column"]):
            return _NO_SHIFT
        ft, wise = _one(stats, ref, "ft"), _one(stats, ref, "wise", "ft")
        if ft is None or wise is None:
            return _missing(*[n for n, r in (("FT", ft), (wise_ft, wise)) if r is None])
        return wise.shift > ft.shift, (f"{wise_ft} shift mean {wise.shift:.2f}% ({_seeds(wise.n_seeds)}) vs FT "
                                       f"{ft.shift:.2f}% ({_seeds(ft.n_seeds)})")

    def lipsum_vs_ft(df: pd.DataFrame, backbone: str) -> Verdict:
        stats, ref = _rows(df, backbone, wise_alpha)
        if SHIFT_MEAN not in set(stats["column"]):
            return _NO_SHIFT
        ft, lip = _one(stats, ref, "ft"), _one(stats, ref, "lipsum-ft")
        if ft is None or lip is None:
            return _missing(*[n for n, r in (("FT", ft), ("Lipsum-FT", lip)) if r is None])
        if np.isnan(ft.reference) or np.isnan(lip.reference):
            return None, f"no reference accuracy ({ref or 'no reference set'}) for FT or Lipsum-FT"
        gap = abs(lip.reference - ft.reference)
        passed = lip.shift >= ft.shift and gap <= tolerance
        return passed, (f"Lipsum-FT shift mean {lip.shift:.2f}% vs FT {ft.shift:.2f}%; reference ({ref}) "
                        f"{lip.reference:.2f}% vs {ft.reference:.2f}%, |Δ| = {gap:.2f} points "
                        f"({'within' if gap <= tolerance else 'beyond'} the {tolerance:g}-point tolerance); "
                        f"{_seeds(lip.n_seeds)} / {_seeds(ft.n_seeds)}")

    def posthoc_helps(df: pd.DataFrame, backbone: str) -> Verdict:
        stats, ref = _rows(df, backbone, wise_alpha)
        if SHIFT_MEAN not in set(stats["column"]):
            return _NO_SHIFT
        lip = _one(stats, ref, "lipsum-ft")
        post = stats[(stats["kind"] == "posthoc") & (stats["base"] == "lipsum-ft")]
        candidates = [r for m in dict.fromkeys(post["method"]) for r in _find(stats, ref, m, "lipsum-ft")
                      if not np.isnan(r.shift)]
        if lip is None or not candidates:
            return _missing(*[n for n, ok in (("Lipsum-FT", lip is not None),
                                              ("any post-hoc method on Lipsum-FT", bool(candidates))) if not ok])
        best = max(candidates, key=lambda r: r.shift)
        others = ", ".join(f"{r.label} {r.shift:.2f}%" for r in candidates if r is not best)
        return best.shift > lip.shift, (f"best: {best.label} shift mean {best.shift:.2f}% vs Lipsum-FT "
                                        f"{lip.shift:.2f}%" + (f" (others: {others})" if others else ""))

    paper = "lipsum-ft"
    return [
        Claim("lipsum-ft/ft-lowers-shift", "Fine-tuning (FT) lowers accuracy under distribution shift below the "
              "zero-shot model's (shift-set mean)", per_backbone(ft_lowers_shift), paper),
        Claim("lipsum-ft/wise-recovers", f"WiSE-FT (α={wise_alpha:g}) on FT recovers shift accuracy (higher "
              "shift-set mean than FT)", per_backbone(wise_recovers), paper),
        Claim("lipsum-ft/lipsum-beats-ft", "Lipsum-FT is at least as accurate as FT on the shift-set mean at "
              f"similar reference accuracy (|Δ reference| ≤ {tolerance:g} points)", per_backbone(lipsum_vs_ft),
              paper),
        Claim("lipsum-ft/posthoc-on-lipsum", f"Post-hoc methods on top of Lipsum-FT (WiSE-FT α={wise_alpha:g}, "
              "TPGM, soups) improve its shift-set mean further (the best of them vs Lipsum-FT)",
              per_backbone(posthoc_helps), paper),
    ]


# ------------------------------------------------------------------------------------------------ rendering
_STATUS = {True: "PASS", False: "FAIL", None: "NOT RUN"}


def check_claims(df: pd.DataFrame, claims: Sequence[Claim] | None = None) -> list[tuple[Claim, bool | None, str]]:
    """(claim, passed, evidence) for each claim (default: every registered claim with default options)."""
    global _MEMO
    _MEMO = {}
    try:
        return [(c, *c.check(df)) for c in (all_claims() if claims is None else claims)]
    finally:
        _MEMO = None


def claims_markdown(df: pd.DataFrame, claims: Sequence[Claim] | None = None) -> str:
    """results/claims.md: one line per claim, `- **PASS**/**FAIL**/**NOT RUN** — statement: evidence`,
    grouped by paper, then a summary count. Numbers are means over seeds; shift = mean over shift sets."""
    results = check_claims(df, claims)
    parts = ["# Paper claims checked against our numbers", "",
             "Accuracies are means over seeds (%); the shift mean averages each seed's accuracy over the shift "
             "eval sets (a corrupted set by its mean over corruption × severity cells). NOT RUN means the rows "
             "a claim needs are missing.", ""]
    for paper in dict.fromkeys(c.paper for c, _, _ in results):
        parts += [f"## {paper_title(paper)}" if paper else "## Other claims", ""]
        parts += [f"- **{_STATUS[p]}** — {c.statement}: {e}" for c, p, e in results if c.paper == paper]
        parts.append("")
    counts = {s: sum(_STATUS[p] == s for _, p, _ in results) for s in ("PASS", "FAIL", "NOT RUN")}
    parts += [f"**Summary:** {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['NOT RUN']} NOT RUN "
              f"(of {len(results)} claims).", ""]
    return "\n".join(parts)

import robustify.report.distill  # noqa: E402,F401  (registers the "Efficiently Robustify" claims)
