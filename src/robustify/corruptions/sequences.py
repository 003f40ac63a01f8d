"""ImageNet-P perturbation sequences for any RGB image.

Re-implements the frame generators of hendrycks/robustness `ImageNet-P/create_p/make_imagenet_p.py`
(test perturbations and the four validation ones) so that flip probability / mFR can be measured on any
data set (SPEC §5). Parameters, frame counts and the random/deterministic structure follow that script:

==============  ======  ==========================================================================
perturbation    frames  frame i
==============  ======  ==========================================================================
gaussian_noise  31      0: clean; 1..30: independent draws x + N(0, σ), σ = .03/.05/.08 (difficulty)
shot_noise      31      0: clean; 1..30: independent draws Poisson(λx)/λ, λ = 300/120/60
speckle_noise   31      0: clean; 1..30: independent draws x + x·N(0, σ), σ = .05/.10/.15
motion_blur     31      ImageMagick motion blur radius 10, sigma 3, angle (i-30)·4° (-120°..0°)
zoom_blur       31      running mean of zooms 1 + .004j about the centre, j = 0..i
snow            31      one fixed snow layer, streaked by motion blur radius 14, sigma 4, angle 4i-150°
brightness      31      HSV value + (i-15)·.02
translate       41      horizontal shift by i-20 pixels (content moves right for i > 20)
rotate          31      rotation by i-15 degrees (clockwise, torchvision 0.2 convention)
tilt            31      perspective view of the plane rotated by i-15 degrees about both axes
scale           31      zoom by (40 + 2.5i)/100 about the centre (0.40..1.15)
gaussian_blur   31      Gaussian blur sigma .25 + .035i (truncate 6, edge replicated)
spatter         31      one liquid layer, dripping down (column filter [.05 .1 .15 .7]) frame by frame
shear           31      torchvision 0.2 shear by i-15 degrees
==============  ======  ==========================================================================

Difficulty follows `ImageNet-P/test.py`: for the *noise* perturbations (names containing "noise", listed in
`NOISE_PERTURBATIONS`) it selects the noise level of a separate sequence set and flips are counted against
the first (clean) frame with step 1; for every other perturbation the sequence is the same at every
difficulty and the difficulty is the comparison step (frames `difficulty` apart, over the interleaved
subsequences). `flip_step` gives that step for `robustify.eval.metrics.flip_probability(noise=..., step=...)`.

Deviations from the original, and why:

* Any image size. The original worked on 224x224 crops of a Resize(256) image. Lengths in pixels are
  multiplied by ``s = min(H, W) / 224`` (H, W: output frame size): translate offsets, the motion-blur radius
  and sigma, the tilt's unit depth and the Gaussian-blur sigma. Snow and spatter, whose look depends on many
  pixel constants (noise grain, zoom, streak length, Canny/distance thresholds, drip speed), are computed
  exactly as the original at the reference resolution (shorter side 224) and their layer is resized to the
  image. At 224 every parameter is the original's.
* Surround. Geometric perturbations (zoom_blur, translate, rotate, tilt, scale, shear) were applied to the
  whole Resize(256) image and then centre-cropped, so content beyond the crop moved in. Pass ``crop=`` to do
  the same (give the Resize(256) image and ``crop=224`` to reproduce ImageNet-P); without it the image is its
  own crop and uncovered areas are black, as the original's own borders were.
* Translate uses bilinear interpolation instead of nearest: the original's 1-pixel steps become fractional
  at other sizes and nearest would repeat frames. Integer offsets (all of them at 224) are exact shifts.
* ImageMagick's MotionBlurImage (via Wand) is replaced by its kernel: one-sided, Gaussian taps
  ``exp(-i²/2σ²)`` for i < 2·ceil(radius)+1, tap i sampled at ``round-half-down(i·(cos a, sin a))``, edge
  pixels replicated (ImageMagick's default virtual pixels), result rounded to 8 bits - the same construction
  as the bethgelab `imagecorruptions` package, but without its early stop at the image border.
* Geometric transforms turn about the exact image centre; torchvision 0.2 used a centre half a pixel off and
  the tilt matrix used (w/2, h/2) in pixel-index coordinates. Bilinear sampling is OpenCV's, not PIL's.
* The original wrote PNG frames and encoded them to H.264 mp4 (lossy, `-crf 20` / `-tune grain`); raw
  frames are returned here, so no codec artefacts are added.
* Randomness comes from ``np.random.default_rng(seed)`` (the original used global NumPy/torch state), so a
  sequence is reproducible per image and the global RNG is never touched.
* Float→uint8 conversions truncate as the original's casts did, with a 1e-4 guard so that values which are
  exactly integral (e.g. brightness + 0) are not lost to floating-point error. Spatter guards the division
  by the layer maximum when the layer is empty (the original would produce NaNs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import zoom as _scipy_zoom

# The 10 test perturbations (averaged by mFR), the 4 validation ones, and both.
from robustify.corruptions.names import ALL_PERTURBATIONS, EXTRA_PERTURBATIONS, PERTURBATIONS  # noqa: F401

REFERENCE_SIZE = 224
"""Crop size the original's pixel constants refer to."""

