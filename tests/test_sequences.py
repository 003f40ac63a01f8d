"""ImageNet-P perturbation sequences: shapes, determinism, and each schedule checked against values derived by
hand from hendrycks/robustness `make_imagenet_p.py` (linear ramps make every geometric warp analytic)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from robustify.corruptions.sequences import (
    ALL_PERTURBATIONS,
    EXTRA_PERTURBATIONS,
    NOISE_PERTURBATIONS,
    PERTURBATIONS,
    flip_step,
    is_noise,
    make_sequence,
    sequence_length,
)
from robustify.eval.metrics import flip_probability

SHAPES = [(64, 64), (48, 80)]
RANDOM = {"gaussian_noise", "shot_noise", "speckle_noise", "snow", "spatter"}
GEOMETRIC = {"zoom_blur", "translate", "rotate", "tilt", "scale", "shear"}
SLOPE = 2  # grey levels per pixel of the ramp images


def _smooth(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 70 * np.sin(xx / 5.0 + yy / 9.0), 128 + 60 * np.cos(yy / 4.0),
                    40 + 150 * (xx + yy) / (h + w)], axis=-1)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _offsets(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dx, dy) from the image centre."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return xx - (w - 1) / 2, yy - (h - 1) / 2


def _ramp_value(dx: np.ndarray, w: int) -> np.ndarray:
    return 40 + SLOPE * (dx + (w - 1) / 2)


def _ramp(h: int, w: int) -> np.ndarray:
    """Grey image 40 + 2x: integral and linear, so bilinear resampling of it is exact (up to OpenCV's
    1/32-pixel coordinate grid, i.e. 1/16 grey level) and every warp has a closed form."""
    dx, _ = _offsets(h, w)
    return np.repeat(_ramp_value(dx, w)[..., None], 3, axis=-1).astype(np.uint8)


def _scale(h: int, w: int) -> float:
    return min(h, w) / 224


# --------------------------------------------------------------------------- API


def test_names_lengths_and_noise_set() -> None:
    assert PERTURBATIONS == ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
                             "brightness", "translate", "rotate", "tilt", "scale")
    assert EXTRA_PERTURBATIONS == ("speckle_noise", "gaussian_blur", "spatter", "shear")
    assert NOISE_PERTURBATIONS == {"gaussian_noise", "shot_noise", "speckle_noise"}
    for name in ALL_PERTURBATIONS:
        assert is_noise(name) == ("noise" in name)  # test.py's rule
        for d in (1, 2, 3):
            assert sequence_length(name, d) == (41 if name == "translate" else 31)
            assert flip_step(name, d) == (1 if "noise" in name else d)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda img: make_sequence(img, "fog", 0), "gaussian_noise"),
        (lambda img: make_sequence(img, "rotate", 0, difficulty=4), "(1, 2, 3)"),
        (lambda img: sequence_length("blur", 1), "motion_blur"),
        (lambda img: flip_step("translate", 0), "(1, 2, 3)"),
        (lambda img: make_sequence(img.astype(np.float32), "rotate", 0), "uint8"),
        (lambda img: make_sequence(img[..., 0], "rotate", 0), "(H, W, 3)"),
        (lambda img: make_sequence(img, "rotate", 0, crop=65), "crop"),
    ],
)
def test_bad_arguments(call, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        call(_smooth(64, 64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ALL_PERTURBATIONS)
def test_shape_determinism_and_seed(name: str, shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    state = np.random.get_state()
    a = make_sequence(img, name, seed=3)
    assert a.shape == (sequence_length(name), *shape, 3) and a.dtype == np.uint8
    assert a.flags.c_contiguous
    assert np.array_equal(a, make_sequence(img.copy(), name, seed=3))
    other = make_sequence(img, name, seed=4)
    assert np.array_equal(a, other) != (name in RANDOM)  # only the random ones depend on the seed
    assert not np.array_equal(a[0], a[-1])
    new_state = np.random.get_state()
    assert new_state[0] == state[0] and np.array_equal(new_state[1], state[1]) and new_state[2:] == state[2:]
    assert np.array_equal(img, _smooth(*shape))  # input untouched


@pytest.mark.parametrize("name", sorted(set(ALL_PERTURBATIONS) - NOISE_PERTURBATIONS))
def test_difficulty_is_only_a_step_for_non_noise(name: str) -> None:
    img = _smooth(48, 80)
    assert np.array_equal(make_sequence(img, name, 1, difficulty=1), make_sequence(img, name, 1, difficulty=3))


# --------------------------------------------------------------------------- noise


NOISE_STD = {  # residual std at grey 128 on a 0..255 scale
    "gaussian_noise": {d: 255 * s for d, s in {1: 0.03, 2: 0.05, 3: 0.08}.items()},
    "shot_noise": {d: 255 * math.sqrt(128 / 255 / lam) for d, lam in {1: 300, 2: 120, 3: 60}.items()},
    "speckle_noise": {d: 128 * s for d, s in {1: 0.05, 2: 0.10, 3: 0.15}.items()},
}


@pytest.mark.parametrize("difficulty", [1, 2, 3])
@pytest.mark.parametrize("name", sorted(NOISE_PERTURBATIONS))
def test_noise_levels_and_independent_frames(name: str, difficulty: int) -> None:
    img = np.full((64, 80, 3), 128, np.uint8)
    frames = make_sequence(img, name, seed=0, difficulty=difficulty)
    assert np.array_equal(frames[0], img)  # frame 0 is the clean image, the reference of every flip
    res = frames[1:].astype(np.float64) - 128
    assert res.std() == pytest.approx(NOISE_STD[name][difficulty], rel=0.04)
    if name != "shot_noise":  # symmetric noise, truncated to uint8: mean -0.5
        assert res.mean() == pytest.approx(-0.5, abs=0.1)
    # The original draws fresh noise for every frame: residuals of neighbouring frames are uncorrelated,
    # and every frame differs from every other.
    flat = res.reshape(30, -1)
    corr = np.corrcoef(flat)
    assert np.abs(corr[np.triu_indices(30, 1)]).max() < 0.03
    assert all(not np.array_equal(frames[i], frames[i + 1]) for i in range(1, 30))


# --------------------------------------------------------------------------- photometric


@pytest.mark.parametrize("shape", SHAPES)
def test_brightness_follows_value_schedule(shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    frames = make_sequence(img, "brightness", 0)
    assert np.array_equal(frames[15], img)  # c = 0
    v = img.max(axis=-1).astype(np.float64)
    for i in range(31):
        expected = np.clip(v + (i - 15) * 0.02 * 255, 0, 255)  # HSV value + (i-15)·0.02
        got = frames[i].max(axis=-1).astype(np.float64)
        assert np.all(got <= expected + 1e-3) and np.all(got >= expected - 1.001)
    means = frames.reshape(31, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_motion_blur_is_one_sided_gaussian_along_the_angle(shape: tuple[int, int]) -> None:
    h, w = shape
    s = _scale(h, w)
    width = 2 * math.ceil(10 * s) + 1  # ImageMagick kernel width for radius 10·s
    taps = np.exp(-np.arange(width) ** 2 / (2 * (3 * s) ** 2))
    taps /= taps.sum()
    columns = (128 + 90 * np.sin(np.arange(w) / 2.5)).round()
    img = np.repeat(np.repeat(columns[None, :, None], h, axis=0), 3, axis=2).astype(np.uint8)
    frames = make_sequence(img, "motion_blur", 0)
    # Frame 30 has angle 0: out(x) = sum_i tap_i · in(min(x + i, w - 1)).
    idx = np.minimum(np.arange(w)[:, None] + np.arange(width)[None, :], w - 1)
    expected = np.rint((columns[idx] * taps).sum(axis=1))
    assert np.abs(frames[30, :, :, 0].astype(np.float64) - expected[None, :]).max() <= 1
    rows = np.repeat(np.repeat(columns[:h, None, None], w, axis=1), 3, axis=2).astype(np.uint8)
    assert np.array_equal(make_sequence(rows, "motion_blur", 0)[30], rows)  # blur along constant rows
    # Frame 0 (angle -120) smears mostly vertically: columns change less than at angle 0.
    assert np.abs(frames[0].astype(np.float64) - img).mean() < np.abs(frames[30].astype(np.float64) - img).mean()


def test_motion_blur_offsets_follow_imagemagick_rounding() -> None:
    # 112 px: s = 1/2, radius 5 -> 11 taps, sigma 1.5. Frame 5 has angle -100: tap i samples offset
    # ceil(i·(cos, sin)(-100°) - 1/2), worked out by hand: x = 0,0,0,-1,-1,-1,-1,-1,-1,-2,-2 and y = -i.
    # An impulse at p therefore lands on p - offset_i with weight tap_i.
    taps = np.exp(-np.arange(11) ** 2 / (2 * 1.5**2))
    taps /= taps.sum()
    impulse = np.zeros((112, 112, 3), np.uint8)
    impulse[40, 60] = 250
    expected = np.zeros((112, 112))
    for i, ox in enumerate([0, 0, 0, -1, -1, -1, -1, -1, -1, -2, -2]):
        expected[40 + i, 60 - ox] += 250 * taps[i]
    got = make_sequence(impulse, "motion_blur", 0)[5, :, :, 1].astype(np.float64)
    assert np.abs(got - np.rint(expected)).max() <= 1


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_blur_matches_scipy(shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    frames = make_sequence(img, "gaussian_blur", 0)
    s = _scale(*shape)
    for i in (0, 12, 30):
        sigma = (0.25 + 0.035 * i) * s
        ref = gaussian_filter(img.astype(np.float64), (sigma, sigma, 0), mode="nearest", truncate=6.0)
        assert np.abs(frames[i] - np.floor(ref + 1e-4)).max() <= 1
    grads = [np.abs(np.diff(f.astype(np.float64), axis=1)).mean() for f in frames]
    assert all(b <= a + 1e-9 for a, b in zip(grads, grads[1:]))


@pytest.mark.parametrize("shape", SHAPES)
def test_snow_only_brightens_and_drifts_smoothly(shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    x = img.astype(np.float32) / 255
    grey = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    base = np.floor((0.85 * x + 0.15 * np.maximum(x, 1.5 * grey + 0.5)) * 255 - 1e-3)
    frames = make_sequence(img, "snow", seed=1).astype(np.float64)
    assert np.all(frames >= base)
    snow = (frames - base).mean(axis=(1, 2, 3))
    assert snow.min() > 2 and snow.std() < 0.15 * snow.mean()  # one layer, streaked: amount stays put
    steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert steps.max() < np.abs(frames[30] - frames[0]).mean()


def _best_vertical_shift(a: np.ndarray, b: np.ndarray, max_shift: int) -> int:
    """Downward shift of `a` that correlates best with `b`."""
    scores = {k: np.corrcoef(a[: a.shape[0] - k].ravel(), b[k:].ravel())[0, 1] for k in range(max_shift + 1)}
    return max(scores, key=scores.get)


@pytest.mark.parametrize("shape", SHAPES)
def test_spatter_adds_liquid_that_runs_down(shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    frames = make_sequence(img, "spatter", seed=2).astype(np.float64)
    added = (frames - img).sum(axis=-1)
    assert added.min() >= 0 and added[0].sum() > 0
    # The column filter [.05 .1 .15 .7] moves the liquid .05·(-1) + .15·1 + .7·2 = 1.5 reference rows a
    # frame, i.e. 1.5·s rows here: after 10 frames the pattern sits ~15·s rows lower.
    assert abs(_best_vertical_shift(added[0], added[10], 12) - 15 * _scale(*shape)) <= 1.5


# --------------------------------------------------------------------------- geometric


def _tv02_source(dx: np.ndarray, dy: np.ndarray, angle: float, scale: float, shear: float):
    """Source offsets of output offsets under torchvision 0.2's inverse affine matrix (RSS^-1)."""
    a, sh = math.radians(angle), math.radians(shear)
    d = math.cos(a + sh) * math.cos(a) + math.sin(a + sh) * math.sin(a)
    sx = (math.cos(a + sh) * dx + math.sin(a + sh) * dy) / (scale * d)
    sy = (-math.sin(a) * dx + math.cos(a) * dy) / (scale * d)
    return sx, sy


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "frame", "angle", "scale", "shear"),
    [("rotate", 0, -15, 1, 0), ("rotate", 30, 15, 1, 0), ("rotate", 22, 7, 1, 0),
     ("scale", 4, 0, 0.5, 0), ("scale", 30, 0, 1.15, 0), ("scale", 0, 0, 0.4, 0),
     ("shear", 30, 0, 1, 15), ("shear", 3, 0, 1, -12)],
)
def test_affine_frames_match_torchvision_02_geometry(name, frame, angle, scale, shear, shape) -> None:
    h, w = shape
    frames = make_sequence(_ramp(h, w), name, 0)
    dx, dy = _offsets(h, w)
    sx, sy = _tv02_source(dx, dy, angle, scale, shear)
    inside = (np.abs(sx) < (w - 1) / 2 - 1) & (np.abs(sy) < (h - 1) / 2 - 1)
    outside = (np.abs(sx) > (w - 1) / 2 + 1) | (np.abs(sy) > (h - 1) / 2 + 1)
    got = frames[frame, :, :, 0].astype(np.float64)
    assert inside.mean() > 0.1
    assert np.abs(got - _ramp_value(sx, w))[inside].max() <= 0.6
    assert np.all(got[outside] == 0)


