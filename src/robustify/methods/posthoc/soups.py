"""Model soups and the greedy ensemble (SPEC §2, ref mlfoundations/model-soups `main.py`).

Greedy rule (as `main.py`): rank the fine-tuned runs by their own held-out accuracy (descending),
start the soup with the best, then visit the others in that order and keep a candidate iff the uniform
average of (current ingredients + candidate) has *strictly* higher held-out accuracy than the current
soup — a tie adds nothing but averaging noise, so it is rejected. The held-out data must not be the
test split. `main.py` keeps a running average; we re-average the chosen ingredients from scratch,
which is the same number up to rounding. Ties in the ranking keep the input order (stable sort).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from robustify.methods.posthoc.wise import State, weighted_average


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (fraction) of N×C logits against N int labels."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows but {labels.shape[0]} labels")
    return (logits.argmax(dim=-1) == labels.to(logits.device)).float().mean().item()


def uniform_soup(states: Sequence[State]) -> dict[str, torch.Tensor]:
    """Entry-wise mean of the state dicts (integer buffers rounded, see `wise.py`)."""
    return weighted_average(states, [1.0 / len(states)] * len(states))


def _rank(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def greedy_soup(
    states: Sequence[State], heldout_accuracy_fn: Callable[[State], float]
) -> tuple[dict[str, torch.Tensor], list[int], list[dict[str, Any]]]:
    """Greedy soup. Returns (soup state, chosen indices into `states` in the order they were added,
    trace). The trace has one entry per evaluation: `{"step": "individual"|"candidate", "index",
    "accuracy", "added"}` — individual accuracies first, then each candidate soup's accuracy."""
    if not states:
        raise ValueError("greedy soup needs at least one state dict")
    trace: list[dict[str, Any]] = []
    individual = []
    for i, state in enumerate(states):
        acc = float(heldout_accuracy_fn(state))
        individual.append(acc)
        trace.append({"step": "individual", "index": i, "accuracy": acc, "added": False})
    order = _rank(individual)
    chosen, best = [order[0]], individual[order[0]]
    trace[order[0]]["added"] = True
    soup = weighted_average([states[order[0]]], [1.0])
    for i in order[1:]:
        members = [states[j] for j in chosen + [i]]
        candidate = weighted_average(members, [1.0 / len(members)] * len(members))
        acc = float(heldout_accuracy_fn(candidate))
        added = acc > best
        trace.append({"step": "candidate", "index": i, "accuracy": acc, "added": added})
        if added:
            chosen.append(i)
            best, soup = acc, candidate
    return soup, chosen, trace


def greedy_ensemble(logits_list: Sequence[torch.Tensor], labels: torch.Tensor) -> list[int]:
    """Greedy ensemble: the greedy-soup rule on averaged held-out logits. Returns the chosen indices
    into `logits_list` in the order they were added."""
    if not logits_list:
        raise ValueError("greedy ensemble needs at least one model's logits")
    individual = [accuracy(z, labels) for z in logits_list]
    order = _rank(individual)
    chosen, best = [order[0]], individual[order[0]]
    total = logits_list[order[0]].double()
    for i in order[1:]:
        candidate = total + logits_list[i].double()
        acc = accuracy(candidate / (len(chosen) + 1), labels)
        if acc > best:
            chosen.append(i)
            best, total = acc, candidate
    return chosen
