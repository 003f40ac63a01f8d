"""EMA (SPEC §2): evaluate and keep θ̄ ← μ·θ̄ + (1−μ)·θ, updated after every optimiser step."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from robustify.methods.finetune import FineTuneMethod, RunContext, register
from robustify.models.zeroshot import ImageClassifier


@register
class EMA(FineTuneMethod):
    name: ClassVar[str] = "ema"

    def __init__(self, momentum: float = 0.999) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"method 'ema': momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.average: nn.Module | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"momentum": self.momentum}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        self.average = copy.deepcopy(model).eval()
        for p in self.average.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def on_step_end(self, model: ImageClassifier, step: int) -> None:
        live = model.state_dict()
        for key, avg in self.average.state_dict().items():
            if avg.is_floating_point():
                avg.mul_(self.momentum).add_(live[key].detach(), alpha=1 - self.momentum)
            else:  # counters (BatchNorm's num_batches_tracked) follow the live model
                avg.copy_(live[key])

    def eval_model(self, model: ImageClassifier) -> nn.Module:
        return self.average

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state["average"])
