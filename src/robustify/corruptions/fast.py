"""The `fast` engine: the registry of the 19 corruptions, and the digital ones (brightness, contrast,
saturate, elastic, pixelate, JPEG).

Fidelity to the `reference` engine (bethgelab's fork) for the same seed, checked for every op and
severity by `tests/test_corruptions.py`: byte-identical for every op except two —
* `defocus_blur`: at most one grey level apart (OpenCV's float32 FFT correlation, `fast_blur.py`);
* `frost`: texture set of the original ImageNet-C (five, not the fork's six): identical whenever the
  fork draws one of those five, see `fast_weather.py`.

Where the fork differs from the original ImageNet-C code (hendrycks/robustness `make_imagenet_c.py`)
we follow the fork, as the reference engine does, except for frost's texture set:
* motion blur and snow's streaks: the fork's Gaussian shift-and-add replaces ImageMagick's
  `MagickMotionBlurImage` (not reproducible without ImageMagick);
* elastic transform: the fork's version (Gaussian-smoothed uniform displacements of up to 0.5 % of the
  height, sigma 1 % of the size, alpha 12.5-30, no random affine pre-warp) is a different algorithm;
* pixelate: the fork upsamples with NEAREST where the original used BOX;
* frost: the fork rescales every texture by >= 1.1 before cropping (the original cropped 224 px from
  the unscaled texture);
* zoom blur / snow / fog / glass blur: generalised to any size >= 32 px (top-left window of the zoomed
  crop, plasma map of the next power of two, shuffle over the whole image), equal to the original at
  224 px; glass blur draws its offsets from numba's RNG instead of NumPy's.
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO

import cv2
import numpy as np
from numba import njit
from PIL import Image

from robustify.corruptions.fast_blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from robustify.corruptions.fast_kernels import REFLECT, f32_div_255, gaussian_filter, map_linear_reflect, scratch
from robustify.corruptions.fast_noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from robustify.corruptions.fast_rng import double_stream, uniform_fill
from robustify.corruptions.fast_weather import fog, frost, snow, spatter
from robustify.corruptions.names import ALL_CORRUPTIONS

BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # S·a + b
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)


@njit(cache=True)
def _hsv_adjust(image: np.ndarray, channel: int, scale: float, offset: float, out: np.ndarray) -> None:
    """scikit-image `rgb2hsv` → channel (1 = S, 2 = V) := clip(channel·scale + offset, 0, 1) →
    `hsv2rgb` → uint8(clip(·, 0, 1)·255), per pixel with scikit-image's float64 expressions (its
    `% 1.0` of a hue in (-1, 1) is `h + 1` for negative h: same value as NumPy's remainder)."""
    unit = np.empty(256)
    for v in range(256):
        unit[v] = v / 255.0
    src = image.reshape(-1)
    dst = out.reshape(-1)
    for p in range(src.size // 3):
        r = unit[src[3 * p]]
        g = unit[src[3 * p + 1]]
        b = unit[src[3 * p + 2]]
        v = max(r, g, b)
        delta = v - min(r, g, b)
        hue = 0.0
        sat = 0.0
        if delta != 0.0:
            sat = delta / v
            if b == v:
                hue = 4.0 + (r - g) / delta
            elif g == v:
                hue = 2.0 + (b - r) / delta
            else:
                hue = (g - b) / delta
            hue = hue / 6.0
            if hue < 0.0:
                hue += 1.0
        if channel == 1:
            sat = min(max(sat * scale + offset, 0.0), 1.0)
        else:
            v = min(max(v * scale + offset, 0.0), 1.0)
        hi = np.floor(hue * 6)
        f = hue * 6 - hi
        pp = v * (1 - sat)
        q = v * (1 - f * sat)
        t = v * (1 - (1 - f) * sat)
        sector = int(hi) % 6
        if sector == 0:
            x, y, z = v, t, pp
        elif sector == 1:
            x, y, z = q, v, pp
        elif sector == 2:
            x, y, z = pp, v, t
        elif sector == 3:
            x, y, z = pp, q, v
        elif sector == 4:
            x, y, z = t, pp, v
        else:
            x, y, z = v, pp, q
        dst[3 * p] = np.uint8(min(max(x, 0.0), 1.0) * 255.0)
        dst[3 * p + 1] = np.uint8(min(max(y, 0.0), 1.0) * 255.0)
        dst[3 * p + 2] = np.uint8(min(max(z, 0.0), 1.0) * 255.0)


def brightness(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    out = np.empty_like(image)
    _hsv_adjust(image, 2, 1.0, BRIGHTNESS[severity - 1], out)
    return out


def saturate(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    scale, offset = SATURATE[severity - 1]
    out = np.empty_like(image)
    _hsv_adjust(image, 1, float(scale), float(offset), out)
    return out


@njit(cache=True)
def _channel_means(image: np.ndarray) -> np.ndarray:
    """`np.mean(image / 255., axis=(0, 1))` bit for bit: NumPy reduces non-contiguous axes by a plain
    running sum in memory order (no pairwise summation), then divides by the count."""
    unit = np.empty(256)
    for v in range(256):
        unit[v] = v / 255.0
    h, w, c = image.shape
    sums = np.zeros(c)
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                sums[ch] += unit[image[i, j, ch]]
    return sums / (h * w)


def contrast(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """A per-channel 256-entry table of the reference's float64 expression, applied with `cv2.LUT`."""
    factor = CONTRAST[severity - 1]
    means = _channel_means(image)
    levels = np.arange(256)[:, None] / 255.0
    table = np.clip((levels - means) * factor + means, 0, 1) * 255
    return cv2.LUT(image, table.astype(np.uint8).reshape(256, 1, 3))


@njit(cache=True)
def _unit32_to_u8(x: np.ndarray, out: np.ndarray) -> None:
    flat = x.reshape(-1)
    dst = out.reshape(-1)
    for i in range(flat.size):
        dst[i] = np.uint8(min(max(flat[i], np.float32(0.0)), np.float32(1.0)) * np.float32(255.0))


@njit(cache=True)
def _scaled_f32(values: np.ndarray, factor: float, out: np.ndarray) -> None:
    """out = (values * factor).astype(float32)."""
    v = values.reshape(-1)
    o = out.reshape(-1)
    for q in range(v.size):
        o[q] = np.float32(v[q] * factor)


def elastic_transform(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """The fork's elastic transform: uniform displacement fields (±0.5 % of the height) smoothed by a
    Gaussian of 1 % of the image size (reflect, truncate 3), scaled by alpha, applied with bilinear
    `map_coordinates(mode='reflect')`."""
    h, w = image.shape[:2]
    alpha = ELASTIC_ALPHA[severity - 1]
    sigma = (h * 0.01, w * 0.01)
    max_d = h * 0.005
    mt, buf, pos = double_stream(seed)
    noise = scratch("elastic-noise", (h, w), np.float64)
    smooth = scratch("elastic-smooth", (h, w), np.float64)
    fields = []
    for tag in ("elastic-dx", "elastic-dy"):  # drawn in this order by the reference
        uniform_fill(mt, buf, pos, noise, -max_d, max_d)
        gaussian_filter(noise, sigma, mode=REFLECT, truncate=3, out=smooth)
        field = scratch(tag, (h, w), np.float32)
        _scaled_f32(smooth, alpha, field)
        fields.append(field)
    dx, dy = fields
    src = scratch("elastic-src", image.shape, np.float32)
    f32_div_255(image, src)
    warped = scratch("elastic-warped", image.shape, np.float32)
    map_linear_reflect(src, dy, dx, warped)
    out = np.empty_like(image)
    _unit32_to_u8(warped, out)
    return out


def pixelate(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    factor = PIXELATE[severity - 1]
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((int(w * factor), int(h * factor)), Image.BOX)
    return np.asarray(small.resize((w, h), Image.NEAREST))


def jpeg_compression(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Pillow's encoder and decoder, as the reference uses (libjpeg's quality-scaled tables)."""
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


CORRUPTION_FUNCTIONS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    fn.__name__: fn for fn in (
        gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur,
        snow, frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression,
        speckle_noise, gaussian_blur, spatter, saturate,
    )
}
assert tuple(CORRUPTION_FUNCTIONS) == ALL_CORRUPTIONS, "fast registry out of sync with names.ALL_CORRUPTIONS"
