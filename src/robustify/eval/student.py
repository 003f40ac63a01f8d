"""Evaluate a three-head student with uncertainty-aware head selection (SPEC §3, paper §4.3.2).

Per batch: the frozen prefix runs once, N MC-dropout passes run through the tunable part
(`selection.mc_head_outputs`), and the prediction is the head Eq. 6 selects. The model's plain metrics
(accuracy, ECE, NLL, …) are those of the selected heads' MC-mean distributions; the head-selection
rows (`eval.head_selection`) add every rule's accuracy and F_correct and each head's accuracy. A
corrupted set gets both per corruption × severity cell, like every other model.

A dataset whose protocol projects logits (ObjectNet's max over mapped classes) gets each pass's
log-probabilities projected and re-normalised before selection, so U, KL and the choice are computed
in the label space the set is scored in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from robustify.config import EvalSetSpec, EvaluateConfig
from robustify.data.registry import Dataset
from robustify.eval.head_selection import HeadSelectionTally
from robustify.eval.loader import make_eval_loader
from robustify.eval.metrics import classification_metrics
from robustify.eval.schema import make_rows_many
from robustify.io import derive_seed
from robustify.methods.distill.selection import eval_mode, mc_head_outputs, select_heads
from robustify.models.clip import preprocess

N_PASSES = 10  # paper App. G


def _project(dataset: Dataset, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for h, p in probs.items():
        n, b, c = p.shape
        z = dataset.project_logits(p.clamp_min(1e-30).log().reshape(n * b, c))
        out[h] = z.softmax(dim=-1).reshape(n, b, -1)
    return out


@torch.no_grad()
def evaluate_student(
    student: torch.nn.Module, tower: torch.nn.Module, dataset: Dataset, eval_name: str, spec: EvalSetSpec,
    cfg: EvaluateConfig, context: Mapping[str, Any], device: str = "cpu", n_passes: int = N_PASSES, seed: int = 0,
) -> pd.DataFrame:
    """Result rows of a three-head `student` on one eval set (`tower`: whose eval transform to use).
    The MC masks come from a generator seeded by (seed, eval set), so reruns give the same rows."""
    frame = dataset.select(spec.split, spec.domain)
    workers = None if cfg.workers == "auto" else int(cfg.workers)
    loader = make_eval_loader(frame, preprocess(tower), cfg.batch_size, workers, device, load_image=dataset.load_image)
    student.to(device)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "head-selection", eval_name))
    cells = (frame.groupby(["corruption", "severity"], sort=True).ngroup().to_numpy()
             if "corruption" in frame.columns else np.zeros(len(frame), dtype=np.int64))
    tallies: dict[int, HeadSelectionTally] = {}
    chosen, labels, start = [], [], 0
    with eval_mode(student):
        for x, y in loader:
            features = student.features(x)
            probs = mc_head_outputs(student, features, n_passes, gen=gen)
            probs = _project(dataset, {h: p.cpu() for h, p in probs.items()})
            y = y.cpu()
            chosen.append(select_heads(probs, "ours").probs.float())
            labels.append(y)
            batch_cells = cells[start:start + len(y)]
            for cell in np.unique(batch_cells):
                idx = torch.as_tensor(np.nonzero(batch_cells == cell)[0])
                tallies.setdefault(int(cell), HeadSelectionTally()).update(
                    y[idx], {h: p[:, idx] for h, p in probs.items()})
            start += len(y)
    log_probs = torch.cat(chosen).clamp_min(1e-30).log()
    y_all = torch.cat(labels)
    base = {**context, "eval_dataset": eval_name, "shift_type": spec.shift_type}
    groups = []
    if "corruption" in frame.columns:
        keys = frame.groupby(["corruption", "severity"], sort=True).indices
        for cell, ((corruption, severity), idx) in enumerate(keys.items()):
            sel = torch.as_tensor(idx)
            ctx = {**base, "corruption": corruption, "severity": int(severity)}
            metrics = {**classification_metrics(log_probs[sel], y_all[sel], cfg.ece_bins),
                       **tallies[cell].metrics(spec.shift_type)}
            groups.append((ctx, metrics, len(idx)))
    else:
        metrics = {**classification_metrics(log_probs, y_all, cfg.ece_bins), **tallies[0].metrics(spec.shift_type)}
        groups.append((base, metrics, len(y_all)))
    return make_rows_many(groups)
