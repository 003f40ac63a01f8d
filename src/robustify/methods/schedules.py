"""Learning-rate schedules and step-indexed randomness shared by the training loops (pre-training,
fine-tuning): a batch and its draws are functions of (seed, step), which is what makes resume exact."""

from __future__ import annotations

import math

import numpy as np
import torch


def warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def step_generator(seed: int, *words: int) -> torch.Generator:
    """A torch generator for one stream of one step, seeded by hash(seed, words)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed % (1 << 63), *words]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    """Epoch-wise shuffling without replacement, as a function of the step alone."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} training items")
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, 1, epoch))
    return perm[k * batch_size:(k + 1) * batch_size]
