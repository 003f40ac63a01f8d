"""PixMix follows the reference's formulas and draw order; its mixing set is read and generated
deterministically, with clear errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageChops

from robustify.augment.mixing_set import MixingSet, fractal_image, generate_fractals
from robustify.augment.pixmix import (
    IMAGENET_BETA,
    IMAGENET_K,
    MIXINGS,
    add_mix,
    mix_weights,
    multiply_mix,
    pixmix,
    to_tensor,
)
from robustify.io import derive_seed


class ScriptedRng:
    """Stands in for a Generator: hands out scripted coin flips and Beta draws and records the
    Beta parameters asked for, so the formulas can be checked against numbers worked out by hand."""

    def __init__(self, coins, betas):
        self.coins, self.betas, self.beta_args = list(coins), list(betas), []

    def random(self):
        return self.coins.pop(0)

    def beta(self, a, b):
        self.beta_args.append((a, b))
        return self.betas.pop(0)


def roll(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stand-in single-op augmentation: a horizontal roll by a drawn offset (it uses the generator,
    so the tests see whether the draws come in the reference's order)."""
    return ImageChops.offset(img, int(rng.integers(1, img.width)), 0)


def identity(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img


def _picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# ------------------------------------------------------------------ mixing formulas
def test_mix_weights_first_branch_by_hand():
    rng = ScriptedRng(coins=[0.3], betas=[0.5, 0.25])
    assert mix_weights(3.0, rng) == (0.5, 0.25)
    assert rng.beta_args == [(3.0, 1), (1, 3.0)]  # a ~ Beta(β, 1), b ~ Beta(1, β)


def test_mix_weights_second_branch_by_hand():
    rng = ScriptedRng(coins=[0.7], betas=[0.25, 0.5])
    assert mix_weights(4.0, rng) == (1.25, -0.5)  # a = 1 + Beta(1, β), b = −Beta(1, β)
    assert rng.beta_args == [(1, 4.0), (1, 4.0)]


def test_mix_weights_recomputed_from_a_seeded_generator():
    branches = set()
    for seed in range(40):
        g = np.random.default_rng(seed)
        if g.random() < 0.5:
            want = (np.float32(g.beta(3, 1)), np.float32(g.beta(1, 3)))
            assert 0 < want[0] < 1 and 0 < want[1] < 1
            branches.add(1)
        else:
            want = (np.float32(1) + np.float32(g.beta(1, 3)), -np.float32(g.beta(1, 3)))
            assert 1 < want[0] < 2 and -1 < want[1] < 0
            branches.add(2)
        assert mix_weights(3, np.random.default_rng(seed)) == (float(want[0]), float(want[1]))
    assert branches == {1, 2}


def test_add_mix_by_hand():
    x = torch.tensor([0.25, 0.0, 1.0, 0.5])
    y = torch.tensor([0.5, 1.0, 0.0, 0.75])
    # a = 1.25, b = −0.5: ((1.25·(2x−1) − 0.5·(2y−1)) + 1) / 2
    out = add_mix(x, y, 3.0, ScriptedRng(coins=[0.9], betas=[0.25, 0.5]))
    assert out.tolist() == [0.1875, -0.375, 1.375, 0.375]  # unclipped, as in the reference
    # a = 0.5, b = 0.25
    out = add_mix(x, y, 3.0, ScriptedRng(coins=[0.1], betas=[0.5, 0.25]))
    assert out.tolist() == [0.375, 0.375, 0.625, 0.5625]


def test_multiply_mix_by_hand():
    x = torch.tensor([0.125, 0.5, 0.5, 0.0])
    y = torch.tensor([0.5, 0.125, 0.0, 0.5])
    # a = 0.5, b = 0.25: (2x)^0.5 · (2y)^0.25 / 2
    out = multiply_mix(x, y, 3.0, ScriptedRng(coins=[0.2], betas=[0.5, 0.25]))
    torch.testing.assert_close(out, torch.tensor([0.25, 0.5 * 0.25 ** 0.25, 0.5 * 1e-37 ** 0.25, 0.0]))
    # a = 1.5, b = −0.5: a black second picture is floored at 1e-37, so the result stays finite
    out = multiply_mix(x, y, 3.0, ScriptedRng(coins=[0.8], betas=[0.5, 0.5]))
    want = torch.tensor([0.25 ** 1.5 / 2, 1 / 2 * 0.25 ** -0.5, 1 / 2 * float(np.float32(1e-37)) ** -0.5, 0.0])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    assert torch.isfinite(out).all()


def test_mixings_recomputed_from_a_seeded_generator():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 4, 5, generator=gen), torch.rand(3, 4, 5, generator=gen)
    for seed in range(6):
        a, b = mix_weights(4, np.random.default_rng(seed))
        xa, ya = x.double(), y.double()
        torch.testing.assert_close(add_mix(x, y, 4, np.random.default_rng(seed)).double(),
                                   (a * (2 * xa - 1) + b * (2 * ya - 1) + 1) / 2)
        torch.testing.assert_close(multiply_mix(x, y, 4, np.random.default_rng(seed)).double(),
                                   (2 * xa) ** a * (2 * ya).clamp(min=1e-37) ** b / 2, rtol=1e-5, atol=1e-6)
    assert MIXINGS == (add_mix, multiply_mix)


