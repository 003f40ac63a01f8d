"""Head-selection results of the three-head student (SPEC §3, paper App. A Tables 6–7) as result rows.

Per eval set: the accuracy of each selection rule (`accuracy_select_<rule>`), its F_correct
(`f_correct_<rule>`: share of samples routed to the clean head on the reference set, to the unclean head
on shifted sets), and the accuracy of each head alone (`accuracy_head_<head>`, argmax of its MC-mean
distribution). The plain `accuracy`/`ece`/`nll` of the model are the evaluator's `classification_metrics`
on `select_heads(probs, "ours").probs`, not repeated here, so the report never sees two `accuracy` rows.

MC probabilities are (passes × batch × classes) per head, too large to keep for a whole ImageNet-sized
set, so `HeadSelectionTally` reduces each batch to integer counts; ratios of integer counts also make
the numbers independent of how the set was batched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from robustify.eval.schema import make_rows_many
from robustify.methods.distill.selection import HEADS, RULES, expects_unclean, select_heads


def metric_names(rules: Sequence[str] = RULES) -> list[str]:
    """The metric names `head_selection_rows` writes, in order."""
    return ([f"accuracy_select_{r}" for r in rules] + [f"f_correct_{r}" for r in rules]
            + [f"accuracy_head_{h}" for h in HEADS])


class HeadSelectionTally:
    """Accumulates, batch by batch, correct predictions and unclean-head choices per rule and correct
    predictions per head."""

    def __init__(self, rules: Sequence[str] = RULES) -> None:
        rules = tuple(rules)
        unknown = [r for r in rules if r not in RULES]
        if unknown or not rules or len(set(rules)) != len(rules):
            raise ValueError(f"head selection rules must be distinct names from {list(RULES)}, got {list(rules)}")
        self.rules = rules
        self.n = 0
        self.correct = {r: 0 for r in rules}
        self.unclean = {r: 0 for r in rules}
        self.head_correct = {h: 0 for h in HEADS}

    def update(self, labels: torch.Tensor, probs: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: `labels` (batch,), `probs` per head (passes, batch, classes)."""
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        for h in HEADS:
            if h in probs and probs[h].ndim == 3 and probs[h].shape[1] != labels.shape[0]:
                raise ValueError(f"probs['{h}'] has batch {probs[h].shape[1]}, labels {labels.shape[0]}")
        labels = labels.to(probs["clean"].device) if "clean" in probs else labels
        for r in self.rules:
            sel = select_heads(probs, r)  # validates heads and shapes
            self.correct[r] += int((sel.probs.argmax(dim=1) == labels).sum().item())
            self.unclean[r] += int(sel.choice.sum().item())
        for h in HEADS:
            self.head_correct[h] += int((probs[h].double().mean(dim=0).argmax(dim=1) == labels).sum().item())
        self.n += labels.shape[0]

    def metrics(self, shift_type: str | None) -> dict[str, float]:
        """Metrics named as `metric_names(self.rules)`; `shift_type` decides which head is "right"."""
        if self.n == 0:
            raise ValueError("head selection: no samples were added")
        unclean_expected = expects_unclean(shift_type)
        out = {f"accuracy_select_{r}": self.correct[r] / self.n for r in self.rules}
        for r in self.rules:
            right = self.unclean[r] if unclean_expected else self.n - self.unclean[r]
            out[f"f_correct_{r}"] = right / self.n
        out.update({f"accuracy_head_{h}": self.head_correct[h] / self.n for h in HEADS})
        return out

    def rows(self, context: Mapping[str, Any], shift_type: str | None = None) -> pd.DataFrame:
        """Result rows (DESIGN §5 schema). `shift_type` defaults to `context["shift_type"]`; given in
        both, they must agree."""
        return make_rows_many([(_context(context, shift_type), self.metrics(_shift(context, shift_type)), self.n)])


def head_selection_rows(
    context: Mapping[str, Any],
    labels: torch.Tensor,
    probs: Mapping[str, torch.Tensor],
    shift_type: str | None = None,
    rules: Sequence[str] = RULES,
) -> pd.DataFrame:
    """Rows for one eval set held in memory at once (small sets, tests); `HeadSelectionTally` for
    batch-by-batch evaluation gives the same rows."""
    tally = HeadSelectionTally(rules)
    tally.update(labels, probs)
    return tally.rows(context, shift_type)


def _shift(context: Mapping[str, Any], shift_type: str | None) -> str | None:
    given = context.get("shift_type")
    if shift_type is not None and given is not None and given != shift_type:
        raise ValueError(f"head selection: shift_type '{shift_type}' disagrees with context['shift_type'] '{given}'")
    return shift_type if shift_type is not None else given


def _context(context: Mapping[str, Any], shift_type: str | None) -> dict[str, Any]:
    return {**context, "shift_type": _shift(context, shift_type)}
