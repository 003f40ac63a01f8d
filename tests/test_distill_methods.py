"""The partial-tuning methods in the one fine-tuning loop (SPEC §3, paper §4–5): what each variant trains
and leaves alone, the routing of rows to heads and teachers, the teachers' inputs, the augmented
fraction of a batch, the robust-teacher recipe (AugMix + JSD in one forward), student and timm
classifier directories, and the loop hooks these methods rely on (`setup`, `prepare`, `forward`,
`ce_on_logits`, `Batch.extras`, timing of `prepare`)."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.modified_resnet import ModifiedResNet
from safetensors.torch import save_file
from torch import nn

from robustify.augment.augmix import jsd_loss
from robustify.config import ModelSpec
from robustify.eval.cost import count_trainable
from robustify.io import load_safetensors, read_json, write_json
from robustify.methods.distill.checkpoint import is_student_dir, load_student, save_student
from robustify.methods.distill.method import HeadView, TeacherInput
from robustify.methods.distill.prefix_cache import PrefixCache
from robustify.methods.distill.selection import mc_head_outputs
from robustify.methods.distill.student import HEADS, ThreeHeadStudent, split_tower
from robustify.methods.finetune import (
    Batch, FineTuneConfig, FineTuneMethod, ImageData, RunContext, StepInfo, finetune, make_method, method_accepts,
)
from robustify.models.clip import create_clip, save_clip
from robustify.models.timm_models import TimmEncoder, load_timm_classifier, save_timm_classifier, timm_classifier
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead, load_classifier, save_zeroshot_classifier

pytestmark = pytest.mark.usefixtures("single_thread")

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)  # the student's (CLIP-like) normalisation
C, D = 4, 16  # classes, tower output dim
T_MEAN, T_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # timm test_resnet's data config

# Hand counts for ModifiedResNet(layers=(1,1,1,1), width=16, output_dim=16, heads=2) at fraction_tuned 0.5:
# 4 blocks → 2 tuned: layer3's block is the shared section, layer4's block + attnpool the head section.
#   layer3 Bottleneck(128→64): conv1 128·64 + conv2 64·64·9 + conv3 64·256 + downsample 128·256
#                              + BN (2·64 + 2·64 + 2·256 + 2·256)                       =    95 488
#   layer4 Bottleneck(256→128): 256·128 + 128·128·9 + 128·512 + 256·512 + 2·(128+128+512+512) = 379 392
#   attnpool: pos 2·512 + q/k/v 3·(512·512+512) + c_proj 512·16+16                    =   797 200
#   zero-shot head columns D×C = 16·4                                                  =        64
SHARED_N, HEAD_N, CLS_N = 95_488, 379_392 + 797_200, D * C
TRAINABLE = {  # (visual setup: classifier trained, zero-shot setup: classifier frozen)
    3: (SHARED_N + 3 * (HEAD_N + CLS_N), SHARED_N + 3 * HEAD_N),
    1: (SHARED_N + HEAD_N + CLS_N, SHARED_N + HEAD_N),
}
# method → (number of heads, uses T_clean, uses T_robust)
VARIANTS = {
    "three-head": (3, True, True), "three-head-no-kd": (3, False, False), "single-teacher": (3, False, True),
    "only-kd": (1, False, True), "combined-head": (1, True, True), "apt": (1, False, False),
}


# ------------------------------------------------------------------------------------ builders
def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine weights and running statistics: ModifiedResNet zero-inits bn3 and fresh stats
    are 0/1, either of which would hide a block that was skipped or run in the wrong mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def rn_tower() -> ModifiedResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=D, heads=2, image_size=32, width=16)
    return randomize_norms(tower, 1)


def zs_head(dim: int = D, seed: int = 5) -> ZeroShotHead:
    w = F.normalize(torch.randn(dim, C, generator=torch.Generator().manual_seed(seed)), dim=0)
    return ZeroShotHead(w, math.log(10.0))


def classifier() -> ImageClassifier:
    return ImageClassifier(rn_tower(), zs_head())


def timm_teacher(seed: int = 3) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=C)
    return randomize_norms(model, seed + 1)


def make_data(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.randint(0, C, (n,), generator=g), MEAN, STD)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def unit(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    save_timm_classifier(out, timm_classifier(timm_teacher(), 32), "test_resnet", {"model_id": "teachers/t"})
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, ImageData]:
    return {"train": make_data(64, 0), "val": make_data(12, 1)}


def set_up(name: str, data: dict, teacher_dir: Path | None, **params: Any) -> tuple[Any, ImageClassifier]:
    """The method after `setup` on a fresh classifier (what the loop trains is `method.student`)."""
    model = classifier()
    if teacher_dir is not None:
        params["teacher"] = str(teacher_dir)
    method = make_method(name, {"fraction_tuned": 0.5, **params})
    cfg = FineTuneConfig(steps=1, batch_size=8)
    method.setup(model, RunContext(copy.deepcopy(model), None, data["train"], data["val"], cfg, 0, "cpu"))
    return method, model


def train(name: str, data: dict, teacher_dir: Path, steps: int = 2, **params: Any) -> tuple:
    model = classifier()
    snapshot = copy.deepcopy(model)
    method = make_method(name, {"fraction_tuned": 0.5, "teacher": str(teacher_dir), **params})
    cfg = FineTuneConfig(steps=steps, batch_size=16, lr=1e-3)
    result = finetune(model, copy.deepcopy(model), method, data["train"], data["val"], cfg, seed=0)
    return result, method, model, snapshot


# ------------------------------------------------------------------------- what each variant trains
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_its_sections_and_leaves_the_initial_model_bit_identical(name, data, teacher_dir):
    n_heads, uses_clean, uses_robust = VARIANTS[name]
    result, method, model, snapshot = train(name, data, teacher_dir)
    student = method.student
    assert isinstance(student, ThreeHeadStudent)
    assert list(student.heads) == (list(HEADS) if n_heads == 3 else ["combined"])
    # the classifier handed to the loop (tower = frozen prefix + original trailing layers, original head) is θ0
    assert states_equal(model, snapshot)
    assert student.prefix.pre.conv1 is model.encoder.conv1 and student.prefix.layers[1] is model.encoder.layer2[0]
    assert not any(p.requires_grad for p in student.prefix.parameters())
    # every tuned section moved away from its initial copy
    s0 = snapshot.encoder
    assert not torch.equal(student.shared[0].conv2.weight, s0.layer3[0].conv2.weight)
    for h in student.heads.values():
        assert not torch.equal(h.layers[0].conv2.weight, s0.layer4[0].conv2.weight)
        assert not torch.equal(h.post.c_proj.weight, s0.attnpool.c_proj.weight)
        assert not torch.equal(h.classifier.weight, snapshot.head.weight)  # visual setup: linear head trained
    assert count_trainable(student) == TRAINABLE[n_heads][0]
    # teachers: only those the variant's loss uses are built; T_clean is the tower's own trailing layers
    assert (method.tail is not None) == uses_clean and (method.robust is not None) == uses_robust
    if uses_clean:
        assert method.tail.layers[0] is model.encoder.layer3[0] and method.tail.layers[1] is model.encoder.layer4[0]
        assert method.tail.post is model.encoder.attnpool and method.tail.head is model.head
    # the loop's CE is off: the routed loss is the whole loss; KD terms exactly when a teacher is used
    logs = result.history[-1]
    assert "ce" not in logs and logs["loss"] == pytest.approx(logs["loss_clean"] + logs["loss_aug"], rel=1e-6)
    assert any(k.startswith("kd_") for k in logs) == (uses_clean or uses_robust)
    assert logs["n_clean"] == logs["n_aug"] == 8  # a = 0.5 of 16 rows
    # the saved model is the combined head of the trained student; prepare is timed apart from the step
    assert isinstance(result.model, HeadView) and result.model.head == "combined"
    x = data["val"].normalise(data["val"].images, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), student.eval()(x, ("combined",))["combined"], rtol=0, atol=1e-5)
    assert len(result.prep_times) == len(result.step_times) == 2 and min(result.prep_times) > 0


def test_zeroshot_setup_keeps_every_classifier_frozen(data, teacher_dir):
    result, method, model, snapshot = train("three-head", data, teacher_dir, setup="zeroshot")
    student = method.student
    assert count_trainable(student) == TRAINABLE[3][1]
    for h in student.heads.values():
        assert not h.classifier.weight.requires_grad
        assert torch.equal(h.classifier.weight, snapshot.head.weight)  # the prompt embeddings stay fixed
        assert not torch.equal(h.layers[0].conv2.weight, snapshot.encoder.layer4[0].conv2.weight)
    assert states_equal(model, snapshot)
    apt, _ = set_up("apt", data, None, setup="zeroshot")
    assert count_trainable(apt.student) == TRAINABLE[1][1]


# ------------------------------------------------------------------------------------- routing
MASK = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)


def routed_step(method: Any, x: torch.Tensor, labels: torch.Tensor) -> tuple[dict, dict, dict]:
    """One routed forward + loss + backward: (per-section gradients, logits' gradients, extras)."""
    student = method.student
    student.zero_grad(set_to_none=True)
    extras = {"augmented": MASK.clone()}
    features, logits = method.forward(student, x, extras)
    for z in logits.values():
        z.retain_grad()
    loss, _ = method.extra_loss(Batch(x, labels, features, logits, 0, 0, None, extras), student, None)
    loss.backward()
    sections = {"shared": student.shared, **student.heads}
    grads = {name: torch.cat([p.grad.flatten() for p in m.parameters() if p.requires_grad])
             for name, m in sections.items()}
    return grads, {h: z.grad for h, z in logits.items()}, extras


def test_each_head_learns_only_from_its_rows_and_teachers_see_only_theirs(data, teacher_dir):
    method, model = set_up("three-head", data, teacher_dir)
    student = method.student.eval()  # dropout off, BN on running stats: rows are independent
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # as after some training: the tuned copies no longer equal the original layers
        for p in student.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    x = data["train"].normalise(data["train"].images[:8], "cpu")
    labels = data["train"].labels[:8]
    grads, logit_grads, extras = routed_step(method, x, labels)
    # the heads' logits carry gradient exactly on their rows
    assert logit_grads["clean"][MASK].abs().sum() == 0 and (logit_grads["clean"][~MASK].abs().sum(1) > 0).all()
    assert logit_grads["unclean"][~MASK].abs().sum() == 0 and (logit_grads["unclean"][MASK].abs().sum(1) > 0).all()
    assert (logit_grads["combined"].abs().sum(1) > 0).all()
    # perturb an augmented row: the clean head's gradient is unchanged, the unclean and combined heads' move
    on_aug = x.clone()
    on_aug[3] += 0.7
    g_aug, _, _ = routed_step(method, on_aug, labels)
    on_clean = x.clone()
    on_clean[2] += 0.7
    g_clean, _, _ = routed_step(method, on_clean, labels)
    torch.testing.assert_close(g_aug["clean"], grads["clean"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_clean["unclean"], grads["unclean"], rtol=1e-6, atol=1e-9)
    for g, moved in ((g_aug, "unclean"), (g_clean, "clean")):
        assert (g[moved] - grads[moved]).abs().max() > 1e-4
        assert (g["combined"] - grads["combined"]).abs().max() > 1e-4
        assert (g["shared"] - grads["shared"]).abs().max() > 1e-4
    # a head computes logits only on its rows (zeros elsewhere), the same as running it on every row
    with torch.no_grad():
        features, logits = method.forward(student, x, {"augmented": MASK.clone()})
        z = student.shared(features)
        full = {h: student.heads[h](z) for h in HEADS}
    assert (logits["clean"][MASK] == 0).all() and (logits["unclean"][~MASK] == 0).all()
    torch.testing.assert_close(logits["clean"][~MASK], full["clean"][~MASK], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["unclean"][MASK], full["unclean"][MASK], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits["combined"], full["combined"], rtol=0, atol=1e-5)
    # T_clean (the original trailing layers on the cached prefix features) = the initial classifier
    reference = classifier()
    with torch.no_grad():
        torch.testing.assert_close(extras["clean_teacher"], reference(x[~MASK]), rtol=0, atol=1e-5)
        # T_robust = the teacher on the same pixels normalised its own way (test_resnet: mean = std = 0.5)
        teacher, _ = load_classifier(teacher_dir)
        expected = teacher((unit(x[MASK]) - 0.5) / 0.5)
    assert extras["clean_teacher"].shape == (4, C) and extras["robust_teacher"].shape == (4, C)
    torch.testing.assert_close(extras["robust_teacher"], expected, rtol=0, atol=1e-5)
    assert (extras["robust_teacher"] - teacher(x[MASK])).abs().max() > 1e-3  # the re-normalisation matters


def test_combined_head_variant_routes_both_teachers_into_one_head(data, teacher_dir):
    method, _ = set_up("combined-head", data, teacher_dir)
    method.student.eval()
    x = data["train"].normalise(data["train"].images[:8], "cpu")
    extras = {"augmented": MASK.clone()}
    with torch.no_grad():
        _, logits = method.forward(method.student, x, extras)
        reference = classifier()
        torch.testing.assert_close(extras["clean_teacher"], reference(x[~MASK]), rtol=0, atol=1e-5)
    assert isinstance(logits, torch.Tensor) and logits.shape == (8, C)  # one head, every row
    assert extras["robust_teacher"].shape == (4, C)


def test_teacher_input_resizes_to_the_teachers_size(tmp_path):
    teacher = timm_teacher(7)
    save_timm_classifier(tmp_path, timm_classifier(teacher, 24), "test_resnet", {"model_id": "teachers/t24"})
    loaded, info = load_classifier(tmp_path)
    assert info["image_size"] == 24
    wrapped = TeacherInput(loaded, MEAN, STD).eval()
    x = make_data(3, 9).normalise(make_data(3, 9).images, "cpu")
    small = TF.resize(unit(x), [24, 24], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), teacher.eval()((small - 0.5) / 0.5), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="robust teacher must be a classifier directory"):
        TeacherInput(nn.Linear(3, 3), MEAN, STD)


# ------------------------------------------------------------------------------------- prepare
def info(step: int = 3, first: int = 0, total: int = 32) -> StepInfo:
    return StepInfo(step, 7, first, total, MEAN, STD)


@pytest.fixture(scope="module")
def batch32() -> torch.Tensor:
    d = make_data(32, 4)
    return d.normalise(d.images, "cpu")


def test_prepare_augments_exactly_a_of_the_batch_deterministically(batch32, data):
    method, _ = set_up("apt", data, None)  # default recipe: DeepAugment (noise2net) then AugMix
    x = batch32.clone()
    out, extras = method.prepare(x, None, info())
    aug = extras["augmented"]
    assert aug.dtype == torch.bool and int(aug.sum()) == 16  # a = 0.5 of B = 32
    assert torch.equal(x, batch32)  # the input batch is not modified in place
    assert torch.equal(out[~aug], batch32[~aug])  # clean rows untouched
    # every augmented row changed (AugMix's mix weight m ~ Beta(1, 1) can be near 0: some rows only slightly)
    assert ((out[aug] - batch32[aug]).abs().amax(dim=(1, 2, 3)) > 0).all()
    again, extras2 = method.prepare(batch32.clone(), None, info())
    assert torch.equal(again, out) and torch.equal(extras2["augmented"], aug)  # a function of (seed, step)
    other, extras3 = method.prepare(batch32.clone(), None, info(step=4))
    assert int(extras3["augmented"].sum()) == 16 and not torch.equal(other, out)
    none, e0 = set_up("apt", data, None, a=0.0)[0].prepare(batch32.clone(), None, info())
    every, e1 = set_up("apt", data, None, a=1.0)[0].prepare(batch32.clone(), None, info())
    assert int(e0["augmented"].sum()) == 0 and torch.equal(none, batch32)
    assert int(e1["augmented"].sum()) == 32 and ((every - batch32).abs().amax(dim=(1, 2, 3)) > 0).all()


def test_prepare_of_a_rank_slice_with_augmix_is_the_slice_of_the_whole_batch(batch32, data):
    method, _ = set_up("apt", data, None, augment={"augmix": {}})
    whole, e = method.prepare(batch32.clone(), None, info())
    part, p = method.prepare(batch32[8:24].clone(), None, info(first=8))
    assert torch.equal(p["augmented"], e["augmented"][8:24]) and torch.equal(part, whole[8:24])


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "Known limitation (StepInfo docstring): PartialTuning.prepare / RobustTeacher.prepare draw the DeepAugment "
    "rows and network for the rank's slice, not for the global batch, so a DDP rank's rows differ from a single "
    "process's"))
