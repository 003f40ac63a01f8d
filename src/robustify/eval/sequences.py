"""Flip probability on ImageNet-P-style sequence sets (SPEC §5; hendrycks/robustness ImageNet-P/test.py).

Every frame of every sequence is classified (through the dataset's logit projection); the top-1
predictions along each sequence give the flip probability of its perturbation — against the first
frame for noise, between frames `difficulty` apart otherwise. Accuracy over all frames is reported too.
Flip *rates* need a baseline model and are computed by the report stage.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from robustify.corruptions.sequence_build import load_sequence
from robustify.corruptions.sequences import flip_step, is_noise
from robustify.data.registry import Dataset
from robustify.eval.loader import default_eval_workers, split_eval_transform
from robustify.eval.metrics import flip_probability
from robustify.eval.schema import make_rows


class SequenceItems(torch.utils.data.Dataset):
    """(T×C×H×W frames, label) per stored sequence, each frame through the per-image transform."""

    def __init__(self, frame: pd.DataFrame, per_image: Any) -> None:
        self.paths, self.frames = frame["path"].tolist(), frame["frames"].astype(int).tolist()
        self.labels = frame["label"].astype(int).tolist()
        self.per_image = per_image

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        frames = load_sequence(self.paths[i], self.frames[i])
        return torch.stack([self.per_image(f) for f in frames]), self.labels[i]


@torch.no_grad()
def sequence_predictions(
    classifier: torch.nn.Module, dataset: Dataset, frame: pd.DataFrame, transform: Any, batch_size: int,
    workers: int | None, device: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sequences × T top-1 predictions, n_sequences labels) for sequences of equal length, in order."""
    parts = split_eval_transform(transform)
    per_image, normalize = parts if parts is not None else (transform, None)
    if workers is None:
        workers = default_eval_workers(device)
    length = int(frame["frames"].iloc[0])
    loader = DataLoader(SequenceItems(frame, per_image), batch_size=max(1, batch_size // length), shuffle=False,
                        num_workers=workers)
    classifier.to(device).eval()
    preds, labels = [], []
    for x, y in loader:
        b, t = x.shape[:2]
        x = x.flatten(0, 1).to(device)
        logits = classifier(normalize(x) if normalize is not None else x).float().cpu()
        preds.append(dataset.project_logits(logits).argmax(dim=-1).view(b, t))
        labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def evaluate_sequences(
    classifier: torch.nn.Module, dataset: Dataset, frame: pd.DataFrame, transform: Any, batch_size: int,
    workers: int | None, device: str, context: dict[str, Any],
) -> pd.DataFrame:
    """Rows `flip_probability` and `accuracy` (over all frames) per perturbation (in `corruption`)."""
    parts = []
    for perturbation, sub in frame.groupby("perturbation", sort=False):
        difficulty = int(sub["difficulty"].iloc[0])
        if sub["frames"].nunique() != 1 or sub["difficulty"].nunique() != 1:
            raise ValueError(f"{dataset.manifest_path}: {perturbation} mixes sequence lengths or difficulties")
        preds, labels = sequence_predictions(classifier, dataset, sub.reset_index(drop=True), transform, batch_size,
                                             workers, device)
        fp = flip_probability(preds, noise=is_noise(str(perturbation)), step=flip_step(str(perturbation), difficulty))
        acc = (preds == labels[:, None]).double().mean().item()
        ctx = {**context, "corruption": str(perturbation), "severity": None}
        parts.append(make_rows(ctx, {"flip_probability": fp, "accuracy": acc}, n=len(sub)))
    return pd.concat(parts, ignore_index=True)

