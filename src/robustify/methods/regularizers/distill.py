"""Distillation from the zero-shot model (SPEC §2): KD on logits and FeatKD on image features."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from robustify.methods.finetune import Batch, FineTuneMethod, TextSide, register
from robustify.models.zeroshot import ImageClassifier


@register
class KD(FineTuneMethod):
    """λ · T² · KL(softmax(z0/T) ‖ softmax(z/T)), z0 the zero-shot classifier's logits on the batch."""

    name: ClassVar[str] = "kd"

    def __init__(self, lam: float = 1.0, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"method 'kd': temperature must be > 0, got {temperature}")
        self.lam, self.temperature = float(lam), float(temperature)

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "temperature": self.temperature}

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        t = self.temperature
        reg = kd_term(batch.logits.float(), batch.reference_logits.float(), t)
        return self.lam * reg, {"kd": float(reg.detach())}


def kd_term(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student), averaged over the batch."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                            log_target=True, reduction="batchmean")


@register
class FeatKD(FineTuneMethod):
    """λ · mean_batch ‖F_θ(x) − F_θ0(x)‖² on L2-normalised features ([choice]: the features every CLIP
    inner product uses, as lipsum-ft's `get_features` returns them)."""

    name: ClassVar[str] = "featkd"

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = float(lam)

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        diff = F.normalize(batch.features.float(), dim=-1) - F.normalize(batch.reference_features, dim=-1)
        reg = (diff ** 2).sum(-1).mean()
        return self.lam * reg, {"featkd": float(reg.detach())}