@pytest.mark.parametrize("name", ["apt", "augmix-jsd"])
def test_prepare_of_a_rank_slice_with_deepaugment_is_the_slice_of_the_whole_batch(name, batch32, data):
    method = set_up(name, data, None)[0] if name == "apt" else make_method(name)
    whole, e = method.prepare(batch32.clone(), None, info())
    part, p = method.prepare(batch32[8:24].clone(), None, info(first=8))
    assert torch.equal(part, whole[8:24])
    if name == "augmix-jsd":
        assert torch.equal(p["views"].view(2, 16, 3, 32, 32), e["views"].view(2, 32, 3, 32, 32)[:, 8:24])


# ------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("name", ["three-head", "single-teacher", "only-kd", "combined-head"])
def test_methods_that_distil_from_the_robust_teacher_require_one(name):
    with pytest.raises(ValueError, match=f"method '{name}' distils from a robust teacher: give params.teacher"):
        make_method(name, {"fraction_tuned": 0.5})


def test_methods_without_a_teacher_ignore_one_and_bad_params_are_named(data, teacher_dir):
    for name in ("apt", "three-head-no-kd"):
        method = make_method(name, {"teacher": str(teacher_dir), "teacher_name": "t"})
        assert method.teacher_dir is None and method.params["teacher"] is None
        set_up(name, data, None)  # builds without any teacher
    assert all(method_accepts(n, "teacher") for n in VARIANTS)
    assert method_accepts("apt", "fraction_tuned") and method_accepts("augmix-jsd", "jsd_weight")
    assert not method_accepts("augmix-jsd", "teacher") and not method_accepts("ft", "teacher")
    assert not method_accepts("no-such-method", "teacher") and not method_accepts("apt", "no_such_param")
    for params, match in (({"a": 1.5}, r"method 'apt': a \(fraction of augmented samples\) must be in \[0, 1\]"),
                          ({"setup": "linear"}, "method 'apt': setup must be one of"),
                          ({"temperature": 0}, "method 'apt': temperature must be > 0"),
                          ({"augment": {"cutmix": {}}}, r"apt.augment: unknown key\(s\) \['cutmix'\]")):
        with pytest.raises(ValueError, match=match):
            make_method("apt", params)
    missing = Path(teacher_dir).parent / "no-teacher-here"
    with pytest.raises(FileNotFoundError, match="no-teacher-here"):
        set_up("three-head", data, missing)


