"""Noise corruptions. Gaussian, impulse and speckle noise are byte-identical to the reference for the
same seed: they draw exactly the reference's random numbers (`fast_rng` re-implements the legacy
streams and scikit-image's PCG64 `Generator`) and apply its float64 per-pixel arithmetic in one pass.

Shot noise is the one op that is *distributionally* identical instead (deliberate deviation): NumPy's
legacy Poisson sampler (multiplication method below rate 10, PTRS above) consumes a variable number of
uniforms per pixel in a strictly sequential, branchy loop; reproducing it draw for draw (we did, in
numba) costs ~4 ms per 224² image, a quarter of the whole fast engine, for no gain in the law. We
sample the same law, Poisson(x·photons)/photons per pixel with x = value/255, by inversion: one uniform
per pixel (the legacy MT stream of the seed) against the exact per-grey-level CDF (`scipy.special.pdtr`,
float64), found through a guide table. Same distribution, another realisation for a given seed;
`tests/test_corruptions.py` checks the per-level output distributions against the reference's.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit
from scipy.special import pdtr  # the Poisson CDF (scipy.stats.poisson.cdf without importing scipy.stats)

from robustify.corruptions.fast_kernels import scratch
from robustify.corruptions.fast_rng import (
    double_stream, normal_fill, pcg64_double, pcg64_lanes, pcg64_step, uniform_fill,
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


_GUIDE = 1024  # guide-table buckets per grey level: most buckets hold no CDF step, so no search


@lru_cache(maxsize=len(SHOT_PHOTONS))
def shot_tables(photons: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each grey level v: the CDF of Poisson((v/255)·photons) at counts 0..photons-1 (counts from
    `photons` on all give 255; a sentinel 2.0 closes the row), the guide table (first count whose CDF
    exceeds g/_GUIDE), and the output level `uint8(clip(k/photons, 0, 1)·255)` of each count k — the
    reference's final arithmetic."""
    rates = (np.arange(256) / 255.0) * photons
    cdf = np.ones((256, photons + 1))
    cdf[1:, :photons] = pdtr(np.arange(photons)[None, :], rates[1:, None])  # rate 0: always count 0
    cdf[:, photons] = 2.0  # sentinel above every uniform: the search needs no bounds check
    guide = np.stack([np.searchsorted(row, np.arange(_GUIDE) / _GUIDE, side="right") for row in cdf])
    levels = (np.clip(np.arange(photons + 1) / float(photons), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(cdf), guide.astype(np.uint8), levels


@njit(cache=True)
def _shot_sample(src: np.ndarray, u: np.ndarray, cdf: np.ndarray, guide: np.ndarray, levels: np.ndarray,
                 out: np.ndarray) -> None:
    """out[i] = levels[min{k : u[i] < cdf[src[i], k]}], starting from the guide table's count."""
    width = np.uint64(cdf.shape[1])
    steps = cdf.reshape(-1)
    buckets = guide.reshape(-1)
    for i in range(src.size):
        v = np.uint64(src[i])
        x = u[i]
        k = np.uint64(buckets[v * np.uint64(_GUIDE) + np.uint64(x * _GUIDE)])
        row = v * width
        while x >= steps[row + k]:
            k += np.uint64(1)
        out[i] = levels[k]


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
    u = scratch("shot-u", (src.size,), np.float64)
    uniform_fill(*double_stream(seed), u, 0.0, 1.0)
    _shot_sample(src, u, *shot_tables(SHOT_PHOTONS[severity - 1]), out.reshape(-1))
    return out


def impulse_noise(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """skimage `random_noise(mode='s&p', rng=seed)`: flip with `random() <= amount` over all values,
    then salt (`random() <= 0.5`) or pepper from a second pass of the same `Generator`."""
    src, out = _flat_op(image)
    flips, step = pcg64_lanes(seed, 0, 2)
    salts, _ = pcg64_lanes(seed, src.size, 2)
    _salt_and_pepper(src, flips, salts, step, IMPULSE_AMOUNT[severity - 1], _IDENTITY, out.reshape(-1))
    return out
