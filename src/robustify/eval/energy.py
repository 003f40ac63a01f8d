"""Energy gap between a fine-tuned and the zero-shot image tower (SPEC §2, Lipsum-FT Eq. 6).

    Gap = E_x E_t ( s·<F_θ(x), G(t)> − s·<F_θ0(x), G(t)> )²

with image features and text embeddings L2-normalised, `s = exp(logit_scale)` of the pre-trained
CLIP, and t random texts `[SOT] + L ids + [EOT]` (10,000 texts of length 8 in the paper). It measures
how far fine-tuning moved the image tower's energies against the *frozen* text tower — the quantity
Lipsum-FT's regulariser minimises stochastically.

Computed as `s² · mean((f̂_θ − f̂_θ0) · t)²`: the difference is taken before the inner product, which
is exactly the same number in real arithmetic and avoids cancelling two large logits. The mean over
texts is a quadratic form, `E_t (d·t)² = dᵀ Σ d` with `Σ = E_t t tᵀ` (D×D, float64), so the image ×
text matrix (50k × 10k for ImageNet) is never formed: the cost per image is D² instead of 10,000·D,
and the gap of every model on a set comes from one Σ. Same number as the direct sum up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustify.models.random_texts import encode_random_texts, sample_texts, special_ids, token_pool

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
DEFAULT_CHUNK = 1024  # images per float64 chunk


def random_text_ids(
    tokenize: Callable[..., torch.Tensor], n: int = 10000, length: int = 8, vocab: str = "full",
    corpus: Iterable[str] | None = None, seed: int = 0,
) -> torch.Tensor:
    """n × context_length token ids of random texts, reproducible from `seed` (see `random_texts`)."""
    pool = token_pool(tokenize, vocab, corpus)
    sot, eot = special_ids(tokenize)
    gen = torch.Generator().manual_seed(seed)
    return sample_texts(pool, n, length, int(tokenize.context_length), sot, eot, gen)


@torch.no_grad()
def random_text_embeddings(
    clip: nn.Module, tokenize: Callable[..., torch.Tensor], n: int = 10000, length: int = 8,
    vocab: str = "full", corpus: Iterable[str] | None = None, seed: int = 0, batch_size: int = 1000,
) -> torch.Tensor:
    """n × D unit-norm text-tower embeddings (float32, CPU) of `random_text_ids(...)`.

    Encoded once per (CLIP, seed) and shared by every model compared against that CLIP, so all
    energy gaps of a study use the same texts.
    """
    ids = random_text_ids(tokenize, n, length, vocab, corpus, seed)
    device = next(clip.parameters()).device
    was_training = clip.training
    clip.eval()
    try:
        chunks = [encode_random_texts(clip, ids[i:i + batch_size].to(device)).float().cpu() for i in range(0, n, batch_size)]
    finally:
        clip.train(was_training)
    return F.normalize(torch.cat(chunks), dim=-1)


def text_moment(text_embeddings: torch.Tensor) -> torch.Tensor:
    """Σ = E_t t tᵀ (D×D, float64) of the normalised text embeddings: all the gap needs of the texts."""
    t = F.normalize(text_embeddings.double(), dim=-1)
    return t.T @ t / t.shape[0]


def gap_sum(diff: torch.Tensor, moment: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> float:
    """Σ_x E_t <diff_x, t>² = Σ_x diff_xᵀ Σ diff_x over the rows of `diff` (unscaled)."""
    moment = moment.to(diff.device, torch.float64)
    total = 0.0
    for i in range(0, diff.shape[0], chunk):
        d = diff[i:i + chunk].double()
        total += ((d @ moment) * d).sum().item()
    return total


def energy_gap(
    features_tuned: torch.Tensor, features_zero: torch.Tensor, text_embeddings: torch.Tensor,
    scale: float | torch.Tensor, chunk: int = DEFAULT_CHUNK,
) -> float:
    """Gap from N×D image features of both towers (normalised here) and n×D text embeddings.

    `scale` is s = exp(logit_scale) (≈100 for OpenAI CLIPs), not the log-scale parameter.
    """
    if features_tuned.shape != features_zero.shape:
        raise ValueError(f"feature shapes differ: {tuple(features_tuned.shape)} vs {tuple(features_zero.shape)}")
    if features_tuned.shape[-1] != text_embeddings.shape[-1]:
        raise ValueError(f"image features have D={features_tuned.shape[-1]}, texts D={text_embeddings.shape[-1]}")
    diff = F.normalize(features_tuned.float(), dim=-1) - F.normalize(features_zero.float(), dim=-1)
    s = float(scale)
    return s * s * gap_sum(diff, text_moment(text_embeddings), chunk) / diff.shape[0]


@torch.no_grad()
def energy_gap_for(
    encoder_tuned: nn.Module, encoder_zero: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    text_embeddings: torch.Tensor, scale: float | torch.Tensor, device: str | torch.device,
    chunk: int = DEFAULT_CHUNK,
) -> float:
    """Gap of two image towers over preprocessed `batches` (labels unused).

    Both encoders must already live on `device`; they run in eval mode (BatchNorm running
    statistics) and get their previous mode back. Only running sums are kept, not the features.
    """
    moment = text_moment(text_embeddings).to(device)
    modes = (encoder_tuned.training, encoder_zero.training)
    encoder_tuned.eval()
    encoder_zero.eval()
    total, n_images = 0.0, 0
    try:
        for images, _ in batches:
            images = images.to(device)
            diff = (F.normalize(encoder_tuned(images).float(), dim=-1)
                    - F.normalize(encoder_zero(images).float(), dim=-1))
            total += gap_sum(diff, moment, chunk)
            n_images += diff.shape[0]
    finally:
        encoder_tuned.train(modes[0])
        encoder_zero.train(modes[1])
    if n_images == 0:
        raise ValueError("energy gap needs at least one image")
    s = float(scale)
    return s * s * total / n_images
