"""AugMix (paper op set, reference semantics) and its JSD consistency loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from robustify.augment import augmix as A

PAPER_OPS = {"autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y",
             "translate_x", "translate_y"}
OVERLAP_OPS = {"color", "contrast", "brightness", "sharpness"}


def rgb(array: np.ndarray) -> Image.Image:
    """HxW (grey, copied to 3 channels) or HxWx3 uint8 array → RGB image."""
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return Image.fromarray(array, "RGB")


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image)[..., 0].astype(np.int64)


def noise_image(h: int = 16, w: int = 16, seed: int = 1) -> Image.Image:
    return rgb(np.random.default_rng(seed).integers(0, 256, (h, w, 3)))


# ---- op sets -------------------------------------------------------------------------------------


def test_default_op_set_is_the_nine_paper_ops():
    assert set(A.AUGMIX_OPS) == PAPER_OPS
    assert not OVERLAP_OPS & set(A.AUGMIX_OPS)
    assert set(A.AUGMIX_ALL_OPS) == PAPER_OPS | OVERLAP_OPS
    assert all(A.AUGMIX_ALL_OPS[name] is A.AUGMIX_OPS[name] for name in PAPER_OPS)
    assert A.SIGNED_OPS == {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}
    assert A.AugMix().all_ops is False


# ---- each op, with numbers -----------------------------------------------------------------------


def test_autocontrast_stretches_100_150_to_full_range():
    out = grey(A.autocontrast(rgb(np.array([[100, 125, 150, 110]])), 1.0))
    # PIL: v → int((v − 100)·255/50); 125 → int(127.5) = 127, 110 → 51
    assert out.tolist() == [[0, 127, 255, 51]]


def test_equalize_spreads_four_equal_bins():
    a = np.zeros((17, 20), np.uint8)
    for k, v in enumerate([10, 20, 30, 40]):
        a[:, 5 * k:5 * k + 5] = v  # 85 pixels each: PIL's step = (340 − 85) // 255 = 1
    out = grey(A.equalize(rgb(a), 1.0))
    assert out[0, ::5].tolist() == [0, 85, 170, 255]


@pytest.mark.parametrize("level, bits", [(1.0, 4), (5.0, 2), (7.6, 1), (10.0, 0)])
def test_posterize_keeps_4_minus_int_level_bits(level, bits):
    out = grey(A.posterize(rgb(np.arange(256).reshape(16, 16)), level))
    values = np.unique(out)
    assert len(values) == 2 ** bits
    assert (values % 2 ** (8 - bits) == 0).all()


def test_posterize_at_severity_one_always_keeps_four_bits():
    # ImageNet recipe: level ~ U(0.1, 1) → int(level·4/10) = 0 → 4 bits
    image = rgb(np.arange(256).reshape(16, 16))
    for level in (0.1, 0.5, 0.999):
        assert len(np.unique(grey(A.posterize(image, level)))) == 16


def test_solarize_inverts_above_256_minus_int_level():
    image = rgb(np.array([[100, 127, 128, 200, 230, 231, 240]]))
    assert grey(A.solarize(image, 5.0)).tolist() == [[100, 127, 127, 55, 25, 24, 15]]  # threshold 128
    assert grey(A.solarize(image, 1.0)).tolist() == [[100, 127, 128, 200, 230, 24, 15]]  # threshold 231


def test_rotate_keeps_centre_and_turns_counterclockwise():
    a = np.zeros((9, 9), np.uint8)
    a[4, 4], a[4, 8] = 200, 255  # centre, and a bright pixel right of it
    for level, row in ((30.0, 0), (-30.0, 8)):  # int(30·30/10) = 90 degrees
        out = grey(A.rotate(rgb(a), level))
        assert out[4, 4] == 200
        assert np.argwhere(out == 255).tolist() == [[row, 4]]  # +90° → above, −90° → below
    assert (grey(A.rotate(rgb(a), 0.3)) == a).all()  # int(0.9) = 0 degrees


def test_shear_x_shifts_rows_about_the_top_left_corner():
    # The reference shears about the origin (PIL affine (1, s, 0, 0, 1, 0)), so row y moves by −s·(y+½)
    # pixels (PIL samples at pixel centres): a vertical line at x = 5 tilts; the centre pixel does move.
    a = np.zeros((10, 12), np.uint8)
    a[:, 5] = 255
    for level in (10.0, -10.0):
        s = 0.3 * level / 10
        out = grey(A.shear_x(rgb(a), level)).astype(float)
        centroid = (out * np.arange(12)).sum(1) / out.sum(1)
        np.testing.assert_allclose(centroid, 5 - s * (np.arange(10) + 0.5), atol=0.01)
    out = grey(A.shear_y(rgb(a.T), 10.0)).astype(float)
    centroid = (out * np.arange(12)[:, None]).sum(0) / out.sum(0)
    np.testing.assert_allclose(centroid, 5 - 0.3 * (np.arange(10) + 0.5), atol=0.01)


def test_shear_and_rotate_at_zero_parameter_are_identity():
    image = noise_image()
    for op in (A.shear_x, A.shear_y, A.rotate, A.translate_x, A.translate_y):
        assert np.array_equal(np.asarray(op(image, 0.0)), np.asarray(image))


def test_translate_moves_a_pixel_by_int_level_times_size_over_30():
    a = np.zeros((21, 30), np.uint8)  # not square: x uses the width (max 10 px), y the height (max 7 px)
    a[10, 15] = 255
    image = rgb(a)
    cases = [(A.translate_x, 3.0, [10, 12]), (A.translate_x, -10.0, [10, 25]), (A.translate_x, 0.9, [10, 15]),
             (A.translate_y, 10.0, [3, 15]), (A.translate_y, -5.0, [13, 15])]  # int(−3.5) = −3 → down 3
    for op, level, where in cases:
        assert np.argwhere(grey(op(image, level)) == 255).tolist() == [where], (op.__name__, level)


def test_brightness_of_all_ops_uses_level_times_0_18_plus_0_1():
    image = rgb(np.full((4, 4), 100))
    assert (grey(A.brightness(image, 5.0)) == 100).all()  # factor 1.0
    assert (grey(A.brightness(image, 10.0)) == 190).all()  # factor 1.9


@pytest.mark.parametrize("name", sorted(PAPER_OPS | OVERLAP_OPS))
def test_ops_make_the_reference_pil_calls(name):
    """Each op equals the reference's PIL call written out (square image, IMAGE_SIZE = its side)."""
    from PIL import ImageEnhance, ImageOps

    size, level = 24, 3.7
    image = noise_image(size, size, seed=4)
    bil, aff = Image.Resampling.BILINEAR, Image.Transform.AFFINE
    t = int(level * (size / 3) / 10)
    f = level * 1.8 / 10 + 0.1
    reference = {
        "autocontrast": lambda: ImageOps.autocontrast(image),
        "equalize": lambda: ImageOps.equalize(image),
        "posterize": lambda: ImageOps.posterize(image, 4 - int(level * 4 / 10)),
        "rotate": lambda: image.rotate(int(level * 30 / 10), resample=bil),
        "solarize": lambda: ImageOps.solarize(image, 256 - int(level * 256 / 10)),
        "shear_x": lambda: image.transform((size, size), aff, (1, level * 0.3 / 10, 0, 0, 1, 0), resample=bil),
        "shear_y": lambda: image.transform((size, size), aff, (1, 0, 0, level * 0.3 / 10, 1, 0), resample=bil),
        "translate_x": lambda: image.transform((size, size), aff, (1, 0, t, 0, 1, 0), resample=bil),
        "translate_y": lambda: image.transform((size, size), aff, (1, 0, 0, 0, 1, t), resample=bil),
        "color": lambda: ImageEnhance.Color(image).enhance(f),
        "contrast": lambda: ImageEnhance.Contrast(image).enhance(f),
        "brightness": lambda: ImageEnhance.Brightness(image).enhance(f),
        "sharpness": lambda: ImageEnhance.Sharpness(image).enhance(f),
    }[name]()
    out = A.AUGMIX_ALL_OPS[name](image, level)
    assert out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(reference))


