"""ImageNet-C corruption names and severities (hendrycks/robustness folder names), import-light so
that the Snakefile, the config validator and the metrics can use them without the engines."""

from __future__ import annotations

from collections.abc import Sequence

CORRUPTIONS: tuple[str, ...] = (  # the 15 test corruptions, in the paper's order
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # validation
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# ImageNet-P (make_imagenet_p.py): the ten test perturbations, averaged by mFR, and four validation ones.
PERTURBATIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
    "brightness", "translate", "rotate", "tilt", "scale",
)
EXTRA_PERTURBATIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "shear")
ALL_PERTURBATIONS: tuple[str, ...] = PERTURBATIONS + EXTRA_PERTURBATIONS


def _names(spec: str | Sequence[str], key: str, common: tuple[str, ...], every: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(spec, str):
        if spec not in ("common", "all"):
            raise ValueError(f"{key}: expected 'common', 'all' or a list of names, got {spec!r}")
        return common if spec == "common" else every
    unknown = [n for n in spec if n not in every]
    if unknown:
        raise ValueError(f"{key}: unknown name(s) {unknown} (known: {list(every)})")
    return tuple(spec)


def corruption_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`common` (the 15), `all` (15 + 4 extras) or an explicit list, checked against the known names."""
    return _names(spec, "corruptions", CORRUPTIONS, ALL_CORRUPTIONS)


def perturbation_names(spec: str | Sequence[str]) -> tuple[str, ...]:
    """`common` (the 10 ImageNet-P test perturbations), `all` (+ 4 validation) or an explicit list."""
    return _names(spec, "perturbations", PERTURBATIONS, ALL_PERTURBATIONS)
