"""The three-head student (SPEC §3, paper §4.1, App. G): layer views reproduce each library's forward,
the fraction-tuned split, the heads start as the original model, only the right weights move, the
frozen prefix never changes, and MC dropout reuses the cached prefix features."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

from robustify.config import ModelSpec
from robustify.methods.distill.student import (
    HEADS, ThreeHeadStudent, TunableDropout, mc_dropout, split_tower, tower_view, tuned_layer_counts,
)
from robustify.models.clip import create_clip
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead

pytestmark = pytest.mark.usefixtures("single_thread")

D, MLP, C = 16, 2, 5  # the timm ViT's width, MLP ratio and classes (hand counts below use them)


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random affine weights and running statistics in every norm layer: ModifiedResNet zero-inits
    bn3 (a block would be the identity) and fresh BN stats are 0/1 — both would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def seeded(seed: int, fn, *args, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args, **kwargs)


def clip_tower(arch: str) -> nn.Module:
    return randomize_norms(create_clip(ModelSpec("open_clip", arch, None), init_seed=0).visual, 1)


def open_clip_vit(layers: int = 3, **kw) -> nn.Module:
    tower = seeded(0, OpenClipViT, image_size=32, patch_size=8, width=32, layers=layers, heads=2, mlp_ratio=2.0,
                   output_dim=16, **kw)
    return randomize_norms(tower, 2)


def timm_vit(**kw) -> nn.Module:
    cfg = {"img_size": 32, "patch_size": 8, "embed_dim": D, "depth": 5, "num_heads": 2, "mlp_ratio": MLP,
           "num_classes": C, **kw}
    return randomize_norms(seeded(0, timm.create_model, "vit_tiny_patch16_224", pretrained=False, **cfg), 3)


def timm_resnet() -> nn.Module:
    return randomize_norms(seeded(0, timm.create_model, "resnet18", pretrained=False, num_classes=C), 4)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def zs_head(dim: int, seed: int = 5) -> ZeroShotHead:
    w = F.normalize(torch.randn(dim, C, generator=torch.Generator().manual_seed(seed)), dim=0)
    return ZeroShotHead(w, math.log(50.0))


def rn_zs_student(dropout: float = 0.25) -> tuple[ThreeHeadStudent, nn.Module]:
    """The mini-world setting: open_clip ModifiedResNet (4 blocks) + zero-shot head; 2 tuned blocks
    (layer3's block = shared, layer4's block + attnpool = head)."""
    original = ImageClassifier(clip_tower("tinyclip-rn32"), zs_head(64)).eval()
    return ThreeHeadStudent.from_model(original, 0.5, dropout=dropout), original


def vit_ve_student(dropout: float = 0.25) -> tuple[ThreeHeadStudent, nn.Module]:
    """timm ViT (5 blocks) with its linear head: 2 tuned blocks (block 3 shared, block 4 + norm = head)."""
    model = timm_vit()
    return ThreeHeadStudent.from_model(model, 0.4, dropout=dropout), model


# ------------------------------------------------------------------ layer views
TOWERS = {
    "open_clip-resnet": lambda: clip_tower("tinyclip-rn32"),
    "open_clip-vit": lambda: clip_tower("tinyclip-vit32"),
    "open_clip-vit-avg-ln-after-pool": lambda: open_clip_vit(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
    "open_clip-vit-attn-pool": lambda: open_clip_vit(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    "timm-vit": timm_vit,
    "timm-vit-avg-fc-norm": lambda: timm_vit(global_pool="avg"),
    "timm-vit-registers-no-cls": lambda: timm_vit(class_token=False, reg_tokens=2, no_embed_class=True, global_pool="avg"),
    "timm-vit-map": lambda: timm_vit(global_pool="map"),
    "timm-resnet": timm_resnet,
}
N_LAYERS = {"open_clip-resnet": 4, "open_clip-vit": 2, "timm-vit": 5, "timm-resnet": 8}


@pytest.mark.parametrize("name", list(TOWERS))
def test_pre_layers_post_is_the_library_forward(name):
    tower = TOWERS[name]()
    view = tower_view(tower)
    x = images()
    with torch.no_grad():
        if name.startswith("timm"):
            expected = tower.forward_head(tower.forward_features(x), pre_logits=True)
            logits = tower(x)
        else:
            expected = logits = tower(x)
        got = view.run(x)
    assert torch.equal(got, expected)
    if name.startswith("timm"):  # + the classifier = the timm model's logits
        assert torch.equal(tower.get_classifier()(got), logits)
    if name in N_LAYERS:
        assert len(view.layers) == N_LAYERS[name]
    # the layers are the tower's own modules, in forward order
    if name == "open_clip-resnet":
        assert view.layers == (tower.layer1[0], tower.layer2[0], tower.layer3[0], tower.layer4[0])
    if name == "timm-vit":
        assert view.layers == tuple(tower.blocks)


def test_unsupported_tower_is_a_clear_error():
    with pytest.raises(TypeError, match="no layer view for tower type torch.nn.modules.linear.Linear"):
        tower_view(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot take tower and classifier"):
        ThreeHeadStudent.from_model(nn.Linear(2, 2), 0.5)


# ------------------------------------------------------------------ fraction tuned
@pytest.mark.parametrize("n_layers, fraction, head_fraction, expected", [
    (12, 0.05, 0.2, (1, 1)),   # 0.6 → 1 tuned; the head section is at least one layer
    (12, 0.30, 0.2, (4, 1)),   # 3.6 → 4; 0.8 → 1
    (24, 0.30, 0.2, (7, 1)),   # 7.2 → 7; 1.4 → 1
    (10, 0.25, 0.2, (3, 1)),   # 2.5 → 3 (halves up); 0.6 → 1
    (40, 0.30, 0.2, (12, 2)),  # 12; 2.4 → 2
    (20, 0.50, 0.2, (10, 2)),  # 10; 2
    (4, 0.50, 0.2, (2, 1)),    # the mini-world tower
    (10, 0.50, 1.0, (5, 5)),   # all tuned layers in the heads, no shared section
])
def test_fraction_tuned_sets_the_layer_counts(n_layers, fraction, head_fraction, expected):
    assert tuned_layer_counts(n_layers, fraction, head_fraction) == expected


def test_split_takes_the_trailing_layers():
    tower = open_clip_vit(layers=10)
    split = split_tower(tower, 0.3)  # 3 tuned: 2 shared + 1 head
    blocks = tuple(tower.transformer.resblocks)
    assert (split.n_frozen, split.n_shared, split.n_head, split.n_tuned) == (7, 2, 1, 3)
    assert split.frozen_layers == blocks[:7] and split.shared_layers == blocks[7:9] and split.head_layers == blocks[9:]
    student = ThreeHeadStudent(split, zs_head(16))
    # dropout after every tunable layer, in the shared section and in each head
    assert [type(m) for m in student.shared] == [type(blocks[0]), TunableDropout] * 2
    assert all([type(m) for m in student.heads[h].layers] == [type(blocks[0]), TunableDropout] for h in HEADS)
    assert all(m.p == 0.25 for m in student.modules() if isinstance(m, TunableDropout))
    assert len(student.prefix.layers) == 7 and student.prefix.layers[6] is blocks[6]


@pytest.mark.parametrize("fraction, head_fraction, match", [
    (0.0, 0.2, "fraction_tuned must be in"),
    (1.0, 0.2, "fraction_tuned must be in"),
    (-0.1, 0.2, "fraction_tuned must be in"),
    (1.5, 0.2, "fraction_tuned must be in"),
    (float("nan"), 0.2, "fraction_tuned must be in"),
    (0.04, 0.2, "selects no layer"),   # 0.4 of 10 layers rounds to 0
    (0.96, 0.2, "selects all 10"),     # 9.6 rounds to 10: nothing frozen
    (0.3, 0.0, "head_fraction must be in"),
    (0.3, 1.2, "head_fraction must be in"),
])
def test_bad_fractions_are_rejected(fraction, head_fraction, match):
    with pytest.raises(ValueError, match=match):
        split_tower(open_clip_vit(layers=10), fraction, head_fraction)


def test_bad_dropout_and_head_names_are_rejected():
    split = split_tower(open_clip_vit(), 0.5)
    with pytest.raises(ValueError, match="dropout must be in"):
        ThreeHeadStudent(split, zs_head(16), dropout=1.0)
    student = ThreeHeadStudent(split, zs_head(16))
    with pytest.raises(ValueError, match="unknown heads \\['robust'\\]"):
        student(images(), heads=("clean", "robust"))


# ------------------------------------------------------------------ initialisation and training
@pytest.mark.parametrize("build", [rn_zs_student, vit_ve_student])
def test_every_head_starts_as_the_original_model(build):
    student, original = build()
    x = images()
    with torch.no_grad():
        expected = original(x)
        out = student.eval()(x)
    assert list(out) == list(HEADS)
    for h in HEADS:
        assert torch.equal(out[h], expected), h


@pytest.mark.parametrize("build, classifier_trains", [(rn_zs_student, False), (vit_ve_student, True)])
def test_one_step_on_one_head_moves_only_that_head_and_the_shared_section(build, classifier_trains):
    student, _ = build()
    student.train()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.1)
    y = torch.tensor([0, 1, 2, 3])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        logits = student(images(), heads=("unclean",))
    assert list(logits) == ["unclean"]
    F.cross_entropy(logits["unclean"], y).backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in student.named_parameters()
                if p.requires_grad and (n.startswith("shared.") or n.startswith("heads.unclean."))}
    assert changed == expected
    assert any(n.startswith("shared.") for n in changed) and any(n.startswith("heads.unclean.post.") for n in changed)
    assert any(n.startswith("heads.unclean.classifier.") for n in changed) == classifier_trains
    assert all(p.grad is None for n, p in student.named_parameters() if n.startswith(("heads.clean.", "heads.combined.", "prefix.")))


def test_frozen_prefix_and_its_batchnorm_statistics_never_change():
    student, _ = rn_zs_student()
    wrapper = nn.Sequential(student)
    wrapper.train()  # a parent's train() reaches the student's override
    assert student.training and not any(m.training for m in student.prefix.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in student.prefix.modules())
    prefix_before = {k: v.clone() for k, v in student.prefix.state_dict().items()}
    head_bn_before = student.heads["clean"].layers[0].bn1.running_mean.clone()
    opt = torch.optim.Adam(student.trainable_parameters(), lr=1e-2)
    y = torch.tensor([0, 1, 2, 3])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for step in range(3):
            opt.zero_grad()
            out = student(images(seed=step))
            sum(F.cross_entropy(out[h], y) for h in HEADS).backward()
            opt.step()
    after = student.prefix.state_dict()
    assert prefix_before.keys() == after.keys() and any("running_var" in k for k in after)
    assert all(torch.equal(prefix_before[k], after[k]) for k in after)
    assert all(not p.requires_grad and p.grad is None for p in student.prefix.parameters())
    # the tunable part really trained: the heads' own BatchNorm statistics moved
    assert not torch.equal(student.heads["clean"].layers[0].bn1.running_mean, head_bn_before)


def test_the_tower_stays_the_original_model_and_cannot_unfreeze_the_prefix():
    student, original = rn_zs_student()
    x = images()
    with torch.no_grad():
        expected = original.eval()(x)
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.1)
    sum(F.cross_entropy(v, torch.tensor([0, 1, 2, 3])) for v in student(x).values()).backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(original(x), expected)  # tunable parts are copies: T_clean is intact
    original.train()  # switches the prefix modules the student shares with the tower ...
    before = {k: v.clone() for k, v in student.prefix.state_dict().items()}
    f = student.features(x)  # ... which features() puts back in eval: BN statistics untouched
    assert not any(m.training for m in student.prefix.modules())
    assert all(torch.equal(before[k], v) for k, v in student.prefix.state_dict().items())
    assert torch.equal(f, student.features(x))


# ------------------------------------------------------------------ cached features and MC dropout
@pytest.mark.parametrize("build", [rn_zs_student, vit_ve_student])
def test_forward_from_features_equals_forward(build):
    student, _ = build()
    student.eval()
    x = images()
    f = student.features(x)
    assert not f.requires_grad
    via_features = student.forward_from_features(f)
    direct = student(x)
    assert all(torch.equal(via_features[h], direct[h]) for h in HEADS)
    assert list(student.forward_from_features(f, ("combined", "clean"))) == ["combined", "clean"]


def test_mc_dropout_samples_the_tunable_part_on_reused_features():
    student, _ = rn_zs_student(dropout=0.25)
    calls = []
    student.prefix.register_forward_hook(lambda *_: calls.append(1))
    student.train()
    with mc_dropout(student):
        assert all(m.training == isinstance(m, TunableDropout) for m in student.modules())
        f = student.features(images())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a = student.forward_from_features(f)
            b = student.forward_from_features(f)
            torch.manual_seed(0)
            a_again = student.forward_from_features(f)  # the masks follow the (seeded) global RNG
    assert len(calls) == 1  # the prefix ran once; both passes reused its features
    assert all(not torch.equal(a[h], b[h]) for h in HEADS)
    assert all(torch.equal(a[h], a_again[h]) for h in HEADS)
    # modes restored: tunable part training, prefix eval
    assert student.training and student.heads["clean"].layers[1].training
    assert not any(m.training for m in student.prefix.modules())
    with mc_dropout(student, enabled=False):  # dropout off: deterministic
        assert not any(m.training for m in student.modules())
        c, d = student.forward_from_features(f), student.forward_from_features(f)
    assert all(torch.equal(c[h], d[h]) for h in HEADS)


def test_mc_dropout_with_zero_rate_gives_identical_passes():
    student, _ = rn_zs_student(dropout=0.0)
    with mc_dropout(student):
        f = student.features(images())
        a, b = student.forward_from_features(f), student.forward_from_features(f)
    assert all(torch.equal(a[h], b[h]) for h in HEADS)


# ------------------------------------------------------------------ parameter counts
BLOCK = (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (2 * D) + (D * MLP * D + MLP * D) + (MLP * D * D + D)  # 2224
NORM = 2 * D
LINEAR = D * C + C


def test_trainable_parameters_are_the_shared_section_plus_three_heads():
    assert BLOCK == 2224
    ve, _ = vit_ve_student()  # shared: 1 block; each head: 1 block + final norm + linear classifier
    counts = {k: sum(p.numel() for p in ps) for k, ps in ve.section_parameters().items()}
    assert counts == {"shared": BLOCK, "clean": BLOCK + NORM + LINEAR, "unclean": BLOCK + NORM + LINEAR,
                      "combined": BLOCK + NORM + LINEAR}
    assert ve.count_trainable() == BLOCK + 3 * (BLOCK + NORM + LINEAR) == 9247
    # zero-shot setup: the text-embedding classifier stays frozen
    zs = ThreeHeadStudent(split_tower(timm_vit(), 0.4), zs_head(D))
    assert zs.count_trainable() == BLOCK + 3 * (BLOCK + NORM) == 8992
    assert all(not p.requires_grad for h in HEADS for p in zs.heads[h].classifier.parameters())
    assert sum(p.numel() for p in ThreeHeadStudent(split_tower(timm_vit(), 0.4), zs_head(D), classifier_trainable=True)
               .trainable_parameters()) == 8992 + 3 * D * C
    assert {id(p) for p in ve.trainable_parameters()} == {id(p) for p in ve.parameters() if p.requires_grad}
