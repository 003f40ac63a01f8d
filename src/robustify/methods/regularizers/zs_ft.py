"""ZS-Full tuning (SPEC §3 baselines, "Efficiently Robustify Pre-Trained Models" §5): the whole image
tower is fine-tuned while the classifier stays the zero-shot head, i.e. logits = s·<F_θ(x)/|F_θ(x)|, w_c>
with the class text embeddings w_c fixed. Plain FT differs only in also training the head."""

from __future__ import annotations

from typing import ClassVar

from robustify.methods.finetune import FineTuneMethod, RunContext, register
from robustify.models.zeroshot import ImageClassifier


@register
class ZeroShotFullTuning(FineTuneMethod):
    name: ClassVar[str] = "zs-ft"

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        """Freeze the head: the loop's optimiser then holds only the tower's parameters."""
        for p in model.head.parameters():
            p.requires_grad_(False)