NOISE_PERTURBATIONS: frozenset[str] = frozenset(p for p in ALL_PERTURBATIONS if "noise" in p)
"""Flips measured against the first frame; test.py decides this with ``'noise' in name``, so do we."""

DIFFICULTIES: tuple[int, ...] = (1, 2, 3)

_EPS = 1e-4
_GAUSSIAN_SIGMA = {1: 0.03, 2: 0.05, 3: 0.08}
_SHOT_LAMBDA = {1: 300.0, 2: 120.0, 3: 60.0}
_SPECKLE_SIGMA = {1: 0.05, 2: 0.10, 3: 0.15}
_N_NOISY = 30  # noise sequences: clean frame + 30 noisy ones


@dataclass(frozen=True)
class _Spec:
    fn: Callable[[np.ndarray, float, np.random.Generator, int], np.ndarray]
    length: int
    geometric: bool  # applied before the centre crop, as the original did on the Resize(256) image


# --------------------------------------------------------------------------- helpers


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Truncating cast on a 0..255 scale (the original's `np.uint8(x * 255)` / `tensor.byte()`)."""
    return np.floor(np.clip(a, 0.0, 255.0) + _EPS).astype(np.uint8)


def _centre(h: int, w: int) -> np.ndarray:
    return np.array([(w - 1) / 2.0, (h - 1) / 2.0])


def _warp_affine(img: np.ndarray, a: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """`p_out = c + shift + a·(p_in - c)` about the image centre c, bilinear, black outside."""
    h, w = img.shape[:2]
    c = _centre(h, w)
    m = np.hstack([a, (c + np.asarray(shift) - a @ c)[:, None]])
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _tv_affine(angle: float = 0.0, scale: float = 1.0, shear: float = 0.0) -> np.ndarray:
    """torchvision 0.2 `affine` linear part (degrees): rotation clockwise on screen, shear as an extra
    rotation of the y axis - the convention ImageNet-P was generated with."""
    a, sh = math.radians(angle), math.radians(shear)
    return scale * np.array([[math.cos(a), -math.sin(a + sh)], [math.sin(a), math.cos(a + sh)]])


def _motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """2-D correlation kernel equal to ImageMagick's MotionBlurImage(radius, sigma, angle)."""
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width, dtype=np.float64)
    taps = np.exp(-(i**2) / (2.0 * sigma**2))
    taps /= taps.sum()
    # ImageMagick's own arithmetic (DegreesToRadians, then i*point/hypot): angles such as -150 put taps on
    # exact .5 ties, where the rounding order decides the offset.
    rad = math.pi * angle / 180.0
    px, py = width * math.sin(rad), width * math.cos(rad)
    hyp = math.hypot(px, py)
    ox = np.ceil(i * py / hyp - 0.5).astype(int)
    oy = np.ceil(i * px / hyp - 0.5).astype(int)
    k = np.zeros((2 * width - 1, 2 * width - 1), np.float32)
    np.add.at(k, (width - 1 + oy, width - 1 + ox), taps)
    return k


def _motion_blur(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Motion-blurred copy of a uint8 image, rounded to uint8 like ImageMagick's 8-bit output."""
    out = cv2.filter2D(img.astype(np.float32), -1, _motion_kernel(radius, sigma, angle),
                       borderType=cv2.BORDER_REPLICATE)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _reference_shape(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, round(h / s)), max(1, round(w / s))


def _resize_stack(stack: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize (h', w', n) float32 layers to (h, w, n); area when shrinking, bilinear when growing."""
    if stack.shape[:2] == (h, w):
        return stack
    interp = cv2.INTER_AREA if h * w < stack.shape[0] * stack.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(stack[..., k], (w, h), interpolation=interp) for k in range(stack.shape[2])], -1)


def _clipped_zoom(a: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of a 2-D array by `factor` (linear), keeping its shape; non-square generalisation
    of the original's `clipped_zoom`."""
    h, w = a.shape
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    z = _scipy_zoom(a[top:top + ch, left:left + cw], factor, order=1)
    tt, tl = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
    return z[tt:tt + h, tl:tl + w]


def _with_clean_frame(img: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    return np.concatenate([img[None], _to_uint8(noisy)], axis=0)


# --------------------------------------------------------------------------- perturbations
# Each takes (image uint8 HxWx3, s = output_short_side / 224, rng, difficulty) -> (T, H, W, 3) uint8.


def _gaussian_noise(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    n = rng.standard_normal((_N_NOISY, *img.shape), dtype=np.float32)
    return _with_clean_frame(img, img.astype(np.float32) + (255.0 * _GAUSSIAN_SIGMA[d]) * n)


def _shot_noise(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    lam = _SHOT_LAMBDA[d]
    counts = rng.poisson(img.astype(np.float64) * (lam / 255.0), size=(_N_NOISY, *img.shape))
    return _with_clean_frame(img, counts * (255.0 / lam))


def _speckle_noise(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    n = rng.standard_normal((_N_NOISY, *img.shape), dtype=np.float32)
    return _with_clean_frame(img, img.astype(np.float32) * (1.0 + _SPECKLE_SIGMA[d] * n))


def _motion_blur_seq(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    return np.stack([_motion_blur(img, 10 * s, 3 * s, (i - 30) * 4) for i in range(31)])


def _zoom_blur(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    # Integer running sum then floor division: the original's truncated float mean, without float error.
    frames = np.empty((31, *img.shape), np.uint8)
    frames[0] = img
    running = img.astype(np.uint32)
    for i in range(1, 31):
        running += _warp_affine(img, (1 + 0.004 * i) * np.eye(2))
        frames[i] = running // (i + 1)
    return frames


def _snow(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    h, w = img.shape[:2]
    hr, wr = _reference_shape(h, w, s)
    layer = _clipped_zoom(rng.normal(0.05, 0.3, size=(hr, wr)), 3)
    layer[layer < 0.5] = 0
    layer8 = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    streaks = np.stack([_motion_blur(layer8, 14, 4, 4 * i - 150) for i in range(31)], axis=-1)
    streaks = _resize_stack(streaks.astype(np.float32) / 255.0, h, w).transpose(2, 0, 1)[..., None]
    x = img.astype(np.float32) / 255.0
    grey = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    base = 0.85 * x + 0.15 * np.maximum(x, grey * 1.5 + 0.5)
    return _to_uint8((base[None] + streaks + streaks[:, ::-1, ::-1]) * 255.0)


def _brightness(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    # Adding c to HSV value keeps hue and saturation, i.e. scales RGB by V'/V (black becomes grey V').
    x = img.astype(np.float32)
    v = x.max(axis=-1, keepdims=True)[None]
    shift = ((np.arange(31, dtype=np.float32) - 15) * 0.02 * 255.0)[:, None, None, None]
    v_new = np.clip(v + shift, 0.0, 255.0)
    ratio = np.divide(v_new, v, out=np.zeros_like(v_new), where=v > 0)
    return _to_uint8(np.where(v > 0, x[None] * ratio, v_new))


def _translate(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    return np.stack([_warp_affine(img, np.eye(2), ((i - 20) * s, 0.0)) for i in range(41)])


def _rotate(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    return np.stack([_warp_affine(img, _tv_affine(angle=i - 15)) for i in range(31)])


def _tilt_matrix(h: int, w: int, angle: float, depth: float) -> np.ndarray:
    """Homography of the original: centre the plane at depth `depth`, rotate it about x and y by `angle`
    (the original's RX·RY), push it to distance f = diag and project with focal length f."""
    t = math.radians(angle)
    f = math.hypot(w, h)
    cx, cy = _centre(h, w)
    rx = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    ry = np.array([[math.cos(t), 0, -math.sin(t)], [0, 1, 0], [math.sin(t), 0, math.cos(t)]])
    lift = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, depth]])
    cam = rx @ ry @ lift + np.array([[0, 0, 0], [0, 0, 0], [0, 0, f]])
    k = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
    return k @ cam


def _tilt(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    h, w = img.shape[:2]
    return np.stack([
        cv2.warpPerspective(img, _tilt_matrix(h, w, i - 15, s), (w, h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        for i in range(31)
    ])


def _scale(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    return np.stack([_warp_affine(img, _tv_affine(scale=(40 + 2.5 * i) / 100)) for i in range(31)])


def _gaussian_blur(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    x = img.astype(np.float32)
    frames = []
    for i in range(31):
        sigma = (0.25 + 0.035 * i) * s
        k = 2 * int(6.0 * sigma + 0.5) + 1  # skimage/scipy truncate=6 radius
        frames.append(cv2.GaussianBlur(x, (k, k), sigma, borderType=cv2.BORDER_REPLICATE))
    return _to_uint8(np.stack(frames))


_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
_WATER = np.array([175, 238, 238], np.float32) / 255.0  # pale turquoise


def _spatter_mask(liquid: np.ndarray) -> np.ndarray:
    """Shaded liquid mask of one frame (the original's Canny/distance/emboss pipeline), max 0.6."""
    li = np.clip(liquid * 255, 0, 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(li, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, _EMBOSS), (3, 3)).astype(np.float32)
    m = li * dist
    peak = m.max()
    return m * (0.6 / peak) if peak > 0 else m


def _drip(liquid: np.ndarray) -> np.ndarray:
    """np.convolve(column, [.05, .1, .15, .7], 'same') on every column: out[n] = .05a[n+1] + .1a[n]
    + .15a[n-1] + .7a[n-2] (zero outside), so the liquid runs down ~1.5 rows a frame."""
    p = np.pad(liquid, ((2, 1), (0, 0)))
    return 0.05 * p[3:] + 0.1 * p[2:-1] + 0.15 * p[1:-2] + 0.7 * p[:-3]


def _spatter(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    h, w = img.shape[:2]
    liquid = cv2.GaussianBlur(rng.normal(0.65, 0.27, size=_reference_shape(h, w, s)), (0, 0), 3.7,
                              borderType=cv2.BORDER_REPLICATE)
    liquid[liquid < 0.69] = 0
    masks = []
    for _ in range(31):
        masks.append(_spatter_mask(liquid))
        liquid = _drip(liquid)
    m = _resize_stack(np.stack(masks, axis=-1).astype(np.float32), h, w).transpose(2, 0, 1)[..., None]
    return _to_uint8(img.astype(np.float32)[None] + m * (255.0 * _WATER))


def _shear(img: np.ndarray, s: float, rng: np.random.Generator, d: int) -> np.ndarray:
    return np.stack([_warp_affine(img, _tv_affine(shear=i - 15)) for i in range(31)])


_REGISTRY: dict[str, _Spec] = {
    "gaussian_noise": _Spec(_gaussian_noise, 1 + _N_NOISY, False),
    "shot_noise": _Spec(_shot_noise, 1 + _N_NOISY, False),
    "motion_blur": _Spec(_motion_blur_seq, 31, False),
    "zoom_blur": _Spec(_zoom_blur, 31, True),
    "snow": _Spec(_snow, 31, False),
    "brightness": _Spec(_brightness, 31, False),
    "translate": _Spec(_translate, 41, True),
    "rotate": _Spec(_rotate, 31, True),
    "tilt": _Spec(_tilt, 31, True),
    "scale": _Spec(_scale, 31, True),
    "speckle_noise": _Spec(_speckle_noise, 1 + _N_NOISY, False),
    "gaussian_blur": _Spec(_gaussian_blur, 31, False),
    "spatter": _Spec(_spatter, 31, False),
    "shear": _Spec(_shear, 31, True),
}
assert set(_REGISTRY) == set(ALL_PERTURBATIONS)


# --------------------------------------------------------------------------- public API


def _spec(name: str, difficulty: int) -> _Spec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown perturbation {name!r}; valid: {', '.join(ALL_PERTURBATIONS)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty for {name!r} must be one of {DIFFICULTIES}, got {difficulty!r}")
    return _REGISTRY[name]


def is_noise(name: str) -> bool:
    """Whether flips are counted against the first frame (noise) rather than between neighbours."""
    _spec(name, 1)
    return name in NOISE_PERTURBATIONS


def sequence_length(name: str, difficulty: int = 1) -> int:
    """Frames in a sequence: 31, except translate (41, shifts -20..20)."""
    return _spec(name, difficulty).length


def flip_step(name: str, difficulty: int = 1) -> int:
    """Comparison step for `flip_probability`: test.py uses 1 for noise (difficulty picks the noise level)
    and the difficulty itself for every other perturbation."""
    _spec(name, difficulty)
    return 1 if name in NOISE_PERTURBATIONS else difficulty


def _centre_crop(frames: np.ndarray, ch: int, cw: int) -> np.ndarray:
    h, w = frames.shape[-3:-1]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))  # torchvision CenterCrop
    return frames[..., top:top + ch, left:left + cw, :]


def make_sequence(
    image: np.ndarray,
    name: str,
    seed: int,
    difficulty: int = 1,
    *,
    crop: int | tuple[int, int] | None = None,
) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of ImageNet-P perturbation `name` applied to `image` (H, W, 3) uint8.

    Deterministic in `seed` (only noise, snow and spatter draw random numbers; others ignore it). For
    non-noise perturbations `difficulty` does not change the frames - it is the comparison step
    (`flip_step`). `crop` (size or (h, w)): centre-crop the output to this size, applying geometric
    perturbations before the crop and the others after it, as the original did with Resize(256) images
    and crop 224; pixel constants are then scaled to the crop size.
    """
    spec = _spec(name, difficulty)
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or 0 in img.shape:
        raise ValueError(f"image must be a non-empty (H, W, 3) uint8 array, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    ch, cw = (h, w) if crop is None else (crop, crop) if isinstance(crop, int) else tuple(crop)
    if not (0 < ch <= h and 0 < cw <= w):
        raise ValueError(f"crop {(ch, cw)} must be positive and fit the image {(h, w)}")
    s = min(ch, cw) / REFERENCE_SIZE
    rng = np.random.default_rng(seed)
    img = np.ascontiguousarray(img)
    if spec.geometric:
        frames = _centre_crop(spec.fn(img, s, rng, difficulty), ch, cw)
    else:
        frames = spec.fn(np.ascontiguousarray(_centre_crop(img, ch, cw)), s, rng, difficulty)
    return np.ascontiguousarray(frames)
