"""Evaluate one classifier on one eval set → result rows (DESIGN §5 schema).

Images go through the model's own eval transform (fused into uint8 workers + per-batch normalisation
by `eval.loader`); logits are collected for the whole set and mapped by the dataset's `project_logits`
before any metric, so metrics are dataset-level.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from robustify.config import EvalSetSpec, EvaluateConfig
from robustify.data.registry import Dataset
from robustify.eval.loader import make_eval_loader
from robustify.eval.metrics import classification_metrics
from robustify.eval.schema import make_rows
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


def evaluate(
    classifier: ImageClassifier,
    dataset: Dataset,
    eval_name: str,
    spec: EvalSetSpec,
    cfg: EvaluateConfig,
    context: dict[str, Any],
    device: str = "cpu",
) -> pd.DataFrame:
    frame = dataset.select(spec.split, spec.domain)
    ctx = {**context, "eval_dataset": eval_name, "shift_type": spec.shift_type}
    transform = preprocess(classifier.encoder)
    workers = None if cfg.workers == "auto" else int(cfg.workers)  # None: the loader's default
    if "perturbation" in frame.columns:  # ImageNet-P-style sequences: flip probability per perturbation
        from robustify.eval.sequences import evaluate_sequences

        return evaluate_sequences(classifier, dataset, frame, transform, cfg.batch_size, workers, device, ctx)
    logits, labels = predict(classifier, frame, transform, cfg.batch_size, workers, device, dataset.load_image)
    logits = dataset.project_logits(logits)
    if "corruption" not in frame.columns:
        return make_rows(ctx, classification_metrics(logits, labels, cfg.ece_bins), n=len(labels))
    # Corrupted sets (ImageNet-C, ObjectNet-C): one measurement per corruption × severity, each over
    # its whole subset; mCE and friends are computed from these rows by the report stage.
    parts = []
    for (corruption, severity), idx in frame.groupby(["corruption", "severity"], sort=True).indices.items():
        sel = torch.as_tensor(idx)
        metrics = classification_metrics(logits[sel], labels[sel], cfg.ece_bins)
        parts.append(make_rows({**ctx, "corruption": corruption, "severity": int(severity)}, metrics, n=len(idx)))
    return pd.concat(parts, ignore_index=True)