# ------------------------------------------------------------------------------ robust teacher
def teacher_data(n: int, seed: int) -> ImageData:
    d = make_data(n, seed)
    return ImageData(d.images, d.labels, T_MEAN, T_STD)  # normalised the teacher's way


def teacher_batch(n: int = 8) -> tuple[ImageClassifier, torch.Tensor, torch.Tensor]:
    d = teacher_data(n, 11)
    return timm_classifier(timm_teacher(), 32), d.normalise(d.images, "cpu"), d.labels


def test_augmix_jsd_step_is_one_forward_and_its_loss_is_the_jsd_of_the_three_splits():
    method = make_method("augmix-jsd")  # AugMix + noise2net DeepAugment, weight 12
    assert not method.ce_on_logits
    model, x, labels = teacher_batch()
    step = StepInfo(0, 5, 0, 8, T_MEAN, T_STD)
    clean, extras = method.prepare(x.clone(), labels, step)
    views = extras["views"]
    assert views.shape == (16, 3, 32, 32) and (views[:8] - views[8:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # the clean split is the DeepAugment sample on the rows drawn (fraction 0.5), the image itself elsewhere
    deep = torch.rand(8, generator=step.generator(0)) < 0.5
    assert 0 < int(deep.sum()) < 8
    torch.testing.assert_close(clean[~deep], x[~deep], rtol=0, atol=1e-5)
    assert ((clean[deep] - x[deep]).abs().amax(dim=(1, 2, 3)) > 0.05).all()
    sizes = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    model.train()
    features, logits = method.forward(model, clean, extras)
    handle.remove()
    assert sizes == [24] and features is None and logits.shape == (8, C)  # ONE forward of the triple
    loss, logs = method.extra_loss(Batch(clean, labels, None, logits, 0, 5, None, extras), model, None)
    with torch.no_grad():  # by hand, in float64, from one forward of the concatenated splits
        z = model(torch.cat([clean, views])).double()
    p = z.softmax(-1).chunk(3)
    mixture = ((p[0] + p[1] + p[2]) / 3).clamp(1e-7, 1).log()
    js = sum((q * (q.log() - mixture)).sum(-1).mean() for q in p) / 3
    ce = F.cross_entropy(z[:8], labels)
    loss = float(loss.detach())
    assert loss == pytest.approx(float(ce + 12 * js), rel=1e-5)
    assert loss == pytest.approx(float(jsd_loss(*z.float().chunk(3), labels, 12.0)), rel=1e-6)
    assert logs["ce_clean"] == pytest.approx(float(ce), rel=1e-5)
    assert logs["jsd_term"] == pytest.approx(float(12 * js), rel=1e-4) and logs["jsd_term"] > 1e-4


def test_augmix_jsd_in_the_loop_runs_one_forward_per_step():
    model, _, _ = teacher_batch()
    train_data, val_data = teacher_data(32, 12), teacher_data(12, 13)
    sizes = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    cfg = FineTuneConfig(steps=2, batch_size=8, lr=1e-3)
    result = finetune(model, copy.deepcopy(model), make_method("augmix-jsd"), train_data, val_data, cfg, seed=0)
    assert sizes == [24, 24, 12]  # two training steps of 3·8 rows, then the validation split
    logs = result.history[-1]
    assert "ce" not in logs and logs["loss"] == pytest.approx(logs["ce_clean"] + logs["jsd_term"], rel=1e-5)


def test_augmix_jsd_with_zero_weight_trains_the_robust_sample_with_the_loops_ce():
    method = make_method("augmix-jsd", {"jsd_weight": 0})
    assert method.ce_on_logits and method.params["jsd_weight"] == 0.0
    model, x, labels = teacher_batch()
    out, extras = method.prepare(x.clone(), labels, StepInfo(0, 5, 0, 8, T_MEAN, T_STD))
    assert extras == {} and method.forward(model, out, extras) is None  # the loop's own forward
    assert ((out - x).abs().amax(dim=(1, 2, 3)) > 1e-3).all()  # every row replaced by its robust sample
    assert method.extra_loss(Batch(out, labels, None, model(out), 0, 5, None, extras), model, None) == (None, {})
    cfg = FineTuneConfig(steps=2, batch_size=8, lr=1e-3)
    result = finetune(model, copy.deepcopy(model), method, teacher_data(32, 12), teacher_data(12, 13), cfg, seed=0)
    logs = result.history[-1]
    assert logs["loss"] == logs["ce"] and "jsd_term" not in logs
    with pytest.raises(ValueError, match="jsd_weight must be >= 0"):
        make_method("augmix-jsd", {"jsd_weight": -1})


# ------------------------------------------------------------------------------ loop hooks
class _Probe(FineTuneMethod):
    """Records what the loop passes through its hooks; `prepare` sleeps so its timing is visible."""

    name: ClassVar[str] = "probe"
    ce_on_logits: ClassVar[bool] = False

    def __init__(self, returns_loss: bool = True) -> None:
        self.returns_loss, self.seen = returns_loss, []

    def prepare(self, images, labels, info):
        time.sleep(0.2)
        return images * 0, {"step": info.step, "first": info.first, "total": info.total}

    def forward(self, net, images, extras):
        extras["forwarded"] = float(images.abs().sum())
        return None, net(images)

    def extra_loss(self, batch, model, text):
        self.seen.append(dict(batch.extras))
        return (batch.logits.sum() * 0 + 1.5, {"probe": 1.0}) if self.returns_loss else (None, {})


def test_loop_passes_prepare_extras_to_forward_and_loss_and_times_prepare_apart():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)), nn.Linear(8, C))
    probe = _Probe()
    d = make_data(32, 0)
    result = finetune(model, copy.deepcopy(model), probe, d, make_data(8, 1), FineTuneConfig(steps=2, batch_size=8), 0)
    assert probe.seen == [{"step": 0, "first": 0, "total": 8, "forwarded": 0.0},
                          {"step": 1, "first": 0, "total": 8, "forwarded": 0.0}]
    assert result.history[-1]["loss"] == 1.5 and "ce" not in result.history[-1]  # ce_on_logits False: no CE
    assert all(t >= 0.2 for t in result.prep_times) and all(t < 0.2 for t in result.step_times)
    with pytest.raises(ValueError, match="method 'probe' drops the loop's cross-entropy but returned no loss"):
        finetune(model, copy.deepcopy(model), _Probe(False), d, d, FineTuneConfig(steps=1, batch_size=8), 0)