@pytest.mark.parametrize(("name", "identity_frame"), [("rotate", 15), ("scale", 24), ("shear", 15), ("translate", 20)])
@pytest.mark.parametrize("shape", SHAPES)
def test_identity_frames(name: str, identity_frame: int, shape: tuple[int, int]) -> None:
    img = _smooth(*shape)
    assert np.array_equal(make_sequence(img, name, 0)[identity_frame], img)


@pytest.mark.parametrize(
    ("shape", "frame", "pixels"),
    # offset (i - 20)·min(H, W)/224: 64 -> 2/7 px per frame, 48 -> 3/14 px per frame
    [((64, 64), 27, 2), ((64, 64), 13, -2), ((64, 64), 34, 4), ((48, 80), 34, 3), ((48, 80), 6, -3)],
)
def test_translate_integer_offsets_are_exact_shifts(shape, frame: int, pixels: int) -> None:
    img = _smooth(*shape)
    expected = np.zeros_like(img)
    if pixels > 0:
        expected[:, pixels:] = img[:, :-pixels]
    else:
        expected[:, :pixels] = img[:, -pixels:]
    assert np.array_equal(make_sequence(img, "translate", 0)[frame], expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_translate_fractional_offsets_interpolate(shape: tuple[int, int]) -> None:
    h, w = shape
    frames = make_sequence(_ramp(h, w), "translate", 0)
    dx, _ = _offsets(h, w)
    for i in (0, 21, 25, 40):
        shift = (i - 20) * _scale(h, w)
        valid = (dx - shift > -(w - 1) / 2 + 1) & (dx - shift < (w - 1) / 2 - 1)
        assert np.abs(frames[i, :, :, 0] - _ramp_value(dx - shift, w))[valid].max() <= 0.6


@pytest.mark.parametrize("shape", SHAPES)
def test_zoom_blur_is_running_mean_of_zooms(shape: tuple[int, int]) -> None:
    h, w = shape
    frames = make_sequence(_ramp(h, w), "zoom_blur", 0)
    assert np.array_equal(frames[0], _ramp(h, w))
    dx, _ = _offsets(h, w)
    for i in (1, 10, 30):
        shrink = np.mean([1 / (1 + 0.004 * j) for j in range(i + 1)])  # zoom 1+.004j maps dx to dx/zoom
        err = frames[i, :, :, 0] - _ramp_value(dx * shrink, w)  # rounded zooms (±.5), truncated mean (-1..0)
        assert err.min() >= -1.6 and err.max() <= 0.6


def _tilt_project(x: float, y: float, h: int, w: int, degrees: float) -> tuple[float, float]:
    """The original's camera model written out: plane point (X, Y, depth) rotated by RY then RX (same
    angle), pushed to distance f = image diagonal, projected with focal length f about the centre."""
    t = math.radians(degrees)
    cx, cy, f, depth = (w - 1) / 2, (h - 1) / 2, math.hypot(w, h), _scale(h, w)
    X, Y, Z = x - cx, y - cy, depth
    X, Z = math.cos(t) * X - math.sin(t) * Z, math.sin(t) * X + math.cos(t) * Z  # RY
    Y, Z = math.cos(t) * Y - math.sin(t) * Z, math.sin(t) * Y + math.cos(t) * Z  # RX
    return cx + f * X / (Z + f), cy + f * Y / (Z + f)


@pytest.mark.parametrize("shape", SHAPES)
def test_tilt_moves_points_like_the_original_camera(shape: tuple[int, int]) -> None:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    for px, py in [((w - 1) / 2 + 12, (h - 1) / 2 - 8), ((w - 1) / 2 - 15, (h - 1) / 2 + 10)]:
        blob = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * 1.5**2))
        img = np.repeat(np.rint(250 * blob)[..., None], 3, axis=2).astype(np.uint8)
        frames = make_sequence(img, "tilt", 0).astype(np.float64)[..., 0]
        for i in (0, 8, 15, 30):
            ex, ey = _tilt_project(px, py, h, w, i - 15)
            m = frames[i]
            assert (m * xx).sum() / m.sum() == pytest.approx(ex, abs=0.3)
            assert (m * yy).sum() / m.sum() == pytest.approx(ey, abs=0.3)
    ramp = make_sequence(_ramp(h, w), "tilt", 0)
    dx, dy = _offsets(h, w)
    interior = (np.abs(dx) < w / 2 - 2) & (np.abs(dy) < h / 2 - 2)
    assert np.abs(ramp[15].astype(np.float64) - _ramp(h, w))[interior].max() <= 1  # angle 0: ~identity


