"""Post-hoc methods applied to classifiers: what the `posthoc` stage runs (DESIGN §3).

Each function maps fine-tuned `ImageClassifier`s (+ the zero-shot start θ0 and validation data) to a
new classifier. Validation data only — the radii of TPGM, the greedy soup's and the greedy ensemble's
choices are never fitted on a test split (SPEC §2; the TPGM reference used its test split, we do not).
WiSE-FT needs no data: `wise_classifier` is the interpolation, used by the evaluation's α sweep.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from robustify.methods.finetune import ImageData, val_accuracy
from robustify.methods.posthoc.soups import accuracy, greedy_ensemble, greedy_soup, uniform_soup
from robustify.methods.posthoc.tpgm import tpgm
from robustify.methods.posthoc.wise import interpolate
from robustify.models.zeroshot import EnsembleClassifier, ImageClassifier

SOUP_KINDS = ("uniform-soup", "greedy-soup", "greedy-ensemble")


def _with_state(template: ImageClassifier, state: dict[str, torch.Tensor]) -> ImageClassifier:
    out = copy.deepcopy(template)
    out.load_state_dict(state, strict=True)
    return out.eval()


def wise_classifier(zeroshot: ImageClassifier, finetuned: ImageClassifier, alpha: float) -> ImageClassifier:
    """θ_α = (1-α)·θ0 + α·θ1 over every parameter and buffer, head included (SPEC §2)."""
    return _with_state(finetuned, interpolate(zeroshot.state_dict(), finetuned.state_dict(), alpha))


def _val_batches(val: ImageData, batch_size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(val.batches(batch_size, device))


def tpgm_classifier(
    zeroshot: ImageClassifier, finetuned: ImageClassifier, val: ImageData, *, norm: str = "l2", reg: float = 0.0,
    steps: int = 200, lr: float = 1e-2, batch_size: int = 256, seed: int = 0, device: str = "cpu",
) -> tuple[ImageClassifier, dict[str, Any]]:
    """TPGM (reg = 0) or TPGM-C (reg > 0): radii learned on `val`; returns the projected classifier and
    the fit's record (radii, ratios, losses, validation accuracy before/after)."""
    finetuned.to(device)
    template = copy.deepcopy(finetuned)
    batches = _val_batches(val, batch_size, device)
    state, info = tpgm(template, zeroshot.state_dict(), finetuned.state_dict(), batches, norm=norm, reg=reg,
                       steps=steps, lr=lr, seed=seed)
    projected = _with_state(finetuned, state)
    info["val_accuracy"] = {"finetuned": val_accuracy(finetuned, val, batch_size, device),
                            "projected": val_accuracy(projected, val, batch_size, device)}
    finetuned.cpu()
    return projected.cpu(), info


@torch.no_grad()
def _val_logits(model: torch.nn.Module, val: ImageData, batch_size: int, device: str) -> torch.Tensor:
    model.to(device).eval()
    return torch.cat([model(x).float().cpu() for x, _ in val.batches(batch_size, device)])


def soups(
    members: Sequence[ImageClassifier], val: ImageData, kinds: Sequence[str] = SOUP_KINDS, batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    """{kind: (classifier, record)} for the requested soups of `members` (runs of one recipe, e.g. seeds).

    Greedy choices use validation accuracy (model-soups `main.py`, held-out split); the record lists the
    chosen member indices and, for the greedy soup, its trace. A greedy ensemble is an
    `EnsembleClassifier` of the chosen members (mean logits), not one set of weights.
    """
    unknown = sorted(set(kinds) - set(SOUP_KINDS))
    if unknown:
        raise ValueError(f"unknown soup kind(s) {unknown} (known: {list(SOUP_KINDS)})")
    if len(members) < 2:
        raise ValueError(f"a soup needs at least 2 fine-tuned models, got {len(members)}")
    for m in members:
        m.to(device)
    states = [m.state_dict() for m in members]
    logits = [_val_logits(m, val, batch_size, device) for m in members]  # once: records and greedy ensemble
    individual = [accuracy(z, val.labels) for z in logits]
    out: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
    if "uniform-soup" in kinds:
        soup = _with_state(members[0], uniform_soup(states))
        out["uniform-soup"] = (soup, {"members": list(range(len(members))), "val_accuracy": individual,
                                      "soup_val_accuracy": val_accuracy(soup, val, batch_size, device)})
    if "greedy-soup" in kinds:
        def held_out(state: dict[str, torch.Tensor]) -> float:
            return val_accuracy(_with_state(members[0], state), val, batch_size, device)

        state, chosen, trace = greedy_soup(states, held_out)
        out["greedy-soup"] = (_with_state(members[0], state), {"members": chosen, "trace": trace,
                                                                "val_accuracy": individual})
    if "greedy-ensemble" in kinds:
        chosen = greedy_ensemble(logits, val.labels)
        ensemble = EnsembleClassifier([members[i] for i in chosen]).eval()
        mean = torch.stack([logits[i] for i in chosen]).mean(0)
        out["greedy-ensemble"] = (ensemble, {"members": chosen, "val_accuracy": individual,
                                             "ensemble_val_accuracy": accuracy(mean, val.labels)})
    for m in members:
        m.cpu()
    for model, _ in out.values():
        model.cpu()
    return out
