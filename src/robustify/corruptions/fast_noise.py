"""Noise corruptions, all byte-identical to the reference for the same seed: they draw exactly the
reference's random numbers (`fast_rng` re-implements the legacy MT19937 streams, NumPy's legacy normal and
Poisson samplers and scikit-image's PCG64 `Generator`) and apply its float64 per-pixel arithmetic in one
pass. Shot noise is `RandomState.poisson` draw for draw: its per-call constants depend only on the grey
level, so they are computed once per level (256 rates) instead of once per pixel.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit

from robustify.corruptions.fast_kernels import scratch
from robustify.corruptions.fast_rng import (
    double_stream, normal_fill, pcg64_double, pcg64_lanes, pcg64_step, poisson_constants, poisson_fill,
)

GAUSSIAN_SCALE = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_PHOTONS = (60, 25, 12, 5, 3)
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_SCALE = (0.15, 0.2, 0.35, 0.45, 0.6)
_IDENTITY = np.array([np.uint8(v / 255.0 * 255) for v in range(256)], np.uint8)  # (v/255)*255 truncated


@njit(cache=True, inline="always")
def _unit_to_u8(v: float) -> np.uint8:
    """`np.uint8(np.clip(v, 0, 1) * 255)` for one float64."""
    return np.uint8(min(max(v, 0.0), 1.0) * 255.0)


@njit(cache=True)
def _add_noise(src: np.ndarray, noise: np.ndarray, multiplicative: bool, out: np.ndarray) -> None:
    """x + n (gaussian noise) or x + x·n (speckle), x = src / 255, then to uint8 like the reference."""
    for i in range(src.size):
        x = src[i] / 255.0
        out[i] = _unit_to_u8(x + x * noise[i] if multiplicative else x + noise[i])


@lru_cache(maxsize=len(SHOT_PHOTONS))
def shot_tables(photons: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The Poisson constants, `loggam` table and PTRS bounds of the 256 rates `(v / 255) · photons` (the
    reference's float64 `x * c`), and the output level `uint8(clip(k / photons, 0, 1) · 255)` of each count
    k <= photons (larger counts clip to 255) — the reference's final arithmetic."""
    consts, loggams, bounds = poisson_constants((np.arange(256) / 255.0) * photons)
    levels = (np.clip(np.arange(photons + 1) / float(photons), 0, 1) * 255).astype(np.uint8)
    return consts, loggams, bounds, levels


@njit(cache=True)
def _counts_to_levels(counts: np.ndarray, levels: np.ndarray, out: np.ndarray) -> None:
    top = levels.size - 1
    for i in range(counts.size):
        out[i] = levels[min(counts[i], top)]


@njit(cache=True)
def _salt_and_pepper(src: np.ndarray, flips: np.ndarray, salts: np.ndarray, step: np.ndarray, amount: float,
                     identity: np.ndarray, out: np.ndarray) -> None:
    """Value i is flipped if draw i <= amount, to salt if draw n + i <= 0.5: two lanes of each of the
    two stretches of the stream (`pcg64_lanes`), four independent multiply chains."""
    n = src.size
    mh, ml, ih, il = step[0], step[1], step[2], step[3]
    fh0, fl0, fh1, fl1 = flips[0, 0], flips[0, 1], flips[1, 0], flips[1, 1]
    sh0, sl0, sh1, sl1 = salts[0, 0], salts[0, 1], salts[1, 0], salts[1, 1]
    for i in range(0, n, 2):
        if pcg64_double(fh0, fl0) <= amount:
            out[i] = 255 if pcg64_double(sh0, sl0) <= 0.5 else 0
        else:
            out[i] = identity[src[i]]
        if i + 1 < n:
            if pcg64_double(fh1, fl1) <= amount:
                out[i + 1] = 255 if pcg64_double(sh1, sl1) <= 0.5 else 0
            else:
                out[i + 1] = identity[src[i + 1]]
        fh0, fl0 = pcg64_step(fh0, fl0, mh, ml, ih, il)
        fh1, fl1 = pcg64_step(fh1, fl1, mh, ml, ih, il)
        sh0, sl0 = pcg64_step(sh0, sl0, mh, ml, ih, il)
        sh1, sl1 = pcg64_step(sh1, sl1, mh, ml, ih, il)


def _flat_op(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty_like(image)
    return np.ascontiguousarray(image).reshape(-1), out


def _normal_noise(image: np.ndarray, scale: float, multiplicative: bool, seed: int) -> np.ndarray:
    src, out = _flat_op(image)
    noise = scratch("normal-noise", (src.size,), np.float64)
    normal_fill(*double_stream(seed), noise, 0.0, scale)  # np.random.normal(size=..., scale=scale)
    _add_noise(src, noise, multiplicative, out.reshape(-1))
    return out


def gaussian_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    return _normal_noise(image, GAUSSIAN_SCALE[severity - 1], False, seed)


def speckle_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    return _normal_noise(image, SPECKLE_SCALE[severity - 1], True, seed)


def shot_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    src, out = _flat_op(image)
    consts, loggams, bounds, levels = shot_tables(SHOT_PHOTONS[severity - 1])
    counts = scratch("shot-counts", (src.size,), np.int64)
    poisson_fill(*double_stream(seed), src, consts, loggams, bounds, counts)
    _counts_to_levels(counts, levels, out.reshape(-1))
    return out


def impulse_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """skimage `random_noise(mode='s&p', rng=seed)`: flip with `random() <= amount` over all values,
    then salt (`random() <= 0.5`) or pepper from a second pass of the same `Generator`."""
    src, out = _flat_op(image)
    flips, step = pcg64_lanes(seed, 0, 2)
    salts, _ = pcg64_lanes(seed, src.size, 2)
    _salt_and_pepper(src, flips, salts, step, IMPULSE_AMOUNT[severity - 1], _IDENTITY, out.reshape(-1))
    return out
