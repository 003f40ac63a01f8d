"""Noise2Net: DeepAugment without pretrained weights (hendrycks/imagenet-r `DeepAugment/train_noise2net.py`).

The batch passes through four random Res2Net bottlenecks, each applied as a residual
`z ← z + ε·block(z)`, in the ImageNet-normalised space the reference works in (its blocks end in a
BatchNorm, so the perturbation has unit scale there; in [0, 1] space the same ε would be ~4x stronger).
As in the reference every image gets its own random weights — the batch is laid out as one image with
B·3 channels and every convolution has `groups=B` — and the BatchNorms run in training mode on that
single "image", i.e. each (image, channel) is normalised over its own H×W with γ=1, β=0.

Sampling follows the reference: weights and biases from PyTorch's default conv init (kaiming-uniform
with a=√5, i.e. U(±1/√fan_in)), kernel size K ∈ {1, 3} and dilation D ∈ {1, 2, 3} per inner conv,
ε ~ U(max_eps/2, max_eps) shared by the batch. Deviations, each for a reason:
- K and D are re-drawn on every call (the reference draws them once per epoch, when it builds the
  module): a batch function has no epoch, and SPEC §3 asks for blocks re-drawn per batch.
- The reference perturbs half of every batch; here the caller passes the images to perturb.
- Inputs and outputs are images in [0, 1] and the result is clamped to [0, 1] (the reference leaves
  the normalised tensor unclamped), so Noise2Net composes with the other image-space augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-5  # nn.BatchNorm2d's default, which the reference's blocks use


@dataclass(frozen=True)
class InnerConv:
    """One of the bottleneck's per-scale convolutions (with bias), stacked over the batch."""

    weight: torch.Tensor  # (B·hidden, hidden, K, K)
    bias: torch.Tensor  # (B·hidden,)
    dilation: int


@dataclass(frozen=True)
class Bottleneck:
    """One random Res2Net bottleneck (Bottle2neck), weights of all B images stacked along dim 0."""

    conv1: torch.Tensor  # (B·scale·hidden, 3, 1, 1), no bias
    convs: tuple[InnerConv, ...]  # max(1, scale − 1) of them
    conv3: torch.Tensor  # (B·3, scale·hidden, 1, 1), no bias
    hidden: int
    scale: int


@dataclass(frozen=True)
class Noise2NetSample:
    """Everything one call draws: ε and the blocks; `apply_noise2net` turns it into images."""

    eps: float
    blocks: tuple[Bottleneck, ...]


def _uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, device=gen.device) * 2 - 1) * bound


def _choice(options: tuple[int, ...], gen: torch.Generator) -> int:
    return options[int(torch.randint(len(options), (1,), generator=gen, device=gen.device))]


def sample_bottleneck(batch: int, gen: torch.Generator, hidden: int = 16, scale: int = 4,
                      channels: int = 3) -> Bottleneck:
    """A freshly initialised Bottle2neck per image (what the reference's `reload_parameters` does)."""
    width = hidden * scale
    conv1 = _uniform((batch * width, channels, 1, 1), channels ** -0.5, gen)
    convs = []
    for _ in range(max(1, scale - 1)):
        k, d = _choice((1, 3), gen), _choice((1, 2, 3), gen)
        bound = (hidden * k * k) ** -0.5
        convs.append(InnerConv(_uniform((batch * hidden, hidden, k, k), bound, gen),
                               _uniform((batch * hidden,), bound, gen), d))
    conv3 = _uniform((batch * channels, width, 1, 1), width ** -0.5, gen)
    return Bottleneck(conv1, tuple(convs), conv3, hidden, scale)


