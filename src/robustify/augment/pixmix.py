"""PixMix (Hendrycks et al., CVPR 2022; reference andyzoujm/pixmix `imagenet.py`, `pixmix_utils.py`).

Start from the image or one augmented view of it (a fair coin), then for U{0..k} rounds mix in either
another augmented view or the mixing-set picture (a fair coin) with `add` or `multiply` (uniform), whose
weights (a, b) come from Beta(β, 1)/Beta(1, β) draws; clip to [0, 1] after every round. The mixing happens
on ToTensor floats in [0, 1]. Every draw comes from the caller's generator, in the reference's order.

Deviations from the reference, each for a reason:
- the single-op augmentation (`augment_input`: one AugMix op at `aug_severity`, `all_ops` off) is a
  parameter, so PixMix does not depend on the AugMix module; it receives the same generator;
- the result is returned in [0, 1], not normalised: the caller owns the model's normalisation, as with
  every other augmentation here;
- a picture that is not RGB is converted first, so the output always is 3×H×W.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

Augment = Callable[[Image.Image, np.random.Generator], Image.Image]
MixFn = Callable[[torch.Tensor, torch.Tensor, float, np.random.Generator], torch.Tensor]

# The reference's defaults. ImageNet (`imagenet.py`, what the paper's Table 4 teachers use): k=4, β=4,
# aug_severity=1. CIFAR (`cifar.py`): k=4, β=3, aug_severity=3. `aug_severity` and `all_ops` belong to the
# single-op `augment` the caller passes; they are named here so the caller can build it.
IMAGENET_K, IMAGENET_BETA, IMAGENET_AUG_SEVERITY = 4, 4.0, 1
CIFAR_K, CIFAR_BETA, CIFAR_AUG_SEVERITY = 4, 3.0, 3
ALL_OPS = False  # the reference leaves out color/contrast/brightness/sharpness (they overlap ImageNet-C)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision's `ToTensor` for an RGB picture: float32 CHW, uint8 / 255."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def mix_weights(beta: float, rng: np.random.Generator) -> tuple[float, float]:
    """The reference's `get_ab`: with probability ½ (a, b) = (Beta(β,1), Beta(1,β)), otherwise
    (1 + Beta(1,β), −Beta(1,β)) — an extrapolation away from the second picture. Rounded to float32 as
    the reference does (1 + a is a float32 sum there too)."""
    if rng.random() < 0.5:
        a = np.float32(rng.beta(beta, 1))
        b = np.float32(rng.beta(1, beta))
    else:
        a = np.float32(1) + np.float32(rng.beta(1, beta))
        b = -np.float32(rng.beta(1, beta))
    return float(a), float(b)


def add_mix(img1: torch.Tensor, img2: torch.Tensor, beta: float, rng: np.random.Generator) -> torch.Tensor:
    """Weighted sum in [−1, 1] space: ((a(2x−1) + b(2y−1)) + 1) / 2. Not clipped (pixmix clips)."""
    a, b = mix_weights(beta, rng)
    return (a * (img1 * 2 - 1) + b * (img2 * 2 - 1) + 1) / 2


def multiply_mix(img1: torch.Tensor, img2: torch.Tensor, beta: float, rng: np.random.Generator) -> torch.Tensor:
    """Weighted geometric mean in [0, 2] space: (2x)^a · max(2y, 1e-37)^b / 2 (the floor keeps a
    negative b finite). Not clipped (pixmix clips)."""
    a, b = mix_weights(beta, rng)
    return (img1 * 2) ** a * (img2 * 2).clamp(min=1e-37) ** b / 2


MIXINGS: tuple[MixFn, ...] = (add_mix, multiply_mix)


def _augmented(image: Image.Image, augment: Augment, rng: np.random.Generator) -> torch.Tensor:
    # the reference augments a copy: an op that edits its input in place must not touch the original
    out = augment(image.copy(), rng)
    if out.size != image.size:
        raise ValueError(f"pixmix: augment returned a {out.size[0]}x{out.size[1]} picture for a "
                         f"{image.size[0]}x{image.size[1]} image; it must keep the size")
    return to_tensor(out)


def pixmix(
    image: Image.Image,
    mixing_pic: Image.Image,
    rng: np.random.Generator,
    augment: Augment,
    *,
    k: int = IMAGENET_K,
    beta: float = IMAGENET_BETA,
    mixings: Sequence[MixFn] = MIXINGS,
) -> torch.Tensor:
    """One PixMix sample of `image` (float32 3×H×W in [0, 1]). `mixing_pic` must have the image's size
    (pick it with `MixingSet.pick(rng, size)`); `augment(picture, rng)` applies one random op."""
    if k < 0 or beta <= 0:
        raise ValueError(f"pixmix: need k >= 0 and beta > 0, got k={k}, beta={beta}")
    if mixing_pic.size != image.size:
        raise ValueError(f"pixmix: mixing picture is {mixing_pic.size[0]}x{mixing_pic.size[1]}, image is "
                         f"{image.size[0]}x{image.size[1]}; they must match")
    mixed = _augmented(image, augment, rng) if rng.random() < 0.5 else to_tensor(image)
    for _ in range(int(rng.integers(k + 1))):
        other = _augmented(image, augment, rng) if rng.random() < 0.5 else to_tensor(mixing_pic)
        op = mixings[int(rng.integers(len(mixings)))]
        mixed = op(mixed, other, beta, rng).clamp(0, 1)
    return mixed
