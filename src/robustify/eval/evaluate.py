"""Evaluate classifiers on an eval set → result rows (DESIGN §5 schema).

Images go through the model's own eval transform (fused into uint8 workers + per-batch normalisation
by `eval.loader`); logits are collected for the whole set and mapped by the dataset's `project_logits`
before any metric, so metrics are dataset-level.

`evaluate_models` scores several classifiers of one architecture in ONE pass over the set (a WiSE-FT
α sweep, a fine-tuned model and its zero-shot start): every image is decoded once, and an entry that
is the same module as another (WiSE α=0 is the zero-shot model, α=1 the fine-tuned one) is run once.
Given the zero-shot model and the random texts' second moment, it also reports each model's energy
gap (SPEC §2) on the set from the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from robustify.config import EvalSetSpec, EvaluateConfig
from robustify.data.registry import Dataset
from robustify.eval.energy import gap_sum
from robustify.eval.loader import make_eval_loader
from robustify.eval.metrics import classification_metrics
from robustify.eval.schema import make_rows_many
from robustify.models.clip import preprocess
from robustify.models.zeroshot import ImageClassifier


@torch.no_grad()
def predict(
    classifier: ImageClassifier, frame: pd.DataFrame, transform: Any, batch_size: int, workers: int | None,
    device: str, load_image: Any = None, fuse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every row of `frame`, in order (`workers=None`: the loader's default)."""
    options = {} if load_image is None else {"load_image": load_image}
    loader = make_eval_loader(frame, transform, batch_size, workers, device, fuse=fuse, **options)
    classifier.to(device).eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(classifier(x).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


@dataclass
class Entry:
    """One model to score: the module (an `ImageClassifier`, or any logits module such as an ensemble)
    and its result columns (model_id, method, method_params, seed, ...)."""

    classifier: nn.Module
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class EnergyGap:
    """What the energy gap needs: θ0's image tower, s = exp(logit_scale) and Σ = E_t t tᵀ of the
    random texts (`eval.energy.text_moment`)."""

    reference: nn.Module
    scale: float
    moment: torch.Tensor


def _features_and_logits(module: nn.Module, x: torch.Tensor, known: dict[int, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, image features or None); `known` holds this batch's features by tower, so a tower
    shared by several entries (θ0 of the zero-shot model and of the energy gap) runs once."""
    if isinstance(module, ImageClassifier):
        features = known.get(id(module.encoder))
        if features is None:
            features = known[id(module.encoder)] = module.encoder(x).float()
        return module.head(features).float(), features
    return module(x).float(), None


@torch.no_grad()
def predict_many(
    modules: Sequence[nn.Module], frame: pd.DataFrame, transform: Any, batch_size: int, workers: int | None,
    device: str, load_image: Any = None, gap: EnergyGap | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[float | None]]:
    """(logits per module, labels, energy gap per module or None) over `frame` in one pass."""
    options = {} if load_image is None else {"load_image": load_image}
    loader = make_eval_loader(frame, transform, batch_size, workers, device, **options)
    towers = [*modules, *([gap.reference] if gap is not None else [])]
    # oneDNN/cuDNN run NHWC convolutions faster (the mini-world RN tower: 0.23 vs 0.31 ms/img on one CPU
    # thread); the same numbers up to float rounding. ViTs (one patch conv) stay as they are.
    nhwc = all(sum(isinstance(c, nn.Conv2d) for c in m.modules()) > 1 for m in towers)
    for m in towers:
        m.to(device).eval()
        if nhwc:
            m.to(memory_format=torch.channels_last)
    logits: list[list[torch.Tensor]] = [[] for _ in modules]
    sums: list[float | None] = [0.0 if gap is not None and isinstance(m, ImageClassifier) else None for m in modules]
    labels, n = [], 0
    for x, y in loader:
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        known: dict[int, torch.Tensor] = {}
        ref = None
        if gap is not None:
            known[id(gap.reference)] = gap.reference(x).float()
            ref = F.normalize(known[id(gap.reference)], dim=-1)
        for i, m in enumerate(modules):
            z, f = _features_and_logits(m, x, known)
            logits[i].append(z.cpu())
            if sums[i] is not None and f is not None:
                sums[i] += gap_sum(F.normalize(f, dim=-1) - ref, gap.moment)
        labels.append(y)
        n += len(y)
    gaps = [None if v is None else gap.scale ** 2 * v / max(n, 1) for v in sums]
    return [torch.cat(z) for z in logits], torch.cat(labels), gaps


def _metric_groups(logits: torch.Tensor, labels: torch.Tensor, frame: pd.DataFrame, ctx: dict[str, Any],
                   ece_bins: int) -> list[tuple[dict[str, Any], dict[str, float], int]]:
    """(context, metrics, n) groups of one model on one set (`schema.make_rows_many` builds the rows)."""
    if "corruption" not in frame.columns:
        return [(ctx, classification_metrics(logits, labels, ece_bins), len(labels))]
    # Corrupted sets (ImageNet-C, ObjectNet-C): one measurement per corruption × severity, each over
    # its whole subset; mCE and friends are computed from these rows by the report stage.
    groups = []
    for (corruption, severity), idx in frame.groupby(["corruption", "severity"], sort=True).indices.items():
        sel = torch.as_tensor(idx)
        metrics = classification_metrics(logits[sel], labels[sel], ece_bins)
        groups.append(({**ctx, "corruption": corruption, "severity": int(severity)}, metrics, len(idx)))
    return groups


def evaluate_models(
    entries: Sequence[Entry],
    dataset: Dataset,
    eval_name: str,
    spec: EvalSetSpec,
    cfg: EvaluateConfig,
    device: str = "cpu",
    gap: EnergyGap | None = None,
) -> pd.DataFrame:
    """Rows of every entry on one eval set (+ a set-level `energy_gap` row per tower model with `gap`)."""
    if not entries:
        raise ValueError("evaluate_models needs at least one model")
    frame = dataset.select(spec.split, spec.domain)
    base = {"eval_dataset": eval_name, "shift_type": spec.shift_type}
    transform = preprocess(_tower(entries[0].classifier))
    workers = None if cfg.workers == "auto" else int(cfg.workers)  # None: the loader's default
    if "perturbation" in frame.columns:  # ImageNet-P-style sequences: flip probability per perturbation
        from robustify.eval.sequences import evaluate_sequences

        return pd.concat([evaluate_sequences(e.classifier, dataset, frame, transform, cfg.batch_size, workers, device,
                                             {**e.context, **base}) for e in entries], ignore_index=True)
    unique: dict[int, int] = {}
    modules: list[nn.Module] = []
    for e in entries:
        if id(e.classifier) not in unique:
            unique[id(e.classifier)] = len(modules)
            modules.append(e.classifier)
    logits, labels, gaps = predict_many(modules, frame, transform, cfg.batch_size, workers, device,
                                        dataset.load_image, gap)
    projected = [dataset.project_logits(z) for z in logits]
    groups = []
    for e in entries:
        i = unique[id(e.classifier)]
        ctx = {**e.context, **base}
        groups += _metric_groups(projected[i], labels, frame, ctx, cfg.ece_bins)
        if gaps[i] is not None:
            groups.append((ctx, {"energy_gap": gaps[i]}, len(labels)))
    return make_rows_many(groups)


def _tower(module: nn.Module) -> nn.Module:
    """The image tower whose eval transform the set goes through (ensembles: their first member's)."""
    if isinstance(module, ImageClassifier):  # a VPT run's PromptedTower wraps the tower as `.tower`
        return getattr(module.encoder, "tower", module.encoder)
    if getattr(module, "tower", None) is not None:  # a student's head (methods.distill.method.HeadView)
        return module.tower
    members = getattr(module, "members", None)
    if members:
        return _tower(members[0])
    raise TypeError(f"cannot find the image tower of {type(module).__name__}")


def evaluate(
    classifier: ImageClassifier,
    dataset: Dataset,
    eval_name: str,
    spec: EvalSetSpec,
    cfg: EvaluateConfig,
    context: dict[str, Any],
    device: str = "cpu",
) -> pd.DataFrame:
    """One classifier on one eval set (the zero-shot stage's per-set job)."""
    return evaluate_models([Entry(classifier, context)], dataset, eval_name, spec, cfg, device)
