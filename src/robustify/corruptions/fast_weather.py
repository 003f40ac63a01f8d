"""Weather corruptions (snow, frost, fog, spatter), byte-identical to the reference for the same seed —
except frost's texture choice, which follows the original ImageNet-C (below).

Frost: the original `make_imagenet_c.py` draws `np.random.randint(5)`, i.e. only frost1..frost5 (its
file list names frost6.jpg but never reaches it); bethgelab's fork draws `randint(6)`, so one frost
image in six uses a texture ImageNet-C never contained. We follow the original. NumPy's `randint(5)`
and `randint(6)` mask the same 32-bit word with 7, so whenever the fork picks one of the first five
textures we pick the same one and consume the same words: the output is byte-identical to the fork's;
where the fork picks frost6 we draw again as the original did. The rest follows the fork, which the
original could not do at other sizes than 224: each texture is upscaled (bicubic) by 1.1 x the factor
that makes it cover the image (at 224 the original cropped the unscaled texture) and a random window
is cut out. The decoded, rescaled textures are cached per target shape.

Fog's plasma fractal (diamond-square) runs in numba with the reference's float32/float64 mix.
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache

import cv2
import numpy as np
from numba import njit

from robustify.corruptions.fast_blur import motion_taps
from robustify.corruptions.fast_kernels import (
    f32_div_255, gaussian_filter, motion_blur as shift_sum, scratch, zoom_linear,
)
from robustify.corruptions.fast_rng import WordStream, double_stream, next_double, normal_fill, uniform_fill

SNOW = (  # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # ImageNet-C's five
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # strength, wibble decay
SPATTER = (  # loc, scale, sigma, threshold, intensity / mud sigma, mud
    (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1),
)


# ----------------------------------------------------------------------------------------------- snow

@njit(cache=True)
def _threshold_unit(layer: np.ndarray, threshold: float) -> None:
    """layer[layer < threshold] = 0; clip to [0, 1] (in place)."""
    flat = layer.reshape(-1)
    for q in range(flat.size):
        v = flat[q]
        flat[q] = 0.0 if v < threshold else min(v, 1.0)


@njit(cache=True)
def _snow_compose(x: np.ndarray, gray: np.ndarray, streaks: np.ndarray, weight: float, out: np.ndarray) -> None:
    """s = round(streaks · 255) / 255 over the image window (the layer quantised to 8 bits);
    uint8(clip(w·x + (1-w)·max(x, 1.5·gray + 0.5) [float32] + s + rot180(s), 0, 1) · 255) [float64]."""
    h, w, c = x.shape
    layer = np.empty(h * w)
    for i in range(h):
        for j in range(w):
            layer[i * w + j] = np.uint8(np.rint(streaks[i, j] * 255)) / 255.0
    xs = x.reshape(-1)
    gs = gray.reshape(-1)
    dst = out.reshape(-1)
    wa = np.float32(weight)
    wb = np.float32(1 - weight)
    last = h * w - 1
    for p in range(h * w):
        lift = gs[p] * np.float32(1.5) + np.float32(0.5)
        flakes = layer[p]
        flakes_rot = layer[last - p]  # rot180 of the (h, w) window
        for ch in range(c):
            v = xs[c * p + ch]
            mixed = wa * v + wb * max(v, lift)
            t = (np.float64(mixed) + flakes) + flakes_rot
            dst[c * p + ch] = np.uint8(min(max(t, 0.0), 1.0) * 255.0)


def snow(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, weight = SNOW[severity - 1]
    h, w = image.shape[:2]
    mt, buf, pos = double_stream(seed)
    flakes = scratch("snow-flakes", (h, w, 1), np.float64)
    normal_fill(mt, buf, pos, flakes, loc, scale)
    ch, cw = int(np.ceil(h / float(zoom))), int(np.ceil(w / float(zoom)))
    top, left = (h - ch) // 2, (w - cw) // 2
    shape = (int(round(ch * zoom)), int(round(cw * zoom)))
    layer = scratch("snow-layer", (*shape, 1), np.float64)
    zoom_linear(flakes, (top, left, ch, cw), shape, layer)
    _threshold_unit(layer, threshold)
    angle = -135.0 + 90.0 * next_double(mt, buf, pos)  # np.random.uniform(-135, -45)
    dys, dxs, weights = motion_taps(radius, sigma, angle, shape[0], shape[1])
    streaks = scratch("snow-streaks", (*shape, 1), np.float64)
    shift_sum(layer, dys, dxs, weights, False, streaks)
    x = scratch("snow-x", image.shape, np.float32)
    f32_div_255(image, x)
    out = np.empty_like(image)
    _snow_compose(x, cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), streaks[:, :, 0], weight, out)
    return out


# ---------------------------------------------------------------------------------------------- frost

@lru_cache(maxsize=6)
def _frost_texture(index: int) -> np.ndarray:
    ref = importlib.resources.files("imagecorruptions") / "frost" / FROST_FILES[index]
    with importlib.resources.as_file(ref) as path:
        texture = cv2.imread(str(path))
    if texture is None:
        raise FileNotFoundError(f"frost texture {FROST_FILES[index]} missing from the imagecorruptions package")
    return texture


def _frost_size(texture_shape: tuple[int, ...], height: int, width: int) -> tuple[int, int]:
    """(width, height) the fork resizes a texture to: 1.1 x the factor that makes it cover the image
    (1 when it already does)."""
    fh, fw = texture_shape[:2]
    cover = max((need / have for need, have in ((height, fh), (width, fw)) if have < need), default=1)
    scale = cover * 1.1
    return int(np.ceil(fw * scale)), int(np.ceil(fh * scale))


def _frost_rescaled(index: int, height: int, width: int) -> np.ndarray:
    return _frost_resized(index, _frost_size(_frost_texture(index).shape, height, width))


@lru_cache(maxsize=16)
def _frost_resized(index: int, size: tuple[int, int]) -> np.ndarray:
    """Texture `index` resized (bicubic) to `size` = (width, height), as RGB; cached per size, which
    is the same for every image up to 315x485 (no texture needs more than the base 1.1x there)."""
    rescaled = cv2.resize(_frost_texture(index), dsize=size, interpolation=cv2.INTER_CUBIC)
    rescaled = np.ascontiguousarray(rescaled[..., ::-1])  # BGR -> RGB
    rescaled.setflags(write=False)
    return rescaled


def frost_choice(seed: int, height: int, width: int) -> tuple[int, int, int]:
    """(texture index in 0..4, crop top, crop left) drawn like `np.random.seed(seed); randint(5); ...`."""
    words = WordStream(seed)
    index = words.randint(0, len(FROST_FILES))
    fh, fw = _frost_rescaled(index, height, width).shape[:2]
    top = words.randint(0, fh - height)
    left = words.randint(0, fw - width)
    return index, top, left


@njit(cache=True)
def _blend_u8(x: np.ndarray, f: np.ndarray, wx: float, wf: float, out: np.ndarray) -> None:
    """uint8(clip(wx·x + wf·f, 0, 255)) in float64."""
    lut_x = np.empty(256)
    lut_f = np.empty(256)
    for v in range(256):
        lut_x[v] = wx * v
        lut_f[v] = wf * v
    h, w, c = x.shape
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                out[i, j, ch] = np.uint8(min(max(lut_x[x[i, j, ch]] + lut_f[f[i, j, ch]], 0.0), 255.0))


def frost(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    wx, wf = FROST[severity - 1]
    h, w = image.shape[:2]
    index, top, left = frost_choice(seed, h, w)
    crop = _frost_rescaled(index, h, w)[top:top + h, left:left + w]
    out = np.empty_like(image)
    _blend_u8(image, crop, float(wx), float(wf), out)
    return out


# ------------------------------------------------------------------------------------------------ fog

@njit(cache=True)
def plasma_fractal(mapsize: int, decay: float, mt: np.ndarray, buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Diamond-square heightmap in [0, 1] (float32): the reference's rolled-array sums element by
    element (float32), `sum / 4 + wibble · U(-wibble, wibble)` in float64 stored as float32, the
    uniform draws per pass in C order (squares, then both diamond sets), wibble /= decay per level."""
    size = mapsize
    m = np.zeros(size * size, np.float32)
    draws = np.empty(size * size // 4)
    step = size
    wibble = 100.0
    four = np.float32(4)
    while step >= 2:
        n = size // step
        half = step // 2
        span = wibble - (-wibble)
        # squares: centre (a·s + h, b·s + h) from the four corners (sums as np.roll builds them)
        uniform_fill(mt, buf, pos, draws[: n * n], 0.0, 1.0)
        for a in range(n):
            an = a + 1 if a + 1 < n else 0
            for b in range(n):
                bn = b + 1 if b + 1 < n else 0
                left = m[a * step * size + b * step] + m[an * step * size + b * step]
                right = m[a * step * size + bn * step] + m[an * step * size + bn * step]
                m[(a * step + half) * size + b * step + half] = \
                    (left + right) / four + wibble * (-wibble + span * draws[a * n + b])
        # diamonds on the corner rows: (a·s, b·s + h)
        uniform_fill(mt, buf, pos, draws[: n * n], 0.0, 1.0)
        for a in range(n):
            ap = a - 1 if a > 0 else n - 1
            for b in range(n):
                bn = b + 1 if b + 1 < n else 0
                dr = m[(a * step + half) * size + b * step + half] + m[(ap * step + half) * size + b * step + half]
                ul = m[a * step * size + b * step] + m[a * step * size + bn * step]
                m[a * step * size + b * step + half] = \
                    (dr + ul) / four + wibble * (-wibble + span * draws[a * n + b])
        # diamonds on the centre rows: (a·s + h, b·s)
        uniform_fill(mt, buf, pos, draws[: n * n], 0.0, 1.0)
        for a in range(n):
            an = a + 1 if a + 1 < n else 0
            for b in range(n):
                bp = b - 1 if b > 0 else n - 1
                dr = m[(a * step + half) * size + b * step + half] + m[(a * step + half) * size + bp * step + half]
                ul = m[a * step * size + b * step] + m[an * step * size + b * step]
                m[(a * step + half) * size + b * step] = \
                    (dr + ul) / four + wibble * (-wibble + span * draws[a * n + b])
        step //= 2
        wibble /= decay
    m -= m.min()
    return (m / m.max()).reshape(size, size)


@njit(cache=True)
def _fog_compose(image: np.ndarray, plasma: np.ndarray, strength: float, out: np.ndarray) -> None:
    """clip((x + float32(strength·plasma)) · max(x) / (max(x) + strength), 0, 1) · 255, x = image / 255."""
    h, w, c = image.shape
    src = image.reshape(-1)
    dst = out.reshape(-1)
    top = 0
    for q in range(src.size):
        top = max(top, src[q])
    max_val = top / 255.0
    denom = max_val + strength
    s32 = np.float32(strength)
    haze = np.empty(w * c)
    n = np.uint64(w * c)
    for i in range(h):
        for j in range(w):
            hz = np.float64(s32 * plasma[i, j])
            for ch in range(c):
                haze[j * c + ch] = hz
        row = np.uint64(i) * n
        for q in range(n):
            t = ((src[row + q] / 255.0 + haze[q]) * max_val) / denom
            dst[row + q] = np.uint8(min(max(t, 0.0), 1.0) * 255.0)


def fog(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    side = max(image.shape)
    mapsize = 1 if side == 0 else 2 ** (side - 1).bit_length()
    mt, buf, pos = double_stream(seed)
    plasma = plasma_fractal(mapsize, float(decay), mt, buf, pos)
    out = np.empty_like(image)
    _fog_compose(image, plasma, float(strength), out)
    return out


# -------------------------------------------------------------------------------------------- spatter

_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
_WATER = np.array([175, 238, 238], np.float32) / np.float32(255)  # pale turquoise, as float32 like the fork's
_MUD = np.array([63, 42, 20]) / 255.0  # brown, float64 like the fork's


def _water_relief(liquid: np.ndarray) -> np.ndarray:
    """Shading of the water drops (float32): distance to the drop outlines (Canny) capped at 20 px,
    3x3 box mean, histogram-equalised, embossed, 3x3 box mean — the fork's OpenCV chain, same calls."""
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    np.minimum(dist, 20, out=dist)
    relief = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    return cv2.blur(cv2.filter2D(relief, cv2.CV_8U, _EMBOSS), (3, 3)).astype(np.float32)


def spatter(image: np.ndarray, severity: int, seed: int) -> np.ndarray:
    """Water drops (severity 1-3) or mud (4-5) from a thresholded, Gaussian-smoothed normal field; the
    fork's arithmetic in its dtypes (the RGB image is float32; the water colour float32, the mud float64).
    Only the normal draws and the scikit-image Gaussian are swapped for their exact fast counterparts."""
    loc, scale, sigma, threshold, intensity, mud = SPATTER[severity - 1]
    h, w = image.shape[:2]
    x = np.asarray(image, dtype=np.float32) / 255.0
    liquid = np.empty((h, w))
    normal_fill(*double_stream(seed), liquid, loc, scale)
    liquid = gaussian_filter(liquid, (sigma, sigma))
    liquid[liquid < threshold] = 0
    if mud == 0:
        drops = (liquid * 255).astype(np.uint8)
        shade = drops * _water_relief(drops)
        shade /= shade.max()
        shade *= intensity
        out = np.clip(x + shade[..., None] * _WATER, 0, 1) * 255
    else:
        cover = gaussian_filter((liquid > threshold).astype(np.float32), (intensity, intensity), dtype=np.float32)
        cover[cover < 0.8] = 0
        x *= 1 - cover[..., None]
        out = np.clip(x + cover[..., None] * _MUD, 0, 1) * 255
    return out.astype(np.uint8)
