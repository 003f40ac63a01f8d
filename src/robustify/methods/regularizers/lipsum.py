"""Lipsum-FT (SPEC §2, paper §5.1, lipsum-ft `scripts/Lipsum-FT.py`).

Every step: M random texts `[SOT] + L ids + [EOT]` (resampled per step, the same on every rank), their
unit-norm embeddings t_m by the frozen text tower, and the energies v_θ(x) = [s·<F_θ(x)/|F_θ(x)|, t_m>]_m;
R = (1/2M) · mean_batch ‖v_θ(x) − v_θ0(x)‖², added with weight λ (1 in the paper). The token pool is
`full` (the reference) or `seen` (tokens of the pre-training captions, see `models.random_texts`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from robustify.methods.finetune import Batch, FineTuneMethod, RunContext, TextSide, register
from robustify.models.random_texts import VOCABS, sample_texts, special_ids, token_pool
from robustify.models.zeroshot import ImageClassifier


@register
class LipsumFT(FineTuneMethod):
    name: ClassVar[str] = "lipsum-ft"

    def __init__(self, lam: float = 1.0, texts: int = 80, length: int = 8, vocab: str = "full") -> None:
        if vocab not in VOCABS:
            raise ValueError(f"method 'lipsum-ft': vocab must be one of {VOCABS}, got '{vocab}'")
        if texts < 1 or length < 1:
            raise ValueError(f"method 'lipsum-ft': texts and length must be >= 1, got {texts}, {length}")
        self.lam, self.texts, self.length, self.vocab = float(lam), int(texts), int(length), vocab
        self.pool: torch.Tensor | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"lam": self.lam, "texts": self.texts, "length": self.length, "vocab": self.vocab}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        text = run.text
        if text is None:
            raise ValueError("method 'lipsum-ft' needs the CLIP text tower")
        self.pool = token_pool(text.tokenize, self.vocab, text.corpus)
        self.special = special_ids(text.tokenize)
        self.context_length = int(text.tokenize.context_length)

    def random_texts(self, batch: Batch) -> torch.Tensor:
        return sample_texts(self.pool, self.texts, self.length, self.context_length, *self.special, batch.generator(0))

    def extra_loss(self, batch: Batch, model: ImageClassifier, text: TextSide | None) -> tuple[torch.Tensor, dict[str, float]]:
        emb = text.encode(self.random_texts(batch).to(batch.features.device))  # M×D, unit norm, no grad
        scale = batch.reference.head.scale
        # v − v0 = s·(f̂ − f̂0)·tᵀ: the difference before the product (as the energy gap) is the same
        # number without cancelling two large energies, and one matmul instead of two
        diff = F.normalize(batch.features.float(), dim=-1) - F.normalize(batch.reference_features, dim=-1)
        reg = scale ** 2 * ((diff @ emb.T) ** 2).sum(-1).mean() / (2 * self.texts)
        return self.lam * reg, {"lipsum": float(reg.detach())}
