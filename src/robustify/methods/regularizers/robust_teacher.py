"""Robust teacher training: AugMix + JSD with DeepAugment, or PixMix (SPEC §3, paper §4.2, App. G).

The paper robustifies its small teachers "with the same pipeline and hyper-parameters as proposed
in the DeepAugment paper": the training set is the clean images plus their DeepAugment versions, and
AugMix with the Jensen-Shannon consistency loss runs on top,
    CE(clean) + 12 · JS(p_clean, p_aug1, p_aug2)        (timm JsdCrossEntropy, no label smoothing).
Here DeepAugment is applied per step to a random fraction of the rows (those rows' "clean" image is
the DeepAugment image, as a DeepAugment copy of the dataset would be), and the two AugMix views of
every row are built by `prepare`, outside the timed step like a data loader's work. The three splits
go through the model in ONE forward, as the reference concatenates them, so a BatchNorm teacher
normalises with the statistics of all three. Without AugMix (PixMix alone) or with `jsd_weight: 0`,
the rows are replaced by their robust sample and trained with plain CE (PixMix's recipe).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from robustify.augment.augmix import jsd_loss
from robustify.augment.robust import RobustRecipe, row_seeds
from robustify.methods.finetune import Batch, FineTuneMethod, StepInfo, TextSide, register
from robustify.models.zeroshot import ImageClassifier

DEFAULT_AUGMENT: dict[str, Any] = {"augmix": {}, "deepaugment": {"kind": "noise2net"}}


def to_unit(images: torch.Tensor, info: StepInfo) -> torch.Tensor:
    """Normalised images → [0, 1] (the augmentations' domain)."""
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp_(0, 1)


def from_unit(images: torch.Tensor, info: StepInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _step_seed(info: StepInfo, word: int) -> int:
    return int(info.generator(word).initial_seed())


@register
class RobustTeacher(FineTuneMethod):
    """`augmix-jsd`: the teacher recipe (`augment`: see `RobustRecipe.from_params`)."""

    name: ClassVar[str] = "augmix-jsd"

    def __init__(self, augment: dict[str, Any] | None = None, jsd_weight: float = 12.0) -> None:
        self.recipe = RobustRecipe.from_params(DEFAULT_AUGMENT if augment is None else augment, "augmix-jsd.augment")
        if jsd_weight < 0:
            raise ValueError(f"augmix-jsd: jsd_weight must be >= 0, got {jsd_weight}")
        self.jsd_weight = float(jsd_weight)
        self.jsd = self.recipe.augmix is not None and self.jsd_weight > 0
        self.ce_on_logits = not self.jsd  # type: ignore[misc]  # the JSD loss includes the clean CE

    @property
    def params(self) -> dict[str, Any]:
        return {"augment": self.recipe.params, "jsd_weight": self.jsd_weight}

    def prepare(self, images: torch.Tensor, labels: torch.Tensor, info: StepInfo) -> tuple[torch.Tensor, dict[str, Any]]:
        x = self.recipe.deep(to_unit(images, info), info.generator(0))
        n = len(images)
        if not self.jsd:
            return from_unit(self.recipe.mix(x, row_seeds(_step_seed(info, 1), info.first, n)), info), {}
        views = [from_unit(self.recipe.mix(x, row_seeds(_step_seed(info, word), info.first, n)), info)
                 for word in (1, 2)]
        return from_unit(x, info), {"views": torch.cat(views)}

    def forward(self, net: torch.nn.Module, images: torch.Tensor, extras: dict[str, Any]) -> tuple[None, torch.Tensor] | None:
        if "views" not in extras:
            return None
        x = torch.cat([images, extras["views"].to(images.device)])
        if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # the loop's layout for conv towers
        logits = net(x)
        b = len(images)
        extras["view_logits"] = logits[b:]
        return None, logits[:b]

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor | None, dict[str, float]]:
        if not self.jsd:
            return None, {}
        aug1, aug2 = batch.extras["view_logits"].float().chunk(2)
        loss = jsd_loss(batch.logits.float(), aug1, aug2, batch.labels, self.jsd_weight)
        ce = torch.nn.functional.cross_entropy(batch.logits.float().detach(), batch.labels)
        return loss, {"ce_clean": ce.item(), "jsd_term": loss.item() - ce.item()}