# ------------------------------------------------------------------ pixmix
def test_defaults_are_the_reference_imagenet_ones():
    assert (IMAGENET_K, IMAGENET_BETA) == (4, 4.0)


def test_to_tensor_is_torchvision_to_tensor():
    img = _picture(7, 5, 0)
    assert torch.equal(to_tensor(img), TF.to_tensor(img))


def test_k0_with_identity_augment_is_the_image_itself():
    img = _picture(10, 6, 1)
    for seed in range(5):
        out = pixmix(img, _picture(10, 6, 2), np.random.default_rng(seed), identity, k=0)
        assert torch.equal(out, TF.to_tensor(img))


def test_k0_is_the_image_or_its_augmented_view_by_the_first_coin():
    img, pic = _picture(9, 6, 3), _picture(9, 6, 4)
    seen = set()
    for seed in range(20):
        g = np.random.default_rng(seed)
        if g.random() < 0.5:
            want = TF.to_tensor(ImageChops.offset(img, int(g.integers(1, 9)), 0))
            seen.add("augmented")
        else:
            want = TF.to_tensor(img)
            seen.add("clean")
        assert torch.equal(pixmix(img, pic, np.random.default_rng(seed), roll, k=0), want)
    assert seen == {"augmented", "clean"}


def test_draws_follow_the_reference_order():
    """The reference, step by step with the same generator: coin (augment the start?), rounds
    U{0..k}, then per round coin (augmented view or mixing picture), op index, the op's (a, b)."""
    img, pic = _picture(8, 8, 5), _picture(8, 8, 6)
    for seed in range(12):
        g = np.random.default_rng(seed)
        mixed = TF.to_tensor(roll(img, g)) if g.random() < 0.5 else TF.to_tensor(img)
        for _ in range(g.integers(4 + 1)):
            other = TF.to_tensor(roll(img, g)) if g.random() < 0.5 else TF.to_tensor(pic)
            op = (add_mix, multiply_mix)[g.integers(2)]
            mixed = torch.clip(op(mixed, other, 3, g), 0, 1)
        assert torch.equal(pixmix(img, pic, np.random.default_rng(seed), roll, k=4, beta=3), mixed)


def test_rounds_cover_zero_to_k_and_mix_in_the_picture_or_a_view():
    img, pic = _picture(6, 6, 7), _picture(6, 6, 8)
    views = {TF.to_tensor(ImageChops.offset(img, s, 0)).numpy().tobytes() for s in range(1, 6)}
    calls, rounds, kinds = [], set(), set()

    def recording(op):
        def wrapped(x, y, beta, rng):
            assert beta == 2.5
            calls.append(op.__name__)
            kinds.add("picture" if torch.equal(y, TF.to_tensor(pic)) else "view")
            assert torch.equal(y, TF.to_tensor(pic)) or y.numpy().tobytes() in views
            return op(x, y, beta, rng)
        return wrapped

    for seed in range(80):
        calls.clear()
        pixmix(img, pic, np.random.default_rng(seed), roll, k=3, beta=2.5, mixings=[recording(o) for o in MIXINGS])
        rounds.add(len(calls))
    assert rounds == {0, 1, 2, 3}  # randint(k + 1): k itself included
    assert kinds == {"picture", "view"}


