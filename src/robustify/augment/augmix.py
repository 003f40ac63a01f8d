"""AugMix and its Jensen–Shannon consistency loss (SPEC §3; ref google-research/augmix).

The small teachers of issue #6 are robustified with the paper's AugMix: `width` chains of 1–3 random ops
(`depth` U{1..3} unless fixed), mixed with Dirichlet(α) weights, then blended with the clean image by a
Beta(α, α) factor. The default op set is the reference's `augmentations` (9 ops); color, contrast,
brightness and sharpness overlap ImageNet-C and are only used with `all_ops=True` (the reference's
`--all-ops`). timm's `AugMixAugment` is not used: it draws magnitudes differently, translates relative
to a fixed constant and always includes the four overlapping ops. Its op *functions* make exactly the
PIL calls of the reference, so they are reused below; only the level → parameter mapping is ours.

Random draws come from the caller's `np.random.Generator`, in this order (the reference's order, with
its global `np.random` replaced): chain weights `dirichlet([α]·width)`, mixing factor `beta(α, α)`, then
per chain its depth `integers(1, 4)` (only when `depth <= 0`), and per op application the op index
`integers(len(ops))`, the level `uniform(0.1, severity)` and, for the geometric ops, one `uniform()`
whose value > 0.5 flips the sign.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as _aa
from timm.loss import JsdCrossEntropy

Op = Callable[[Image.Image, float], Image.Image]

_BILINEAR = Image.Resampling.BILINEAR
_MAX_LEVEL = 10.0  # the reference's PARAMETER_MAX: level/10 scales an op's maximal parameter


def int_parameter(level: float, maxval: float) -> int:
    """The reference's `int(level·maxval/10)`; `int` truncates toward zero, so a signed level gives the
    signed parameter the reference gets by negating after rounding."""
    return int(level * maxval / _MAX_LEVEL)


def float_parameter(level: float, maxval: float) -> float:
    return float(level) * maxval / _MAX_LEVEL


# ---- the ops: (image, level) with the level already sampled (and signed for the geometric ops) ----
# Geometric ops keep the reference's defaults: bilinear resampling, black fill, shear about the top-left
# corner, rotation about the centre. They produce an image of the input's size; the reference writes
# (IMAGE_SIZE, IMAGE_SIZE), the same thing for its square crops.


def autocontrast(image: Image.Image, level: float) -> Image.Image:
    return _aa.auto_contrast(image)


def equalize(image: Image.Image, level: float) -> Image.Image:
    return _aa.equalize(image)


def posterize(image: Image.Image, level: float) -> Image.Image:
    bits = 4 - int_parameter(level, 4)
    if bits < 1:
        # level 10 (severity 10 only): the reference's Pillow masked every bit away (a black image);
        # Pillow >= 10 rejects bits=0, so the result is written out instead.
        return Image.new(image.mode, image.size)
    return _aa.posterize(image, bits)


def rotate(image: Image.Image, level: float) -> Image.Image:
    return _aa.rotate(image, int_parameter(level, 30), resample=_BILINEAR)


def solarize(image: Image.Image, level: float) -> Image.Image:
    return _aa.solarize(image, 256 - int_parameter(level, 256))


def shear_x(image: Image.Image, level: float) -> Image.Image:
    return _aa.shear_x(image, float_parameter(level, 0.3), resample=_BILINEAR)


def shear_y(image: Image.Image, level: float) -> Image.Image:
    return _aa.shear_y(image, float_parameter(level, 0.3), resample=_BILINEAR)


def translate_x(image: Image.Image, level: float) -> Image.Image:
    # The reference's maximum shift is IMAGE_SIZE/3 pixels with IMAGE_SIZE the (square) crop size; we use
    # the actual width (and height for translate_y), identical for square crops and sensible otherwise.
    return _aa.translate_x_abs(image, int_parameter(level, image.width / 3), resample=_BILINEAR)


def translate_y(image: Image.Image, level: float) -> Image.Image:
    return _aa.translate_y_abs(image, int_parameter(level, image.height / 3), resample=_BILINEAR)


def color(image: Image.Image, level: float) -> Image.Image:
    return _aa.color(image, float_parameter(level, 1.8) + 0.1)


def contrast(image: Image.Image, level: float) -> Image.Image:
    return _aa.contrast(image, float_parameter(level, 1.8) + 0.1)


def brightness(image: Image.Image, level: float) -> Image.Image:
    return _aa.brightness(image, float_parameter(level, 1.8) + 0.1)


def sharpness(image: Image.Image, level: float) -> Image.Image:
    return _aa.sharpness(image, float_parameter(level, 1.8) + 0.1)


AUGMIX_OPS: dict[str, Op] = {
    "autocontrast": autocontrast,
    "equalize": equalize,
    "posterize": posterize,
    "rotate": rotate,
    "solarize": solarize,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}
# The reference's `augmentations_all`: adds the four ops that overlap ImageNet-C corruptions.
AUGMIX_ALL_OPS: dict[str, Op] = {
    **AUGMIX_OPS,
    "color": color,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
}
# Ops whose direction is random (the reference flips the sign with probability 1/2).
SIGNED_OPS: frozenset[str] = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 CHW in [0, 1] (torchvision's `to_tensor`)."""
    _check_image(image)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div(255)


