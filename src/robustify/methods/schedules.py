"""Learning-rate schedules shared by the training loops."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` (step is 0-based)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))