# ------------------------------------------------------------------------------ directories
@pytest.fixture(scope="module")
def zeroshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zs")
    spec = ModelSpec("open_clip", "tinyclip-rn32")
    clip = create_clip(spec, init_seed=0)
    randomize_norms(clip.visual, 2)
    ckpt = save_clip(clip, spec, root / "clip")
    save_zeroshot_classifier(root / "zs", zs_head(64), spec, str(ckpt),
                             {"model_id": "zeroshot/tiny", "classes": ["a", "b", "c", "d"]})
    return root / "zs"


def trained_student(zeroshot_dir: Path) -> ThreeHeadStudent:
    """A student of the zero-shot classifier whose tunable weights and BN statistics moved (as after training)."""
    base, _ = load_classifier(zeroshot_dir)
    student = ThreeHeadStudent(split_tower(base.encoder, 0.5, 0.2), base.head, 0.25, True, HEADS)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for k, v in student.trainable_state().items():  # the tensors themselves: edits reach the student
            if v.is_floating_point():
                v.add_(0.05 * torch.randn(v.shape, generator=g))
                if "running_var" in k:
                    v.abs_()
    return student.eval()


SPEC = {"fraction_tuned": 0.5, "head_fraction": 0.2, "dropout": 0.25, "heads": list(HEADS),
        "classifier_trainable": True}


