"""Cost metrics of a training method (SPEC §3 "Cost metrics", paper Tables 1–3 latency column).

- `trainable_params`: parameters the optimiser updated;
- `train_ms_per_image`: median step time / batch size, with the data work (loading, the method's
  per-step augmentation) excluded, on the run's own device and precision;
- `inference_gflops`: forward FLOPs per image of the model as it predicts (the three-head student:
  the frozen prefix once + N MC passes through the tunable part for its heads), counted by
  `torch.utils.flop_counter` (a multiply-add = 2 FLOPs); `inference_gflops_overhead` = its ratio to
  the initial model's, minus 1.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COST_METRICS = ("trainable_params", "train_ms_per_image", "inference_gflops", "inference_gflops_overhead")


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def ms_per_image(step_times: Sequence[float], batch_size: int) -> float:
    """Median step time (s) / batch, in ms (NaN without steps)."""
    if not step_times:
        return float("nan")
    return 1000.0 * statistics.median(step_times) / batch_size


@torch.no_grad()
def gflops(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    """Forward GFLOPs of `fn(x)` per image of the batch `x`."""
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def student_predict_fn(student: nn.Module, n_passes: int) -> Callable[[torch.Tensor], object]:
    """What head selection runs per image: the prefix once, then `n_passes` passes through the shared
    section and every head (FLOPs do not depend on the dropout masks)."""
    def run(x: torch.Tensor) -> None:
        features = student.features(x)
        for _ in range(n_passes):
            student.forward_from_features(features, tuple(student.heads))
    return run
