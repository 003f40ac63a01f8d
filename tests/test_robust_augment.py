"""Robustifying augmentation recipes on batches (SPEC §3, paper §4.2 / Table 4): config validation,
DeepAugment on the drawn fraction of rows, per-row AugMix/PixMix draws that do not depend on how the
batch is sliced, the PixMix and AugMix+PixMix combinations, and PixMix's single random op."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import robustify.augment.robust as robust_module
from robustify.augment.augmix import AUGMIX_ALL_OPS, AUGMIX_OPS, SIGNED_OPS, AugMix, augment_and_mix
from robustify.augment.deepaugment import DeepAugment
from robustify.augment.mixing_set import MixingSet, generate_fractals
from robustify.augment.pixmix import IMAGENET_BETA, IMAGENET_K, pixmix, to_tensor
from robustify.augment.robust import PixMixOptions, RobustRecipe, random_op, row_seeds

pytestmark = pytest.mark.usefixtures("single_thread")

OVERLAPPING = {"color", "contrast", "brightness", "sharpness"}  # the ops that overlap ImageNet-C


def images(n: int = 8, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Float images in [0, 1] on the uint8 grid, so the recipe's PIL round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy(), "RGB")


def changed_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a != b).flatten(1).any(1)


@pytest.fixture(scope="module")
def mixing_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fractals")
    generate_fractals(out, 3, 32, seed=0)
    return out


# ------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("params, match", [
    ({"cutmix": {}},
     r"teachers\.augment: unknown key\(s\) \['cutmix'\] \(allowed: \['augmix', 'deepaugment', 'pixmix'\]\)"),
    ({"deepaugment": {"kind": "noise2net", "eps": 1}}, r"teachers\.augment\.deepaugment: unknown key\(s\) \['eps'\]"),
    ({"pixmix": {"mixing_set": "m", "alpha": 3}}, r"teachers\.augment\.pixmix: unknown key\(s\) \['alpha'\]"),
    ({"augmix": {"widht": 3}}, r"teachers\.augment\.augmix: .*'widht'"),
    ({"augmix": {"severity": 20}}, r"augmix: severity must be in \[0\.1, 10\], got 20"),
    ({"deepaugment": {"kind": "noise2net", "fraction": 1.5}}, r"deepaugment\.fraction must be in \[0, 1\], got 1\.5"),
    ({"deepaugment": {"kind": "resnet"}}, "deepaugment kind must be one of"),
    ({"deepaugment": {"kind": "edsr"}}, "deepaugment kind 'edsr' needs pretrained EDSR weights"),
    ({"augmix": None, "deepaugment": None, "pixmix": None}, "needs at least one of augmix, deepaugment, pixmix"),
    ({}, "needs at least one of augmix, deepaugment, pixmix"),
])
def test_from_params_errors_name_the_key(params, match):
    with pytest.raises(ValueError, match=match):
        RobustRecipe.from_params(params, "teachers.augment")


def test_pixmix_section_without_a_mixing_set_names_the_section():
    with pytest.raises(ValueError, match=r"augment\.pixmix"):
        RobustRecipe.from_params({"pixmix": {"k": 2}})


def test_from_params_sections_and_params_round_trip(mixing_dir):
    r = RobustRecipe.from_params({"augmix": {"width": 2}, "deepaugment": {"fraction": 0.25}})
    assert r.augmix == AugMix(width=2) and r.deepaugment.kind == "noise2net" and r.deepaugment_fraction == 0.25
    assert r.pixmix is None
    assert r.params == {"augmix": {"severity": 1.0, "width": 2, "depth": -1, "alpha": 1.0, "all_ops": False},
                        "deepaugment": {"kind": "noise2net", "weights": None, "max_eps": 0.75, "fraction": 0.25},
                        "pixmix": None}
    p = RobustRecipe.from_params({"pixmix": {"mixing_set": str(mixing_dir), "severity": 3}})
    assert p.pixmix == PixMixOptions(str(mixing_dir), IMAGENET_K, IMAGENET_BETA, 3.0) and p.augmix is None
    for recipe in (r, p):
        assert RobustRecipe.from_params(recipe.params).params == recipe.params


# ------------------------------------------------------------------------------ DeepAugment rows
def deep_recipe(fraction: float) -> RobustRecipe:
    return RobustRecipe.from_params({"deepaugment": {"kind": "noise2net", "fraction": fraction}})


def test_deep_changes_exactly_the_drawn_rows():
    x = images(16)
    out = deep_recipe(0.5).deep(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    drawn = torch.rand(16, generator=g) < 0.5  # the recipe's first draw
    assert 3 <= int(drawn.sum()) <= 13
    assert torch.equal(changed_rows(out, x), drawn)
    assert torch.equal(out[~drawn], x[~drawn]) and torch.equal(x, images(16))  # input untouched
    # the drawn rows are one freshly perturbed network (drawn next from the same generator) on those rows
    torch.testing.assert_close(out[drawn], DeepAugment()(x[drawn], g), rtol=0, atol=0)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(deep_recipe(0.5).deep(x, torch.Generator().manual_seed(3)), out)  # same seed, same bytes
    assert not torch.equal(deep_recipe(0.5).deep(x, torch.Generator().manual_seed(4)), out)


def test_deep_fraction_zero_is_the_identity_and_one_changes_every_row():
    x = images(16)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert torch.equal(deep_recipe(0.0).deep(x, g), x) and torch.equal(g.get_state(), state)  # nothing drawn
    assert changed_rows(deep_recipe(1.0).deep(x, torch.Generator().manual_seed(3)), x).all()
    augmix_only = RobustRecipe.from_params({"augmix": {}})
    assert torch.equal(augmix_only.deep(x, g), x)


# ------------------------------------------------------------------------------ per-row mixing
def test_row_seeds_do_not_depend_on_the_slice():
    whole = row_seeds(1234, 0, 10)
    assert len(set(whole)) == 10 and all(0 <= s < 2**64 for s in whole)
    assert row_seeds(1234, 3, 4) == whole[3:7] and row_seeds(1234, 0, 6) == whole[:6]
    assert row_seeds(1234, 0, 10) == whole and row_seeds(1235, 0, 10) != whole


def test_augmix_mix_is_per_row_deterministic_and_slice_independent():
    recipe = RobustRecipe.from_params({"augmix": {}})
    x = images(8)
    seeds = row_seeds(99, 0, 8)
    out = recipe.mix(x, seeds)
    assert out.shape == x.shape and out.dtype == torch.float32 and changed_rows(out, x).all()
    assert torch.equal(recipe.mix(x, seeds), out)
    assert torch.equal(recipe.mix(x[2:5], row_seeds(99, 2, 3)), out[2:5])  # a DDP rank's rows
    assert not torch.equal(recipe.mix(x, row_seeds(100, 0, 8)), out)
    for i in (0, 5):  # row i = the reference AugMix of that image with its own generator
        assert torch.equal(out[i], augment_and_mix(pil(x[i]), np.random.default_rng(seeds[i])))
    with pytest.raises(ValueError, match="8 images but 3 seeds"):
        recipe.mix(x, seeds[:3])
    assert torch.equal(deep_recipe(1.0).mix(x, seeds), x)  # DeepAugment alone: no per-row mixing


def test_call_is_deepaugment_then_mixing():
    recipe = RobustRecipe.from_params({"augmix": {}, "deepaugment": {"fraction": 0.5}})
    x, seeds = images(6), row_seeds(5, 0, 6)
    out = recipe(x, torch.Generator().manual_seed(2), seeds)
    assert torch.equal(out, recipe.mix(recipe.deep(x, torch.Generator().manual_seed(2)), seeds))


# ------------------------------------------------------------------------------ PixMix combinations
def test_pixmix_recipe_follows_the_reference_draw_order(mixing_dir):
    recipe = RobustRecipe.from_params({"pixmix": {"mixing_set": str(mixing_dir)}})
    x, seeds = images(4, 1), row_seeds(7, 0, 4)
    out = recipe.mix(x, seeds)
    # a sample may be the image itself (U{0..k} = 0 rounds and the coin kept the original)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and changed_rows(out, x).any()
    assert torch.equal(recipe.mix(x, seeds), out) and torch.equal(recipe.mix(x[1:3], row_seeds(7, 1, 2)), out[1:3])
    pictures = MixingSet(mixing_dir)
    assert len(pictures) == 3
    for i in range(4):  # the mixing picture is drawn first (the reference's dataset), then PixMix's draws
        rng = np.random.default_rng(seeds[i])
        picture = pictures.pick(rng, 32)
        expected = pixmix(pil(x[i]), picture, rng, lambda p, r: random_op(p, r, 1.0), k=IMAGENET_K, beta=IMAGENET_BETA)
        assert torch.equal(out[i], expected)


def test_augmix_plus_pixmix_uses_an_augmix_chain_as_the_pixmix_op(mixing_dir):
    # k = 0: the sample is either the image or one AugMix view of it (a fair coin), no mixing rounds
    recipe = RobustRecipe.from_params({"augmix": {}, "pixmix": {"mixing_set": str(mixing_dir), "k": 0}})
    x, seeds = images(12, 2), row_seeds(3, 0, 12)
    out = recipe.mix(x, seeds)
    branches = set()
    for i in range(12):
        rng = np.random.default_rng(seeds[i])
        MixingSet(mixing_dir).pick(rng, 32)
        augmented = rng.random() < 0.5
        branches.add(augmented)
        expected = to_tensor(pil(augment_and_mix(pil(x[i]), rng))) if augmented else x[i]
        assert torch.equal(out[i], expected), i
    assert branches == {True, False}
    both = RobustRecipe.from_params({"augmix": {}, "pixmix": {"mixing_set": str(mixing_dir)}})
    pix = RobustRecipe.from_params({"pixmix": {"mixing_set": str(mixing_dir)}})
    a, b = both.mix(x, seeds), pix.mix(x, seeds)
    assert a.min() >= 0 and a.max() <= 1 and torch.equal(both.mix(x, seeds), a) and not torch.equal(a, b)


def test_a_missing_mixing_set_is_named_when_first_used(tmp_path):
    recipe = RobustRecipe.from_params({"pixmix": {"mixing_set": str(tmp_path / "nowhere")}})
    with pytest.raises(FileNotFoundError, match="mixing set folder not found: .*nowhere"):
        recipe.mix(images(1), row_seeds(0, 0, 1))


# ------------------------------------------------------------------------------ PixMix's single op
def test_random_op_never_uses_the_imagenet_c_overlapping_ops(monkeypatch):
    calls: list[tuple[str, float]] = []

    def recorder(name: str):
        def op(picture: Image.Image, level: float) -> Image.Image:
            calls.append((name, level))
            return picture
        return op

    for table in (AUGMIX_OPS, AUGMIX_ALL_OPS):  # whichever table the op came from, it is recorded
        for name in list(table):
            monkeypatch.setitem(table, name, recorder(name))
    assert robust_module.AUGMIX_OPS is AUGMIX_OPS  # the table random_op draws from
    picture = Image.new("RGB", (8, 8), (10, 20, 30))
    for seed in range(900):
        assert random_op(picture, np.random.default_rng(seed), 3.0) is picture
    names = Counter(name for name, _ in calls)
    assert len(calls) == 900 and set(names) == set(AUGMIX_OPS) and not set(names) & OVERLAPPING
    assert len(names) == 9 and min(names.values()) > 60  # uniform over the 9 ops (100 expected each)
    assert all(0.1 <= abs(level) <= 3.0 for _, level in calls)
    assert all(level > 0 for name, level in calls if name not in SIGNED_OPS)
    signs = {name: {level > 0 for n, level in calls if n == name} for name in SIGNED_OPS}
    assert all(s == {True, False} for s in signs.values())  # direction flipped with probability 1/2


def test_random_op_is_a_real_op_of_the_picture():
    picture = pil(images(1, 6)[0])
    outs = [random_op(picture, np.random.default_rng(s)) for s in range(6)]
    assert all(o.size == picture.size and o.mode == "RGB" for o in outs)
    assert any(not np.array_equal(np.asarray(o), np.asarray(picture)) for o in outs)
    assert np.array_equal(np.asarray(random_op(picture, np.random.default_rng(4))), np.asarray(outs[4]))