def test_student_directory_round_trip_gives_identical_outputs(tmp_path, zeroshot_dir):
    student = trained_student(zeroshot_dir)
    base = read_json(zeroshot_dir / "classifier.json")
    save_student(tmp_path, student, base, zeroshot_dir, SPEC, {"model_id": "distill/x/three-head/s0"})
    assert is_student_dir(tmp_path) and not is_student_dir(zeroshot_dir)
    stored = load_safetensors(tmp_path / "student.safetensors")
    assert set(stored) == set(student.trainable_state()) and not any(k.startswith("prefix.") for k in stored)
    view, info = load_student(tmp_path)
    assert info["student"] == SPEC and info["model_id"] == "distill/x/three-head/s0" and info["arch"] == "tinyclip-rn32"
    assert view.head == "combined" and isinstance(view.tower, ModifiedResNet) and not view.training
    x = make_data(5, 3).normalise(make_data(5, 3).images, "cpu")
    with torch.no_grad():
        assert torch.equal(view(x), HeadView(student)(x))
        features = student.features(x)
        assert torch.equal(view.student.features(x), features)
        mc = mc_head_outputs(student, features, 4, gen=torch.Generator().manual_seed(1))
        mc_loaded = mc_head_outputs(view.student, features, 4, gen=torch.Generator().manual_seed(1))
    assert all(torch.equal(mc[h], mc_loaded[h]) for h in HEADS)
    assert (mc["clean"][0] - mc["clean"][1]).abs().max() > 1e-4  # the passes really sample dropout


