"""Head initialisations and linear probing: Scratch-FT, LP, LP-FT (SPEC §2)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from robustify.methods.finetune import FineTuneMethod, RunContext, register
from robustify.models.zeroshot import ImageClassifier


@register
class ScratchFT(FineTuneMethod):
    """FT with the head initialised at 0 instead of the zero-shot head (lipsum-ft's `clip_cls_init=None`)."""

    name: ClassVar[str] = "scratch-ft"

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        with torch.no_grad():
            model.head.weight.zero_()


@register
class LinearProbe(FineTuneMethod):
    """LP: only the head trains, on features of the frozen zero-shot tower computed once (the loop
    caches them: no augmentation, no encoder forward per step). The head starts at the zero-shot head."""

    name: ClassVar[str] = "lp"
    trains_encoder: ClassVar[bool] = False


@register
class LPFT(FineTuneMethod):
    """LP-FT (Kumar et al.): a linear-probing phase (`lp_steps` at `lp_lr`, the best head on the validation
    split, as an LP run picks it), then full fine-tuning from that head with the run's own recipe."""

    name: ClassVar[str] = "lp-ft"

    def __init__(self, lp_steps: int = 100, lp_lr: float | None = None) -> None:
        if lp_steps < 1:
            raise ValueError(f"method 'lp-ft': lp_steps must be >= 1, got {lp_steps}")
        self.lp_steps, self.lp_lr = int(lp_steps), lp_lr

    @property
    def params(self) -> dict[str, Any]:
        return {"lp_steps": self.lp_steps, "lp_lr": self.lp_lr}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        from robustify.methods.finetune import finetune

        cfg = run.cfg
        lp_cfg = dataclasses.replace(cfg, steps=self.lp_steps, lr=self.lp_lr or cfg.lr, checkpoint_every=0,
                                     eval_every=min(cfg.eval_every, self.lp_steps) if cfg.eval_every else 0)
        result = finetune(model, run.reference, LinearProbe(), run.train, run.val, lp_cfg, run.seed, device=run.device)
        with torch.no_grad():
            model.head.weight.copy_(result.model.head.weight.to(model.head.weight.device))
        for p in model.parameters():
            p.requires_grad_(True)