def test_output_is_float_chw_in_unit_range_and_seeded():
    img, pic = _picture(12, 7, 9), _picture(12, 7, 10)
    outs = [pixmix(img, pic, np.random.default_rng(s), roll, k=4, beta=4) for s in range(10)]
    for out in outs:
        assert out.dtype == torch.float32 and out.shape == (3, 7, 12)
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(pixmix(img, pic, np.random.default_rng(3), roll), outs[3])
    assert len({o.numpy().tobytes() for o in outs}) >= 8  # different seeds, different samples
    # some samples were mixed: neither the clean image nor one rolled view of it
    unmixed = {TF.to_tensor(ImageChops.offset(img, s, 0)).numpy().tobytes() for s in range(12)}  # s=0: clean
    assert sum(o.numpy().tobytes() not in unmixed for o in outs) >= 3


def test_grayscale_input_gives_three_channels():
    out = pixmix(_picture(5, 5, 11, "L"), _picture(5, 5, 12), np.random.default_rng(0), identity, k=0)
    assert out.shape == (3, 5, 5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_pixmix_errors():
    img = _picture(8, 8, 13)
    with pytest.raises(ValueError, match="mixing picture is 9x8, image is 8x8"):
        pixmix(img, _picture(9, 8, 14), np.random.default_rng(0), identity)
    seed = next(s for s in range(20) if np.random.default_rng(s).random() < 0.5)  # the start is augmented
    with pytest.raises(ValueError, match="augment returned a 4x4 picture for a 8x8 image"):
        pixmix(img, img, np.random.default_rng(seed), lambda im, rng: im.resize((4, 4)), k=0)
    with pytest.raises(ValueError, match="k >= 0"):
        pixmix(img, img, np.random.default_rng(0), identity, k=-1)


def test_augment_gets_a_copy():
    img = _picture(6, 6, 15)
    before = img.tobytes()

    def vandal(im, rng):
        im.paste((0, 0, 0), (0, 0, 6, 6))
        return im

    for seed in range(6):
        pixmix(img, img, np.random.default_rng(seed), vandal)
    assert img.tobytes() == before


# ------------------------------------------------------------------ mixing set
def _save(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_mixing_set_orders_by_relative_path_and_filters_extensions(tmp_path):
    for i, rel in enumerate(["z.png", "b/c.jpg", "a/d.webp", "a/b/e.JPEG", "m.PNG"]):
        _save(tmp_path / rel, _picture(4, 4, i))
    (tmp_path / "notes.txt").write_text("not an image")
    _save(tmp_path / "x.gif", _picture(4, 4, 9).convert("P"))
    ms = MixingSet(tmp_path)
    assert ms.files == ["a/b/e.JPEG", "a/d.webp", "b/c.jpg", "m.PNG", "z.png"]
    assert len(ms) == 5 and ms.path(2) == tmp_path / "b" / "c.jpg"


def test_pick_is_seeded_and_resizes_then_crops_like_torchvision(tmp_path):
    pics = [_picture(50, 20, 20), _picture(20, 50, 21), _picture(40, 40, 22)]
    for i, p in enumerate(pics):
        _save(tmp_path / f"p{i}.png", p)
    ms = MixingSet(tmp_path)
    seen = set()
    for seed in range(12):
        g = np.random.default_rng(seed)
        idx = int(g.integers(3))
        seen.add(idx)
        resized = TF.resize(pics[idx], 36)  # the default resize for 32 px is 32·256/224 → 36
        top, left = int(g.integers(0, resized.height - 31)), int(g.integers(0, resized.width - 31))
        want = TF.crop(resized, top, left, 32, 32)
        got = ms.pick(np.random.default_rng(seed), 32)
        assert got.size == (32, 32) and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert seen == {0, 1, 2}
    assert TF.resize(pics[0], 36).size == (90, 36)  # shorter side to 36, longer side in proportion


def test_pick_exact_size_and_explicit_resize(tmp_path):
    pic = _picture(40, 30, 23)
    _save(tmp_path / "p.png", pic)
    ms = MixingSet(tmp_path)
    # resize == size with a square picture: nothing to resize or crop, as torchvision does it
    _save(tmp_path / "sq" / "q.png", _picture(16, 16, 24))
    sq = MixingSet(tmp_path / "sq")
    g, h = np.random.default_rng(0), np.random.default_rng(0)
    assert np.array_equal(np.asarray(sq.pick(g, 16, resize=16)), np.asarray(_picture(16, 16, 24)))
    h.integers(1)
    assert g.bit_generator.state == h.bit_generator.state  # only the index was drawn, no crop offsets
    out = ms.pick(np.random.default_rng(1), 24, resize=30)
    assert out.size == (24, 24)
    with pytest.raises(ValueError, match="size <= resize"):
        ms.pick(np.random.default_rng(1), 24, resize=20)


def test_pick_converts_modes_to_rgb(tmp_path):
    _save(tmp_path / "gray.png", _picture(8, 8, 25, "L"))
    _save(tmp_path / "alpha.png", _picture(8, 8, 26, "RGBA"))
    ms = MixingSet(tmp_path)
    assert {ms.load(i).mode for i in range(2)} == {"RGB"}


def test_mixing_set_errors_name_the_folder_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        MixingSet(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no images found (looked for .png, .jpg, .jpeg, .webp)")):
        MixingSet(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.png").write_bytes(b"this is not a png")
    ms = MixingSet(bad)  # listing does not open files ...
    with pytest.raises(ValueError, match=re.escape(str(bad / "garbage.png"))):  # ... picking reports the file
        ms.pick(np.random.default_rng(0), 8)
    trunc = tmp_path / "trunc"
    _save(trunc / "t.png", _picture(32, 32, 27))
    data = (trunc / "t.png").read_bytes()
    (trunc / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(trunc / "t.png"))):
        MixingSet(trunc).pick(np.random.default_rng(0), 8)


# ------------------------------------------------------------------ generated fractals
def _digests(paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_fractals_are_byte_identical_per_seed_and_differ_across_seeds(tmp_path):
    a = generate_fractals(tmp_path / "a", 5, 32, seed=0)
    b = generate_fractals(tmp_path / "b", 5, 32, seed=0)
    c = generate_fractals(tmp_path / "c", 5, 32, seed=1)
    assert [p.name for p in a] == [f"fractal-{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in a]  # no temp files left
    assert _digests(a) == _digests(b)
    assert len(set(_digests(a)) | set(_digests(c))) == 10  # all ten pictures differ


def test_fractal_i_depends_only_on_seed_and_i(tmp_path):
    few = generate_fractals(tmp_path / "few", 2, 24, seed=7)
    more = generate_fractals(tmp_path / "more", 4, 24, seed=7)
    assert _digests(few) == _digests(more)[:2]
    want = fractal_image(derive_seed(7, "pixmix-fractals", 3), 24)
    assert np.array_equal(np.asarray(Image.open(more[3])), np.asarray(want))


def test_fractals_are_rgb_of_the_size_and_not_flat(tmp_path):
    paths = generate_fractals(tmp_path, 12, 40, seed=3)
    assert len(paths) == 12
    for p in paths:
        img = Image.open(p)
        assert img.size == (40, 40) and img.mode == "RGB"
        arr = np.asarray(img).astype(np.float64)
        assert arr.std() > 8  # on 0..255
        assert (arr.max(2) > 0).mean() > 0.03  # at least 3% of the pixels lit
        assert (arr.max(2) == 0).mean() > 0.2  # ... on a dark background, as PixMix's fractals
    ms = MixingSet(tmp_path)
    assert len(ms) == 12 and ms.pick(np.random.default_rng(0), 32).size == (32, 32)


def test_generate_fractals_errors(tmp_path):
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_fractals(tmp_path, -1, 32, 0)
    with pytest.raises(ValueError, match="size must be >= 8"):
        generate_fractals(tmp_path, 1, 4, 0)
    assert generate_fractals(tmp_path / "none", 0, 32, 0) == []