def _tamper(path: Path, fn) -> None:
    state = load_safetensors(path)
    fn(state)
    save_file(state, str(path))


def test_a_tampered_student_directory_is_an_error_naming_the_file(tmp_path, zeroshot_dir):
    student = trained_student(zeroshot_dir)
    base = read_json(zeroshot_dir / "classifier.json")
    save_student(tmp_path, student, base, zeroshot_dir, SPEC, {"model_id": "m"})
    weights = tmp_path / "student.safetensors"
    _tamper(weights, lambda s: s.pop("heads.unclean.classifier.weight"))
    with pytest.raises(ValueError, match=r"student\.safetensors: does not match .*missing \['heads\.unclean\.classif"):
        load_student(tmp_path)
    _tamper(weights, lambda s: s.update({"heads.unclean.classifier.weight": torch.zeros(64, C),
                                         "extra.w": torch.ones(1)}))
    with pytest.raises(ValueError, match=r"student\.safetensors: does not match .*unexpected \['extra\.w'\]"):
        load_student(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="student.safetensors"):
        load_student(tmp_path)
    info = read_json(tmp_path / "classifier.json")
    write_json(tmp_path / "classifier.json", {k: v for k, v in info.items() if k != "student"})
    with pytest.raises(ValueError, match=r"classifier\.json: missing key 'student'"):
        load_student(tmp_path)


