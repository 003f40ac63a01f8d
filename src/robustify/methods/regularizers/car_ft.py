"""CAR-FT (SPEC §2): keep the image's distribution over the T prompt *contexts* close to the zero-shot
model's: λ · KL(p_ctx(θ0) ‖ p_ctx(θ)), p_ctx(θ) = softmax(s·<F_θ(x)/|F_θ(x)|, ctx_t>) with ctx the
head's per-template context matrix (mean over classes of each template's embeddings)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from robustify.methods.finetune import Batch, FineTuneMethod, RunContext, TextSide, register
from robustify.models.zeroshot import ImageClassifier


@register
class CARFT(FineTuneMethod):
    name: ClassVar[str] = "car-ft"

    def __init__(self, lam: float = 1.0) -> None:
        self.lam = float(lam)

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        if run.reference.head.ctx.shape[1] < 2:
            raise ValueError("method 'car-ft' needs the zero-shot head's context matrix from >= 2 templates")

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        head = batch.reference.head
        ctx, scale = head.ctx, head.scale
        student = scale * F.normalize(batch.features.float(), dim=-1) @ ctx
        teacher = scale * F.normalize(batch.reference_features, dim=-1) @ ctx
        reg = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
                       reduction="batchmean")
        return self.lam * reg, {"car": float(reg.detach())}
