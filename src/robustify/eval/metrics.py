"""Classification metrics over a whole dataset (never averaged per batch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    return F.cross_entropy(logits.double(), labels, reduction="mean").item()


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: max-probability confidence in `n_bins` equal-width bins over
    the whole dataset, |accuracy − confidence| weighted by bin size (Guo et al. 2017)."""
    probs = logits.double().softmax(dim=1)
    return multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=n_bins, norm="l1").item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return {"accuracy": accuracy(logits, labels), "ece": ece(logits, labels, n_bins), "nll": nll(logits, labels)}
