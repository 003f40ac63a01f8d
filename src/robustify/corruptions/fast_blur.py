"""Blur corruptions: glass, motion, zoom and Gaussian blur byte-identical to the reference; defocus
within one grey level (float32 FFT correlation instead of the reference's float64 one).

Speed comes from doing the reference's arithmetic without its overheads: scikit-image's Gaussian is
SciPy's line-buffer correlation (re-done in `fast_kernels` with vectorisable loops); `zoom_blur`
interpolates only the window the reference keeps, with weights shared by a row instead of SciPy's
per-pixel spline setup; `motion_blur` accumulates the shifted copies row by row in cache instead of
allocating a full rolled image per tap; glass blur's sequential pixel swaps stay a numba loop but
draw their offsets from pre-generated MT19937 words instead of allocating a 2-vector per pixel.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from numba import njit

from robustify.corruptions.fast_kernels import (
    CLIP_TO_U8, TO_U8, gaussian_filter, motion_blur as shift_sum, scratch, zoom_linear,
)
from robustify.corruptions.fast_rng import MT_N, double_stream, fill_words, mt_seed, next_double

DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias sigma
GLASS = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max delta, iterations
MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
ZOOM_FACTORS = (
    np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03),
)
GAUSSIAN_SIGMA = (1, 2, 3, 4, 6)
_ONE, _TWO = np.uint64(1), np.uint64(2)


@lru_cache(maxsize=8)
def disk_kernel(radius: int, alias_blur: float) -> np.ndarray:
    """The reference's anti-aliased disk: a normalised binary disk on a >= 17x17 grid, smoothed by a
    3x3 (radius <= 8) or 5x5 Gaussian — same float32 steps, so the same kernel."""
    half = 8 if radius <= 8 else radius
    ksize = (3, 3) if radius <= 8 else (5, 5)
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    kernel = cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)
    kernel.setflags(write=False)
    return kernel


def defocus_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """OpenCV correlates uint8 input in float32 (FFT for kernels this size); the reference does the
    same in float64 on x / 255, so values next to an integer may truncate one level apart."""
    radius, alias = DEFOCUS[severity - 1]
    blurred = scratch("defocus", image.shape, np.float32)
    cv2.filter2D(image, cv2.CV_32F, disk_kernel(radius, alias), dst=blurred)
    np.clip(blurred, 0, 255, out=blurred)
    return blurred.astype(np.uint8)


@njit(cache=True)
def _glass_shuffle(x: np.ndarray, max_delta: int, iterations: int, seed: int) -> None:
    """The reference's local pixel shuffle of an (H, W, 3) uint8 image, in place: for every pixel,
    bottom-right to top-left, copy the pixel at a random offset (dx, dy) in [-max_delta, max_delta)
    onto it (the reference's tuple "swap" of two views is a one-way copy). Offsets are numba's
    `np.random.randint`: low bits of one MT word, rejected until in range, MT seeded like
    `np.random.seed(seed)`."""
    h, w, _ = x.shape
    c = 3
    flat = x.reshape(-1)
    n = 2 * max_delta
    nbits = 0
    while (1 << nbits) < n:
        nbits += 1
    mask = np.uint32((1 << nbits) - 1)
    shift = np.empty(n * n, np.int64)  # flat source offset per (dy, dx) draw pair
    for ry in range(n):
        for rx in range(n):
            shift[ry * n + rx] = ((ry - max_delta) * w + (rx - max_delta)) * c
    mt = mt_seed(seed)
    words = np.empty(16 * MT_N, np.uint32)
    k = words.size
    for _ in range(iterations):
        for hh in range(h - max_delta, max_delta, -1):
            for ww in range(w - max_delta, max_delta, -1):
                while True:
                    if k == words.size:
                        fill_words(mt, words)
                        k = 0
                    rx = words[k] & mask
                    k += 1
                    if rx < n:
                        break
                while True:
                    if k == words.size:
                        fill_words(mt, words)
                        k = 0
                    ry = words[k] & mask
                    k += 1
                    if ry < n:
                        break
                dst = (hh * w + ww) * 3
                src = np.uint64(dst + shift[np.int64(ry) * n + np.int64(rx)])
                at = np.uint64(dst)
                flat[at] = flat[src]  # RGB: the three copies spelled out (a short loop costs 2x)
                flat[at + _ONE] = flat[src + _ONE]
                flat[at + _TWO] = flat[src + _TWO]


def glass_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    sigma, max_delta, iterations = GLASS[severity - 1]
    shuffled = gaussian_filter(image, (sigma, sigma), out=scratch("glass", image.shape, np.uint8), how=TO_U8)
    _glass_shuffle(shuffled, max_delta, iterations, seed)
    return gaussian_filter(shuffled, (sigma, sigma), how=CLIP_TO_U8)


def motion_taps(radius: int, sigma: float, angle: float, height: int, width: int) -> tuple[np.ndarray, ...]:
    """(dy, dx, weight) of the fork's motion kernel: a one-sided Gaussian over 2·radius + 1 taps laid
    on the pixel grid along `angle`, cut at the first tap that would shift past the image."""
    size = 2 * radius + 1
    x = np.arange(size)
    kernel = np.exp(-(x**2) / (2 * (sigma**2))) / (np.sqrt(2 * np.pi) * sigma)
    kernel = kernel / np.sum(kernel)
    point = (size * np.sin(np.deg2rad(angle)), size * np.cos(np.deg2rad(angle)))
    hypot = math.hypot(point[0], point[1])
    dys, dxs = [], []
    for i in range(size):
        dy = -math.ceil(((i * point[0]) / hypot) - 0.5)
        dx = -math.ceil(((i * point[1]) / hypot) - 0.5)
        if abs(dy) >= height or abs(dx) >= width:
            break
        dys.append(dy)
        dxs.append(dx)
    return np.array(dys, np.int64), np.array(dxs, np.int64), np.ascontiguousarray(kernel[: len(dys)])


def motion_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    radius, sigma = MOTION[severity - 1]
    angle = -45.0 + 90.0 * next_double(*double_stream(seed))  # np.random.uniform(-45, 45)
    dys, dxs, weights = motion_taps(radius, sigma, angle, image.shape[0], image.shape[1])
    pixels = scratch("motion-src", image.shape, np.float64)  # converted once, not once per tap
    np.copyto(pixels, image)
    out = np.empty_like(image)
    shift_sum(pixels, dys, dxs, weights, True, out)
    return out


@njit(cache=True)
def _zoom_finish(x: np.ndarray, acc: np.ndarray, layers: int, out: np.ndarray) -> None:
    """out = uint8(clip((x + acc) / (layers + 1), 0, 1) · 255), all in float32 like the reference."""
    xs = x.reshape(-1)
    a = acc.reshape(-1)
    dst = out.reshape(-1)
    div = np.float32(layers + 1)
    for q in range(xs.size):
        v = (xs[q] + a[q]) / div
        dst[q] = np.uint8(min(max(v, np.float32(0.0)), np.float32(1.0)) * np.float32(255.0))


@njit(cache=True)
def _unit_as_f32(image: np.ndarray, x: np.ndarray) -> None:
    """x = (image / 255.).astype(float32): a float64 division, then rounded to float32."""
    src = image.reshape(-1)
    xs = x.reshape(-1)
    for q in range(src.size):
        xs[q] = np.float32(src[q] / 255.0)


def zoom_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    h, w = image.shape[:2]
    x = scratch("zoom-x", image.shape, np.float32)
    _unit_as_f32(image, x)
    acc = scratch("zoom-acc", image.shape, np.float32)
    acc.fill(0.0)
    factors = ZOOM_FACTORS[severity - 1]
    for z in factors:
        ch, cw = int(np.ceil(h / float(z))), int(np.ceil(w / float(z)))
        top, left = (h - ch) // 2, (w - cw) // 2
        zoom_linear(x, (top, left, ch, cw), (int(round(ch * z)), int(round(cw * z))), acc, accumulate=True)
    out = np.empty_like(image)
    _zoom_finish(x, acc, len(factors), out)
    return out


def gaussian_blur(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    sigma = GAUSSIAN_SIGMA[severity - 1]
    return gaussian_filter(image, (sigma, sigma), how=CLIP_TO_U8)
