"""Robustifying augmentation recipes on training batches (SPEC §3, paper §4.2 and Table 4).

A recipe is the composition a config names: DeepAugment on a random fraction of the rows (the
reference trains on ImageNet ∪ its DeepAugment copies, so those rows *are* the sample), then AugMix
and/or PixMix per image. Combinations: `augmix + deepaugment` (the paper's teacher recipe and its
augmented distillation data `D^a`), `pixmix`, `augmix + pixmix` (PixMix whose augmentation op is an
AugMix chain), each with or without DeepAugment.

Batches are float (B, 3, H, W) in [0, 1]; AugMix and PixMix are the reference's PIL ops, run per image
on the CPU. Every draw comes from the caller's generators: the DeepAugment rows and network from a
torch generator, each image's AugMix/PixMix draws from its own numpy generator seeded by
`row_seeds` (per global row of a step, so a DDP rank's rows are augmented as a single process would).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from PIL import Image

from robustify.augment.augmix import AUGMIX_OPS, SIGNED_OPS, AugMix, augment_and_mix
from robustify.augment.deepaugment import DeepAugment
from robustify.augment.mixing_set import MixingSet
from robustify.augment.pixmix import IMAGENET_BETA, IMAGENET_K, pixmix

_SECTIONS = {"augmix", "deepaugment", "pixmix"}
_DEEP_KEYS = {"kind", "weights", "max_eps", "fraction"}
_PIXMIX_KEYS = {"mixing_set", "k", "beta", "severity"}


@dataclass(frozen=True)
class PixMixOptions:
    """PixMix with pictures from `mixing_set` (a folder; the mini-world generates fractals). `severity`
    is the level bound of its single random op (the reference's `--aug-severity`, 1 for ImageNet)."""

    mixing_set: str
    k: int = IMAGENET_K
    beta: float = IMAGENET_BETA
    severity: float = 1.0

    @cached_property
    def pictures(self) -> MixingSet:
        return MixingSet(self.mixing_set)


def _to_pil(image: torch.Tensor) -> Image.Image:
    """float CHW in [0, 1] → RGB PIL (rounded to uint8, as decoding a saved image would be)."""
    array = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def random_op(picture: Image.Image, rng: np.random.Generator, severity: float = 1.0) -> Image.Image:
    """PixMix's `augment_input`: one AugMix op (the paper's set, without the ImageNet-C-overlapping
    four), level ~ U(0.1, severity), random sign for the directional ops."""
    names = list(AUGMIX_OPS)
    name = names[int(rng.integers(len(names)))]
    level = float(rng.uniform(0.1, severity))
    if name in SIGNED_OPS and rng.uniform() > 0.5:
        level = -level
    return AUGMIX_OPS[name](picture, level)


@dataclass(frozen=True)
class RobustRecipe:
    """What a robust training sample is: see the module docstring."""

    augmix: AugMix | None = None
    deepaugment: DeepAugment | None = None
    deepaugment_fraction: float = 0.5
    pixmix: PixMixOptions | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.deepaugment_fraction <= 1.0:
            raise ValueError(f"deepaugment.fraction must be in [0, 1], got {self.deepaugment_fraction}")
        if self.augmix is None and self.deepaugment is None and self.pixmix is None:
            raise ValueError("an augmentation recipe needs at least one of augmix, deepaugment, pixmix")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "augment") -> RobustRecipe:
        """From `{augmix: {...}|null, deepaugment: {kind, weights, max_eps, fraction}|null, pixmix: {...}|null}`."""
        unknown = sorted(set(params) - _SECTIONS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(_SECTIONS)})")
        am = params.get("augmix")
        deep = dict(params.get("deepaugment") or {})
        pm = params.get("pixmix")
        for name, section, keys in (("deepaugment", deep, _DEEP_KEYS), ("pixmix", pm or {}, _PIXMIX_KEYS)):
            bad = sorted(set(section) - keys)
            if bad:
                raise ValueError(f"{where}.{name}: unknown key(s) {bad} (allowed: {sorted(keys)})")
        try:
            augmix = None if am is None else AugMix(**am)
        except TypeError as e:
            raise ValueError(f"{where}.augmix: {e}") from None
        fraction = float(deep.pop("fraction", 0.5))
        deepaugment = DeepAugment(**deep) if params.get("deepaugment") is not None else None
        try:
            pix = None if pm is None else PixMixOptions(**pm)
        except TypeError as e:
            raise ValueError(f"{where}.pixmix: {e} (it needs mixing_set: a folder of pictures)") from None
        return cls(augmix, deepaugment, fraction, pix)

    @property
    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"augmix": None, "deepaugment": None, "pixmix": None}
        if self.augmix is not None:
            a = self.augmix
            out["augmix"] = {"severity": a.severity, "width": a.width, "depth": a.depth, "alpha": a.alpha,
                             "all_ops": a.all_ops}
        if self.deepaugment is not None:
            out["deepaugment"] = {**self.deepaugment.params, "fraction": self.deepaugment_fraction}
        if self.pixmix is not None:
            p = self.pixmix
            out["pixmix"] = {"mixing_set": p.mixing_set, "k": p.k, "beta": p.beta, "severity": p.severity}
        return out

    # ----------------------------------------------------------------------------------- batches
    def deep(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """DeepAugment on a random `deepaugment_fraction` of the rows (one freshly perturbed network
        per call); the other rows are returned unchanged."""
        if self.deepaugment is None or self.deepaugment_fraction == 0 or len(images) == 0:
            return images
        rows = (torch.rand(len(images), generator=gen) < self.deepaugment_fraction).nonzero().squeeze(1)
        if rows.numel() == 0:
            return images
        out = images.clone()
        rows = rows.to(images.device)
        out[rows] = self.deepaugment(images[rows], gen).to(images.dtype)
        return out

    def mix_one(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One AugMix / PixMix / AugMix+PixMix sample of a float CHW [0, 1] image (itself when the
        recipe is DeepAugment alone)."""
        if self.augmix is None and self.pixmix is None:
            return image
        picture = _to_pil(image)
        if self.pixmix is None:
            return self.augmix(picture, rng).to(image.device)
        p = self.pixmix
        if self.augmix is None:
            def op(pic: Image.Image, r: np.random.Generator) -> Image.Image:
                return random_op(pic, r, p.severity)
        else:
            augmix = self.augmix

            def op(pic: Image.Image, r: np.random.Generator) -> Image.Image:  # AugMix+PixMix
                return _to_pil(augment_and_mix(pic, r, severity=augmix.severity, width=augmix.width,
                                               depth=augmix.depth, alpha=augmix.alpha, all_ops=augmix.all_ops))
        mixing_pic = p.pictures.pick(rng, picture.size[0])
        return pixmix(picture, mixing_pic, rng, op, k=p.k, beta=p.beta).to(image.device)

    def mix(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """`mix_one` per row, row i with `np.random.default_rng(seeds[i])`."""
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        if self.augmix is None and self.pixmix is None:
            return images
        return torch.stack([self.mix_one(x, np.random.default_rng(int(s))) for x, s in zip(images, seeds)]) \
            if len(images) else images

    def __call__(self, images: torch.Tensor, gen: torch.Generator, seeds: Sequence[int]) -> torch.Tensor:
        """A robust sample of every row: DeepAugment on a fraction, then AugMix/PixMix."""
        return self.mix(self.deep(images, gen), seeds)


def row_seeds(gen_seed: int, first: int, n: int) -> list[int]:
    """Seeds of rows first..first+n of a step's global batch, from the step's seed (each row its own
    stream, so slicing the batch across DDP ranks does not change any row's draws)."""
    return [int(s) for s in np.random.SeedSequence(gen_seed).generate_state(first + n, dtype=np.uint64)[first:]]