def _check_image(image: object) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"augmix: expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"augmix: expected an RGB image, got mode '{image.mode}' (convert it when loading)")


def _check_options(severity: float, width: int, depth: int, alpha: float) -> None:
    if not 0.1 <= severity <= _MAX_LEVEL:
        # levels are drawn from U(0.1, severity); above 10 posterize would keep a negative number of bits
        raise ValueError(f"augmix: severity must be in [0.1, 10], got {severity}")
    if width < 1:
        raise ValueError(f"augmix: width must be >= 1, got {width}")
    if depth != -1 and depth < 1:
        # the reference reads any depth <= 0 as "random"; we accept only -1 so that 0 is not a silent alias
        raise ValueError(f"augmix: depth must be -1 (random in 1..3) or >= 1, got {depth}")
    if not alpha > 0:
        raise ValueError(f"augmix: alpha must be > 0, got {alpha}")


def augment_and_mix(
    image: Image.Image,
    rng: np.random.Generator,
    *,
    severity: float = 1,
    width: int = 3,
    depth: int = -1,
    alpha: float = 1.0,
    all_ops: bool = False,
) -> torch.Tensor:
    """One AugMix sample of an RGB image: float32 CHW in [0, 1], kept in float as the reference mixes.

    The reference mixes after `preprocess` (to-tensor + normalise). Normalisation is affine and the
    weights (1 − m) + m·Σwᵢ sum to 1, so mixing in [0, 1] and normalising later gives the same image.
    """
    _check_image(image)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"augmix: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    _check_options(severity, width, depth, alpha)
    ops = AUGMIX_ALL_OPS if all_ops else AUGMIX_OPS  # looked up per call, so tests can substitute them
    names = list(ops)

    ws = np.float32(rng.dirichlet([alpha] * width))  # float32 as in the reference
    m = np.float32(rng.beta(alpha, alpha))
    clean = image_to_tensor(image)
    mix = torch.zeros_like(clean)
    for i in range(width):
        chain_depth = depth if depth > 0 else int(rng.integers(1, 4))
        augmented = image
        for _ in range(chain_depth):
            name = names[int(rng.integers(len(names)))]
            level = float(rng.uniform(0.1, severity))
            if name in SIGNED_OPS and rng.uniform() > 0.5:
                level = -level
            augmented = ops[name](augmented, level)
        mix += float(ws[i]) * image_to_tensor(augmented)
    mixed = float(1 - m) * clean + float(m) * mix
    # Σwᵢ in float32 may exceed 1 by an ulp; clamping keeps the documented [0, 1] range (the reference
    # normalises instead and never needs the bound).
    return mixed.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class AugMix:
    """AugMix options (defaults: the ImageNet recipe of SPEC §3) and the JSD triple of the reference's
    `AugMixDataset`."""

    severity: float = 1.0
    width: int = 3
    depth: int = -1
    alpha: float = 1.0
    all_ops: bool = False

    def __post_init__(self) -> None:
        _check_options(self.severity, self.width, self.depth, self.alpha)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        return augment_and_mix(
            image, rng, severity=self.severity, width=self.width, depth=self.depth, alpha=self.alpha,
            all_ops=self.all_ops,
        )

    def splits(self, image: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean, aug1, aug2): the clean image and two independent AugMix samples, for `jsd_loss`."""
        return image_to_tensor(image), self(image, rng), self(image, rng)


def jsd_loss(
    logits_clean: torch.Tensor,
    logits_aug1: torch.Tensor,
    logits_aug2: torch.Tensor,
    labels: torch.Tensor,
    weight: float = 12.0,
) -> torch.Tensor:
    """CE(clean) + weight · JS(p_clean, p_aug1, p_aug2), the reference's loss: the mixture is clamped to
    [1e-7, 1] before the log and each KL(mixture ‖ pᵢ) is batch-averaged.

    timm's `JsdCrossEntropy` computes exactly this number when its label smoothing is 0 (its default 0.1
    is not the paper's), so it is used on the three splits concatenated along the batch.
    """
    if logits_clean.ndim != 2:
        raise ValueError(f"jsd_loss: logits must be (batch, classes), got logits_clean of shape {tuple(logits_clean.shape)}")
    for name, other in (("logits_aug1", logits_aug1), ("logits_aug2", logits_aug2)):
        if other.shape != logits_clean.shape:
            raise ValueError(
                f"jsd_loss: {name} has shape {tuple(other.shape)}, expected that of logits_clean {tuple(logits_clean.shape)}"
            )
    if labels.shape != logits_clean.shape[:1]:
        raise ValueError(f"jsd_loss: labels must have shape ({logits_clean.shape[0]},), got {tuple(labels.shape)}")
    loss = JsdCrossEntropy(num_splits=3, alpha=weight, smoothing=0.0)
    # timm takes the CE on the first split against target[:batch], so the clean labels suffice
    return loss(torch.cat([logits_clean, logits_aug1, logits_aug2]), labels)