def sample_noise2net(batch: int, gen: torch.Generator, max_eps: float = 0.75, hidden: int = 16,
                     scale: int = 4, blocks: int = 4) -> Noise2NetSample:
    """Draw ε ~ U(max_eps/2, max_eps) and `blocks` random bottlenecks for a batch of `batch` images."""
    if max_eps < 0:
        raise ValueError(f"noise2net: max_eps must be >= 0, got {max_eps}")
    if batch < 1 or hidden < 1 or scale < 1 or blocks < 1:
        raise ValueError(f"noise2net: batch, hidden, scale, blocks must be >= 1, got {batch}, {hidden}, {scale}, {blocks}")
    u = float(torch.rand((), generator=gen, device=gen.device))
    eps = max_eps / 2 + u * (max_eps / 2)
    return Noise2NetSample(eps, tuple(sample_bottleneck(batch, gen, hidden, scale) for _ in range(blocks)))


def _norm(x: torch.Tensor) -> torch.Tensor:
    """BatchNorm2d in training mode with γ=1, β=0 on a batch of one: per-channel over H×W."""
    return F.batch_norm(x, None, None, training=True, eps=BN_EPS)


def bottleneck(z: torch.Tensor, block: Bottleneck) -> torch.Tensor:
    """block(z) for a (B, C, H, W) batch, each image through its own weights (grouped convs)."""
    b, c, h, w = z.shape
    hid, scale = block.hidden, block.scale
    dev = z.device
    x = z.reshape(1, b * c, h, w)
    out = F.relu(_norm(F.conv2d(x, block.conv1.to(dev), groups=b)))
    # channels are ordered (image, scale, hidden); the reference reaches the same split with a
    # view/transpose round trip
    spx = out.view(b, scale, hid, h, w)
    parts: list[torch.Tensor] = []
    sp = None
    for i, conv in enumerate(block.convs):
        piece = spx[:, i].reshape(1, b * hid, h, w)
        sp = piece if sp is None else sp + piece
        pad = (conv.weight.shape[-1] - 1) // 2 * conv.dilation
        sp = F.relu(_norm(F.conv2d(sp, conv.weight.to(dev), conv.bias.to(dev), padding=pad,
                                   dilation=conv.dilation, groups=b)))
        parts.append(sp.view(b, hid, h, w))
    if scale != 1:
        parts.append(spx[:, scale - 1])
    out = torch.stack(parts, 1).reshape(1, b * scale * hid, h, w)
    return _norm(F.conv2d(out, block.conv3.to(dev), groups=b)).view(b, c, h, w)


def _stats(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, images.shape[1], 1, 1)
    return (torch.tensor(mean, device=images.device).view(shape), torch.tensor(std, device=images.device).view(shape))


def apply_noise2net(images: torch.Tensor, sample: Noise2NetSample, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Apply a drawn Noise2Net to [0, 1] images: z ← z + ε·block(z) per block in normalised space.

    The result is mapped back as x + std·(z_final − z_0), which equals de-normalising z_final but is
    exactly x when ε = 0 (no normalise/de-normalise rounding)."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"noise2net: expected a float (B, C, H, W) batch, got {tuple(images.shape)} {images.dtype}")
    if sample.blocks[0].conv1.shape[0] != images.shape[0] * sample.blocks[0].hidden * sample.blocks[0].scale:
        raise ValueError(f"noise2net: the sample was drawn for another batch size than {images.shape[0]}")
    with torch.no_grad():
        x = images.float()
        m, s = _stats(x, mean, std)
        z0 = (x - m) / s
        z = z0
        for block in sample.blocks:
            z = z + sample.eps * bottleneck(z, block)
        return (x + s * (z - z0)).clamp(0, 1).to(images.dtype)


def noise2net(images: torch.Tensor, gen: torch.Generator, max_eps: float = 0.75, hidden: int = 16,
              scale: int = 4, blocks: int = 4, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """Noise2Net on a batch of [0, 1] images (B, 3, H, W): a new random network per call, so per batch.

    Weights are drawn on `gen`'s device and moved to the images' device; the result has the images'
    shape, dtype and device and lies in [0, 1]."""
    sample = sample_noise2net(images.shape[0], gen, max_eps, hidden, scale, blocks)
    return apply_noise2net(images, sample, mean, std)
