"""L2-SP (SPEC §2): λ · ½‖θ − θ0‖² over the image encoder (the head is free)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustify.methods.finetune import Batch, FineTuneMethod, RunContext, TextSide, register
from robustify.models.zeroshot import ImageClassifier


@register
class L2SP(FineTuneMethod):
    name: ClassVar[str] = "l2sp"

    def __init__(self, lam: float = 0.1) -> None:
        self.lam = float(lam)
        self.anchor: list[torch.Tensor] = []

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        ref = dict(run.reference.encoder.named_parameters())
        self.anchor = [ref[name].detach() for name, _ in model.encoder.named_parameters()]

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        reg = 0.5 * sum(((p - a) ** 2).sum() for p, a in zip(model.encoder.parameters(), self.anchor))
        return self.lam * reg, {"l2sp": float(reg.detach())}