# ---- mixing -------------------------------------------------------------------------------------

# Substitute ops, each also written in numpy for the hand computation. "translate_x" keeps a name from
# SIGNED_OPS so that the sign draw is exercised.
SUBSTITUTES = {
    "autocontrast": (lambda im, lv: rgb(255 - np.asarray(im)), lambda a, lv: 255 - a),
    "translate_x": (lambda im, lv: rgb(np.clip(np.asarray(im).astype(int) + round(20 * lv), 0, 255)),
                    lambda a, lv: np.clip(a + round(20 * lv), 0, 255)),
    "solarize": (lambda im, lv: rgb(np.asarray(im) // 2), lambda a, lv: a // 2),
}


def hand_augmix(array: np.ndarray, seed: int, severity: float, width: int, depth: int, signs: list[int]) -> np.ndarray:
    """(1 − m)·x + m·Σ wᵢ chainᵢ(x) with the documented draw order, in float64."""
    rng = np.random.default_rng(seed)
    names = list(SUBSTITUTES)
    ws = np.float32(rng.dirichlet([1.0] * width))
    m = np.float32(rng.beta(1.0, 1.0))
    x = array.astype(np.int64)
    total = np.zeros(x.shape)
    for i in range(width):
        d = depth if depth > 0 else int(rng.integers(1, 4))
        chain = x.copy()
        for _ in range(d):
            name = names[int(rng.integers(len(names)))]
            level = rng.uniform(0.1, severity)
            if name == "translate_x":
                sign = -1 if rng.uniform() > 0.5 else 1
                signs.append(sign)
                level *= sign
            chain = SUBSTITUTES[name][1](chain, level)
        total += float(ws[i]) * chain / 255
    mixed = (1 - float(m)) * x / 255 + float(m) * total
    return mixed.transpose(2, 0, 1)


def test_mixing_formula_matches_hand_computation(monkeypatch):
    monkeypatch.setattr(A, "AUGMIX_OPS", {name: fn for name, (fn, _) in SUBSTITUTES.items()})
    array = np.random.default_rng(7).integers(0, 256, (6, 5, 3))
    signs: list[int] = []
    for seed in range(12):
        for width, depth in ((3, -1), (2, 2)):
            out = A.augment_and_mix(rgb(array), np.random.default_rng(seed), severity=3.0, width=width, depth=depth)
            expected = hand_augmix(array, seed, 3.0, width, depth, signs)
            np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-6)
    assert set(signs) == {-1, 1}  # both directions were drawn and applied


def test_depth_and_width_set_the_number_of_op_applications(monkeypatch):
    calls: list[float] = []

    def record(image, level):
        calls.append(level)
        return image

    monkeypatch.setattr(A, "AUGMIX_OPS", {"equalize": record})
    image = noise_image(4, 4)
    A.augment_and_mix(image, np.random.default_rng(0), width=4, depth=2)
    assert len(calls) == 8
    depths = set()
    for seed in range(30):
        calls.clear()
        A.augment_and_mix(image, np.random.default_rng(seed), width=1)
        depths.add(len(calls))
        assert all(0.1 <= lv < 1.0 for lv in calls)  # severity 1: U(0.1, 1), unsigned op
    assert depths == {1, 2, 3}


def test_all_ops_switches_to_the_extended_set(monkeypatch):
    used: list[str] = []

    def fail(image, level):
        raise AssertionError("paper op used with all_ops=True")

    monkeypatch.setattr(A, "AUGMIX_OPS", {"equalize": fail})
    monkeypatch.setattr(A, "AUGMIX_ALL_OPS", {"color": lambda im, lv: used.append("color") or im})
    A.AugMix(all_ops=True)(noise_image(4, 4), np.random.default_rng(0))
    assert used


def test_identity_ops_return_the_clean_image(monkeypatch):
    monkeypatch.setattr(A, "AUGMIX_OPS", {"equalize": lambda im, lv: im})
    image = noise_image(8, 6)
    out = A.augment_and_mix(image, np.random.default_rng(5))
    torch.testing.assert_close(out, A.image_to_tensor(image), rtol=0, atol=1e-6)


def test_seeded_output_is_reproducible_bounded_float32():
    image = noise_image(12, 20, seed=2)
    a = A.augment_and_mix(image, np.random.default_rng(11))
    b = A.augment_and_mix(image, np.random.default_rng(11))
    c = A.augment_and_mix(image, np.random.default_rng(12))
    assert a.dtype == torch.float32 and a.shape == (3, 12, 20)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for seed in range(10):
        out = A.AugMix(severity=3.0, all_ops=True)(image, np.random.default_rng(seed))
        assert out.min() >= 0 and out.max() <= 1


def test_splits_are_clean_then_two_independent_samples():
    image = noise_image(10, 10, seed=3)
    aug = A.AugMix()
    clean, aug1, aug2 = aug.splits(image, np.random.default_rng(4))
    assert torch.equal(clean, torch.from_numpy(np.asarray(image).transpose(2, 0, 1) / 255).float())
    rng = np.random.default_rng(4)
    assert torch.equal(aug1, aug(image, rng))
    assert torch.equal(aug2, aug(image, rng))
    assert not torch.equal(aug1, aug2)


def test_bad_input_is_rejected_with_a_clear_error():
    image = noise_image(4, 4)
    with pytest.raises(ValueError, match="RGB"):
        A.augment_and_mix(image.convert("L"), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        A.augment_and_mix(image, 0)
    with pytest.raises(TypeError, match="PIL"):
        A.augment_and_mix(np.zeros((4, 4, 3)), np.random.default_rng(0))
    for kwargs, key in (({"severity": 0}, "severity"), ({"severity": 11}, "severity"), ({"width": 0}, "width"),
                        ({"depth": 0}, "depth"), ({"alpha": 0}, "alpha")):
        with pytest.raises(ValueError, match=key):
            A.AugMix(**kwargs)


# ---- JSD loss -----------------------------------------------------------------------------------


def reference_jsd(lc, l1, l2, y, weight=12.0):
    """The reference's `train` loss, with plain torch ops."""
    pc, p1, p2 = F.softmax(lc, 1), F.softmax(l1, 1), F.softmax(l2, 1)
    log_mix = torch.clamp((pc + p1 + p2) / 3.0, 1e-7, 1).log()
    kl = sum(F.kl_div(log_mix, p, reduction="batchmean") for p in (pc, p1, p2))
    return F.cross_entropy(lc, y) + weight * kl / 3.0


def test_jsd_loss_on_a_tiny_batch_equals_the_hand_value():
    lc = [[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
    l1 = [[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    l2 = [[0.0, 3.0, 0.0], [1.0, -1.0, 0.0]]
    y = [0, 2]

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(lc[i])[y[i]]) for i in range(2)) / 2
    kl = 0.0
    for i in range(2):
        ps = [softmax(lc[i]), softmax(l1[i]), softmax(l2[i])]
        mix = [min(max(sum(p[k] for p in ps) / 3, 1e-7), 1) for k in range(3)]
        kl += sum(p[k] * math.log(p[k] / mix[k]) for p in ps for k in range(3)) / 2  # batchmean
    expected = ce + 12 * kl / 3
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    loss = A.jsd_loss(t(lc), t(l1), t(l2), torch.tensor(y))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected - ce > 0.1  # the JS term is a real part of the number
    assert A.jsd_loss(t(lc), t(l1), t(l2), torch.tensor(y), weight=24.0).item() == pytest.approx(
        ce + 24 * kl / 3, rel=1e-6)


def test_jsd_loss_is_the_reference_formula_exactly():
    g = torch.Generator().manual_seed(0)
    lc, l1, l2 = (torch.randn(8, 10, generator=g) * 4 for _ in range(3))
    l2[:, 3] = -40.0  # class 3 ≈ 0 in every split: the mixture is clamped to 1e-7 there
    y = torch.randint(0, 10, (8,), generator=g)
    assert torch.equal(A.jsd_loss(lc, l1, l2, y), reference_jsd(lc, l1, l2, y))
    assert torch.equal(A.jsd_loss(lc, l1, l2, y, weight=3.0), reference_jsd(lc, l1, l2, y, 3.0))


def test_identical_logits_give_plain_cross_entropy_no_label_smoothing():
    # Softmaxes of exactly 1/3 and (½, ¼, ¼): (p + p + p)/3 == p in float32, so the JS term is exactly 0.
    lc = torch.tensor([[0.0, 0.0, 0.0], [0.0, -math.log(2), -math.log(2)]])
    y = torch.tensor([1, 0])
    assert torch.equal(A.jsd_loss(lc, lc.clone(), lc.clone(), y), F.cross_entropy(lc, y))
    # Generic logits: the mixture differs from p by float rounding only (as in the reference).
    g = torch.Generator().manual_seed(1)
    lc = torch.randn(6, 5, generator=g) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    loss = A.jsd_loss(lc, lc.clone(), lc.clone(), y)
    torch.testing.assert_close(loss, F.cross_entropy(lc, y), rtol=0, atol=2e-6)
    # timm's default smoothing 0.1 would be far from that
    assert abs(F.cross_entropy(lc, y, label_smoothing=0.1) - loss) > 1e-2
    assert torch.equal(A.jsd_loss(lc, lc + 1, lc - 2, y, weight=0.0), F.cross_entropy(lc, y))


def test_jsd_loss_backpropagates_to_all_three_splits():
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(3)]
    A.jsd_loss(*logits, torch.tensor([0, 1, 2, 0])).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in logits)


def test_jsd_loss_rejects_mismatched_shapes():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logits_aug2"):
        A.jsd_loss(a, a, torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        A.jsd_loss(a, a, a, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="batch, classes"):
        A.jsd_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([0, 1]))