def test_a_wrongly_shaped_tensor_in_a_student_file_is_an_error_naming_the_file(tmp_path, zeroshot_dir):
    save_student(tmp_path, trained_student(zeroshot_dir), read_json(zeroshot_dir / "classifier.json"), zeroshot_dir,
                 SPEC, {"model_id": "m"})
    wrong = {"heads.clean.classifier.weight": torch.zeros(64, C + 1)}
    _tamper(tmp_path / "student.safetensors", lambda s: s.update(wrong))
    with pytest.raises(ValueError, match="student.safetensors"):
        load_student(tmp_path)


def test_timm_classifier_directory_round_trip_and_dispatch(tmp_path, teacher_dir):
    model = timm_teacher()
    clf = timm_classifier(model, 32)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(clf(x), model(x))  # TimmEncoder + the model's classifier = the timm forward
    info = read_json(teacher_dir / "classifier.json")
    assert (info["family"], info["arch"], info["head_type"], info["image_size"], info["num_classes"]) == \
        ("timm", "test_resnet", "timm", 32, C)
    direct = load_timm_classifier(teacher_dir, info)
    loaded, info2, clip = load_classifier(teacher_dir, with_clip=True)
    assert clip is None and info2["model_id"] == "teachers/t" and isinstance(loaded.encoder, TimmEncoder)
    assert loaded.encoder.preprocess_cfg["size"] == 32 and tuple(loaded.encoder.preprocess_cfg["mean"]) == T_MEAN
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(direct(x), model(x))
    with pytest.raises(TypeError, match="expected a TimmEncoder tower"):
        save_timm_classifier(tmp_path / "bad", classifier(), "test_resnet", {})
    save_timm_classifier(tmp_path / "c", clf, "test_resnet", {"model_id": "t"})
    saved = read_json(tmp_path / "c" / "classifier.json")
    write_json(tmp_path / "c" / "classifier.json", {**saved, "arch": "resnet18"})
    with pytest.raises(ValueError, match=r"c/model\.safetensors: cannot be loaded into timm architecture 'resnet18'"):
        load_classifier(tmp_path / "c")
    write_json(tmp_path / "c" / "classifier.json", {"family": "timm", "weights": "model.safetensors"})
    with pytest.raises(ValueError, match=r"classifier\.json: missing key 'arch'"):
        load_classifier(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    write_json(tmp_path / "c" / "classifier.json", info)
    with pytest.raises(FileNotFoundError, match=r"c/model\.safetensors"):
        load_classifier(tmp_path / "c")


# ------------------------------------------------------------------------------------ prefix cache
def test_prefix_cache_reads_cached_rows_and_computes_only_the_others():
    calls: list[int] = []

    def prefix(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * 2 + 1

    data = torch.arange(30.0).view(10, 3)
    cache = PrefixCache.fill(prefix, ((data[i:i + 4], None) for i in range(0, 10, 4)), 10)
    assert calls == [4, 4, 2] and len(cache) == 10 and cache.nbytes() == 10 * 3 * 4
    torch.testing.assert_close(cache.store, data * 2 + 1)
    # images that differ from the stored rows prove which rows were read and which were computed
    y = torch.full((4, 3), -1.0)
    out = cache.features(prefix, y, torch.tensor([7, 2, 5, 0]), torch.tensor([True, False, True, False]))
    assert calls[3:] == [2]  # only the two uncached rows ran
    torch.testing.assert_close(out, torch.stack([data[7] * 2 + 1, y[1] * 2 + 1, data[5] * 2 + 1, y[3] * 2 + 1]))
    torch.testing.assert_close(cache.store, data * 2 + 1)  # reading never writes
    out = cache.features(prefix, y, torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.bool))
    assert calls[4:] == [4]
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        cache.features(prefix, y[:1], torch.tensor([10]), torch.tensor([True]))
    with pytest.raises(ValueError, match="has 11 rows but its batches gave 10"):
        PrefixCache.fill(prefix, [(data, None)], 11)


def test_cached_prefix_training_matches_uncached_training(data, teacher_dir, monkeypatch):
    read: list[int] = []  # cached rows read per step
    features = PrefixCache.features
    monkeypatch.setattr(PrefixCache, "features", lambda self, prefix, images, indices, cached: (
        read.append(int(cached.sum())), features(self, prefix, images, indices, cached))[1])
    runs = {}
    for cache in (False, True):
        model = classifier()
        method = make_method("three-head", {"fraction_tuned": 0.5, "teacher": str(teacher_dir), "cache_prefix": cache})
        cfg = FineTuneConfig(steps=6, batch_size=16, lr=1e-3, augment="none", eval_every=1)
        runs[cache] = (finetune(model, copy.deepcopy(model), method, data["train"], data["val"], cfg, seed=0), method)
    (plain, off), (cached, method) = runs[False], runs[True]
    # the store holds every training row's prefix output (the same module as the student's prefix)
    x = data["train"].normalise(data["train"].images, "cpu")
    assert off.cache is None and len(method.cache) == 64 and method.cache_seconds > 0
    assert read == [8] * 6  # every step: its 8 clean rows (a = 0.5 of 16) come from the store
    # T_clean's logits of each clean row are stored too: the initial model's output on the cached features
    torch.testing.assert_close(method.clean_logits, method.tail(method.cache.store), rtol=0, atol=0)
    torch.testing.assert_close(method.clean_logits, classifier().eval()(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(method.cache.store, method.student.features(x), rtol=0, atol=1e-5)
    # the same training up to float rounding of batched kernels (which Adam amplifies in parameters
    # whose gradient is ~0, e.g. the attention pool's key bias, so compare losses and outputs)
    assert len(plain.history) == len(cached.history) == 6
    for r0, r1 in zip(plain.history, cached.history):
        assert r1["loss"] == pytest.approx(r0["loss"], rel=1e-5)
        assert r1["kd_clean_on_clean"] == pytest.approx(r0["kd_clean_on_clean"], rel=1e-4)
    v = data["val"].normalise(data["val"].images, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(cached.model.eval()(v), plain.model.eval()(v), rtol=0, atol=1e-4)
    assert not torch.equal(plain.model.student.shared[0].conv2.weight, classifier().encoder.layer3[0].conv2.weight)
    assert method.params["cache_prefix"] is True and "cache_prefix" not in off.params


def test_cache_prefix_with_a_random_augmentation_is_an_error_naming_both_keys(data, teacher_dir):
    method = make_method("three-head", {"fraction_tuned": 0.5, "teacher": str(teacher_dir), "cache_prefix": True})
    cfg = FineTuneConfig(steps=1, batch_size=8, augment="shift")
    with pytest.raises(ValueError, match="cache_prefix needs the recipe's augment: none.*got augment: shift"):
        method.setup(classifier(), RunContext(classifier(), None, data["train"], data["val"], cfg, 0, "cpu"))
    with pytest.raises(ValueError, match="cache_prefix must be true or false"):
        make_method("apt", {"cache_prefix": "yes"})


def test_step_info_indices_are_the_rank_slice_the_loader_reads():
    from robustify.methods.train_data import rank_batch

    for step, (rank, world) in enumerate(((0, 1), (1, 2), (3, 4))):
        per = 16 // world
        info = StepInfo(step + 5, 3, rank * per, 16, MEAN, STD, 64)
        assert torch.equal(info.indices(per), rank_batch(3, step + 5, 64, 16, rank, world))
    with pytest.raises(ValueError, match="needs the training set's size"):
        StepInfo(0, 0, 0, 8, MEAN, STD).indices(8)