def test_crop_reproduces_the_resize256_crop224_pipeline() -> None:
    big = _smooth(48, 60)
    top, left = 8, 14  # centre 32x32 crop
    crop = big[top:top + 32, left:left + 32]
    # Non-geometric perturbations act on the crop ...
    for name in ("brightness", "gaussian_noise", "motion_blur"):
        assert np.array_equal(make_sequence(big, name, 5, crop=32), make_sequence(crop, name, 5))
    # ... geometric ones on the whole image, so the surround moves in: shift (34-20)·32/224 = 2 px.
    frames = make_sequence(big, "translate", 0, crop=(32, 32))
    assert frames.shape == (41, 32, 32, 3)
    assert np.array_equal(frames[34], big[top:top + 32, left - 2:left - 2 + 32])


# --------------------------------------------------------------------------- with flip_probability


def test_flip_probability_semantics_match_test_py() -> None:
    img = _smooth(64, 64)
    # brightness: a threshold on the mean flips exactly once along the sequence
    seq = make_sequence(img, "brightness", 0)
    preds = torch.as_tensor(seq.reshape(31, -1).mean(axis=1) > seq[15].mean() + 1).long()
    assert flip_probability(preds[None], noise=is_noise("brightness"), step=flip_step("brightness", 1)) == (
        pytest.approx(1 / 30))
    # difficulty 2: subsequences [0::2] (15 comparisons) and [1::2] (14), one flip in each
    assert flip_probability(preds[None], noise=False, step=flip_step("brightness", 2)) == pytest.approx(2 / 29)
    # noise: "is this frame the clean one" flips on every comparison against the first frame
    noisy = make_sequence(img, "gaussian_noise", 0, difficulty=3)
    preds = torch.as_tensor([int(not np.array_equal(f, noisy[0])) for f in noisy])
    assert flip_probability(preds[None], noise=is_noise("gaussian_noise"), step=flip_step("gaussian_noise", 3)) == 1.0
