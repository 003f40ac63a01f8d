"""The fine-tuning loop and its registered methods (SPEC §2): each regulariser against a hand
computation, which weights move, Lipsum's random texts, exact resume, and DDP = one process."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from robustify.config import ModelSpec
from robustify.io import load_safetensors, save_safetensors
from robustify.methods.finetune import (
    method_accepts,
    Batch, FineTuneConfig, ImageData, METHODS, RunContext, augment_batch, finetune, frozen_features, make_method,
    training_layout, tuned_and_reference,
)
from robustify.models.clip import create_clip, model_config, tokenizer
from robustify.models.random_texts import encode_random_texts, sample_texts, special_ids, token_pool
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead, build_zeroshot_head

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
CLASSES = ["circle", "square", "star", "heart"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}.", "a {}."]


def make_clip(arch: str = "tinyclip-rn32") -> tuple[torch.nn.Module, ZeroShotHead, object]:
    clip = create_clip(ModelSpec("open_clip", arch), init_seed=0)
    tok = tokenizer(arch)
    return clip, build_zeroshot_head(clip, tok, CLASSES, TEMPLATES), tok


def make_data(n: int = 64, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    return ImageData(images, labels, MEAN, STD)


@pytest.fixture(scope="module")
def world() -> dict:
    torch.set_num_threads(1)
    clip, head, tok = make_clip()
    return {"clip": clip, "head": head, "tok": tok, "train": make_data(64, 0), "val": make_data(32, 1)}


def run(world: dict, name: str, params: dict | None = None, **overrides) -> tuple:
    model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
    text.tokenize = world["tok"]
    cfg = FineTuneConfig(**{"steps": 4, "batch_size": 16, "lr": 1e-3, "eval_every": 2, **overrides})
    result = finetune(model, reference, make_method(name, params), world["train"], world["val"], cfg, seed=0, text=text)
    return result, model, reference


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- hand computations
def hand_batch(world: dict, method_name: str, params: dict | None = None):
    """A tuned model whose tower differs from θ0 by a known perturbation, a 3-image batch and the method."""
    model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
    text.tokenize = world["tok"]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).view_as(p))
    method = make_method(method_name, params)
    data = world["train"]
    method.setup(model, RunContext(reference, text, data, world["val"], FineTuneConfig(steps=1, batch_size=3), 0, "cpu"))
    model.eval()
    images = data.normalise(data.images[:3], "cpu")
    features = model.encoder(images)
    batch = Batch(images, data.labels[:3], features, model.head(features), step=5, seed=0, reference=reference)
    return method, model, reference, text, batch


def test_l2sp_is_half_squared_distance_over_the_encoder(world: dict) -> None:
    method, model, reference, text, batch = hand_batch(world, "l2sp", {"lam": 0.3})
    loss, logs = method.extra_loss(batch, model, text)
    expected = 0.0
    for p in model.encoder.parameters():
        expected += 0.5 * float(((0.01 * torch.sin(torch.arange(p.numel(), dtype=torch.float64))) ** 2).sum())
    assert logs["l2sp"] == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(0.3 * expected, rel=1e-4)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the head is not regularised
    assert float(method.extra_loss(batch, model, text)[0]) == pytest.approx(float(loss), rel=1e-6)


def test_kd_is_t2_kl_of_teacher_to_student(world: dict) -> None:
    method, model, reference, text, batch = hand_batch(world, "kd", {"lam": 2.0, "temperature": 3.0})
    loss, logs = method.extra_loss(batch, model, text)
    z = batch.logits.double() / 3
    z0 = reference(batch.images).double() / 3
    p0 = z0.softmax(-1)
    kl = (p0 * (p0.log() - z.log_softmax(-1))).sum(-1).mean()
    assert logs["kd"] == pytest.approx(float(9 * kl), rel=1e-4)
    assert float(loss) == pytest.approx(float(18 * kl), rel=1e-4)
    assert logs["kd"] > 1e-6


def test_featkd_is_squared_distance_of_normalised_features(world: dict) -> None:
    method, model, reference, text, batch = hand_batch(world, "featkd", {"lam": 0.5})
    loss, logs = method.extra_loss(batch, model, text)
    f = batch.features.double()
    f0 = reference.encoder(batch.images).double()
    expected = sum(float(((f[i] / f[i].norm() - f0[i] / f0[i].norm()) ** 2).sum()) for i in range(3)) / 3
    assert logs["featkd"] == pytest.approx(expected, rel=1e-4) and expected > 1e-8
    assert float(loss) == pytest.approx(0.5 * expected, rel=1e-4)


def test_car_ft_is_kl_over_the_context_prompts(world: dict) -> None:
    method, model, reference, text, batch = hand_batch(world, "car-ft", {"lam": 1.5})
    loss, logs = method.extra_loss(batch, model, text)
    ctx = reference.head.ctx.double()
    assert ctx.shape[1] == len(TEMPLATES)
    s = float(reference.head.scale)
    f = F.normalize(batch.features.double(), dim=-1)
    f0 = F.normalize(reference.encoder(batch.images).double(), dim=-1)
    p, p0 = (s * f @ ctx).softmax(-1), (s * f0 @ ctx).softmax(-1)
    expected = float((p0 * (p0.log() - p.log())).sum(-1).mean())
    assert logs["car"] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert float(loss) == pytest.approx(1.5 * expected, rel=1e-4)


def test_lipsum_term_by_hand_and_its_random_texts(world: dict) -> None:
    method, model, reference, text, batch = hand_batch(world, "lipsum-ft", {"lam": 1.0, "texts": 5, "length": 8})
    ids = method.random_texts(batch)
    sot, eot = world["tok"].sot_token_id, world["tok"].eot_token_id
    assert ids.shape == (5, world["tok"].context_length)
    assert (ids[:, 0] == sot).all() and (ids[:, 9] == eot).all() and (ids[:, 10:] == 0).all()
    inner = ids[:, 1:9]
    assert ((inner != sot) & (inner != eot)).all() and (inner < sot).all()
    assert torch.equal(ids, method.random_texts(batch))  # a function of (seed, step) ...
    other = Batch(batch.images, batch.labels, batch.features, batch.logits, step=6, seed=0, reference=reference)
    assert not torch.equal(ids, method.random_texts(other))  # ... resampled every step
    loss, logs = method.extra_loss(batch, model, text)
    with torch.no_grad():
        t = F.normalize(world["clip"].encode_text(ids).double(), dim=-1)
    s = float(reference.head.scale)
    v = s * F.normalize(batch.features.double(), dim=-1) @ t.T
    v0 = s * F.normalize(reference.encoder(batch.images).double(), dim=-1) @ t.T
    expected = float(((v - v0) ** 2).sum(-1).mean() / (2 * 5))
    assert logs["lipsum"] == pytest.approx(expected, rel=1e-3) and expected > 1e-6
    # the `seen` pool only draws tokens of the corpus
    seen = make_method("lipsum-ft", {"texts": 50, "vocab": "seen"})
    text.corpus = ["a photo of a star", "a sketch of a heart"]
    seen.setup(model, RunContext(reference, text, world["train"], world["val"], FineTuneConfig(steps=1, batch_size=3), 0, "cpu"))
    allowed = set(world["tok"](text.corpus).flatten().tolist()) - {0, sot, eot}
    assert set(seen.random_texts(batch)[:, 1:9].flatten().tolist()) <= allowed


# ---------------------------------------------------------------------------- cost: exact shortcuts
def _custom_text_clip(arch: str) -> torch.nn.Module:
    """open_clip's CustomTextCLIP (a separate `TextTransformer`) with the tiny config's towers."""
    from open_clip.model import CustomTextCLIP

    cfg = model_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).eval()


@pytest.mark.parametrize("arch", ["tinyclip-rn32", "tinyclip-vit32"])
@pytest.mark.parametrize("kind", ["CLIP", "CustomTextCLIP"])
def test_random_texts_encoded_up_to_their_eot_equal_the_full_context(arch: str, kind: str) -> None:
    """The causal text tower pools at the EOT: encoding only [SOT]+L+[EOT] (10 of 20 positions here,
    10 of 77 for real CLIPs), the last block at the EOT row only, gives the full-context embedding,
    text by text, also for mixed lengths (a mask row per text)."""
    clip = create_clip(ModelSpec("open_clip", arch), init_seed=0) if kind == "CLIP" else _custom_text_clip(arch)
    tok = tokenizer(arch)
    sot, eot = special_ids(tok)
    ids = sample_texts(token_pool(tok, "full"), 16, 8, tok.context_length, sot, eot, torch.Generator().manual_seed(0))
    ids[3, 5:] = 0
    ids[3, 4] = eot  # a shorter text: each row pools at its own EOT
    calls = []
    original = clip.encode_text
    clip.encode_text = lambda t: calls.append(t.shape) or original(t)  # the fallback would call this
    last = (clip.transformer if kind == "CLIP" else clip.text.transformer).resblocks[-1]
    last.forward = lambda *a, **k: calls.append("last block whole")  # the pooled-row shortcut skips it
    same = [i for i in range(len(ids)) if i != 3]  # all of length 8: one mask row for all
    with torch.no_grad():
        short, short_same = encode_random_texts(clip, ids), encode_random_texts(clip, ids[same])
        del last.forward
        full = original(ids)
    assert not calls  # the truncated, pooled-row path ran
    assert short.shape == full.shape
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(short_same, full[same], rtol=0, atol=1e-5)
    assert float((full[3] - full[4]).abs().max()) > 1e-3  # texts differ: the comparison has teeth


def test_text_towers_not_understood_fall_back_to_encode_text() -> None:
    clip = create_clip(ModelSpec("open_clip", "tinyclip-rn32"), init_seed=0)
    clip.text_pool_type = "last"  # pools at the last position: every token counts
    ids = torch.randint(1, 100, (4, clip.context_length))
    with torch.no_grad():
        assert torch.equal(encode_random_texts(clip, ids), clip.encode_text(ids))


@pytest.mark.parametrize("arch", ["tinyclip-rn32", "tinyclip-vit32"])
def test_frozen_features_equal_the_towers_forward(arch: str) -> None:
    """θ0's no-grad forward pools only the attention-pool query it keeps (ModifiedResNet): the same
    features; a tower with hooks (or a ViT) runs its own forward."""
    visual = make_clip(arch)[0].visual.eval()
    images = make_data(24, 3).normalise(make_data(24, 3).images, "cpu")
    calls = []
    with torch.no_grad():
        expected = visual(images)
        if arch == "tinyclip-rn32":
            visual.attnpool.forward = lambda *a: calls.append("whole pool")  # the shortcut must not call it
        got = frozen_features(visual, images)
        assert not calls
        if arch == "tinyclip-rn32":
            del visual.attnpool.forward
            handle = visual.register_forward_hook(lambda m, i, o: calls.append("hooked"))
            assert torch.equal(frozen_features(visual, images), expected) and calls == ["hooked"]
            handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_channels_last_training_matches_the_default_layout(world: dict, tmp_path: Path) -> None:
    """A conv tower trains in NHWC (faster convolutions) to the same weights up to float rounding,
    and hands back default-layout (contiguous) towers and weights, which safetensors requires."""
    assert training_layout(world["clip"].visual) == torch.channels_last
    assert training_layout(make_clip("tinyclip-vit32")[0].visual) == torch.contiguous_format  # one patch conv
    runs, layouts = {}, {}
    for flag in (False, True):
        model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
        text.tokenize = world["tok"]
        method = make_method("lipsum-ft", {"texts": 8})
        seen = []
        method.on_step_end = lambda m, step, seen=seen: seen.append(
            all(p.is_contiguous(memory_format=torch.channels_last) for p in m.encoder.parameters() if p.ndim == 4))
        cfg = FineTuneConfig(steps=3, batch_size=16, lr=1e-4, eval_every=3, augment="flip-shift")
        runs[flag] = finetune(model, reference, method, world["train"], world["val"], cfg, seed=0, text=text,
                              channels_last=flag)
        layouts[flag] = seen
        for tower in (model.encoder, reference.encoder, runs[flag].model.encoder):
            assert all(p.is_contiguous() for p in tower.parameters())
    assert layouts == {False: [False] * 3, True: [True] * 3}
    images = world["val"].normalise(world["val"].images, "cpu")
    with torch.no_grad():
        start = ImageClassifier(world["clip"].visual, world["head"])(images)
        logits = {flag: runs[flag].model(images) for flag in runs}
    change = float((logits[False] - start).abs().max())
    assert change > 1e-2  # the runs trained
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4 * change)
    # weights: Adam moves a weight whose gradient is float noise by up to ~lr a step, either way
    tuned, plain = runs[True].model.state_dict(), runs[False].model.state_dict()
    for k in plain:
        torch.testing.assert_close(tuned[k], plain[k], rtol=0, atol=2 * cfg.lr * cfg.steps, msg=k)
    save_safetensors(tmp_path / "w.safetensors", tuned)
    assert all(torch.equal(v, tuned[k]) for k, v in load_safetensors(tmp_path / "w.safetensors").items())


# ---------------------------------------------------------------------------- the loop
def test_every_method_is_registered_and_unknown_ones_are_named() -> None:
    make_method("ft")
    assert set(METHODS) == {"ft", "scratch-ft", "lp", "lp-ft", "ema", "l2sp", "kd", "car-ft", "featkd", "lipsum-ft",
                            "vpt-shallow", "vpt-deep", "zs-ft", "augmix-jsd", "three-head", "three-head-no-kd",
                            "single-teacher", "only-kd", "combined-head", "apt"}
    assert method_accepts("three-head", "teacher") and not method_accepts("ft", "teacher")
    with pytest.raises(ValueError, match="unknown fine-tuning method 'nope'"):
        make_method("nope")
    with pytest.raises(ValueError, match="method 'kd'"):
        make_method("kd", {"tau": 1})


@pytest.mark.parametrize("name", ["ft", "lipsum-ft"])
def test_the_tuned_tower_changes_and_the_reference_does_not(world: dict, name: str) -> None:
    clip0 = copy.deepcopy(world["clip"])
    result, model, reference = run(world, name, {"texts": 8} if name == "lipsum-ft" else None)
    assert not torch.equal(next(model.encoder.parameters()), next(clip0.visual.parameters()))
    assert states_equal(reference.encoder, clip0.visual)  # θ0 bit-identical after training
    assert torch.equal(reference.head.weight, world["head"].weight)
    if name == "lipsum-ft":
        assert all(r["lipsum"] > 0 for r in result.history)


def test_lp_trains_only_the_head_and_scratch_starts_at_zero(world: dict) -> None:
    result, model, _ = run(world, "lp")
    assert states_equal(result.model.encoder, world["clip"].visual)
    assert not torch.equal(result.model.head.weight, world["head"].weight)
    scratch = make_method("scratch-ft")
    m, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
    scratch.setup(m, RunContext(reference, text, world["train"], world["val"], FineTuneConfig(steps=1, batch_size=3), 0, "cpu"))
    assert m.head.weight.abs().sum() == 0


def test_lp_ft_starts_full_tuning_from_the_probed_head(world: dict) -> None:
    m, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
    cfg = FineTuneConfig(steps=4, batch_size=16, lr=1e-3, eval_every=2)
    lpft = make_method("lp-ft", {"lp_steps": 4})
    lpft.setup(m, RunContext(reference, text, world["train"], world["val"], cfg, 0, "cpu"))
    lp = run(world, "lp")[0]
    assert torch.equal(m.head.weight, lp.model.head.weight)  # the same LP run (same recipe, 4 steps)
    assert all(p.requires_grad for p in m.parameters())


def test_ema_evaluates_the_running_average(world: dict) -> None:
    cfg = dict(steps=1, eval_every=1, lr=1e-2)
    ft = run(world, "ft", **cfg)[1]  # the live weights after one step
    ema = run(world, "ema", {"momentum": 0.75}, **cfg)[0].model
    for (k, avg), live, start in zip(ema.state_dict().items(), ft.state_dict().values(),
                                     ImageClassifier(world["clip"].visual, world["head"]).state_dict().values()):
        if avg.is_floating_point():
            torch.testing.assert_close(avg, 0.75 * start + 0.25 * live, rtol=1e-5, atol=1e-6, msg=k)


def test_best_checkpoint_is_kept_on_the_validation_split(world: dict) -> None:
    result = run(world, "ft", steps=6, eval_every=2)[0]
    accs = [r["val_accuracy"] for r in result.history]
    assert [r["step"] for r in result.history] == [2, 4, 6]
    assert result.best_val_accuracy == max(accs) and result.best_step == 2 * (accs.index(max(accs)) + 1)


def test_augmentation_of_a_slice_equals_the_slice_of_the_augmented_batch() -> None:
    x = torch.randn(8, 3, 10, 10)
    full = augment_batch(x, "flip-shift", 2, torch.Generator().manual_seed(3))
    part = augment_batch(x[4:], "flip-shift", 2, torch.Generator().manual_seed(3), first=4, total=8)
    assert torch.equal(full[4:], part) and not torch.equal(full, x)


@pytest.mark.parametrize("name,params", [("ema", {"momentum": 0.9}), ("lipsum-ft", {"texts": 8})])
def test_resume_equals_uninterrupted(world: dict, tmp_path: Path, name: str, params: dict) -> None:
    cfg = FineTuneConfig(steps=6, batch_size=16, lr=1e-3, eval_every=2, checkpoint_every=2)

    def go(stop_after: int | None) -> object:
        model, reference, text = tuned_and_reference(copy.deepcopy(world["clip"]), world["head"])
        text.tokenize = world["tok"]
        return finetune(model, reference, make_method(name, params), world["train"], world["val"], cfg, seed=7,
                        text=text, resume_path=tmp_path / "resume.pt", fingerprint="run", stop_after=stop_after)

    whole = go(None)
    assert not (tmp_path / "resume.pt").exists()
    go(3)  # killed after step 3: the last state is step 2's
    assert (tmp_path / "resume.pt").exists()
    resumed = go(None)
    assert states_equal(whole.model, resumed.model)
    assert [r["val_accuracy"] for r in whole.history] == [r["val_accuracy"] for r in resumed.history]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="finetune.amp"):
        FineTuneConfig(steps=1, batch_size=1, amp="fp8")
    with pytest.raises(ValueError, match="finetune.warmup"):
        FineTuneConfig(steps=1, batch_size=1, warmup=1.5)


# ---------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        clip, head, tok = make_clip("tinyclip-vit32")
        model, reference, text = tuned_and_reference(clip, head)
        text.tokenize = tok
        cfg = FineTuneConfig(steps=3, batch_size=16, lr=1e-3, eval_every=3, augment="flip-shift")
        result = finetune(model, reference, make_method("lipsum-ft", {"texts": 8}), make_data(64, 0), make_data(32, 1),
                          cfg, seed=0, text=text)
        if rank == 0:
            torch.save(result.model.state_dict(), out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path) -> None:
    """A LayerNorm tower (tiny ViT): with BatchNorm each rank would normalise its own half-batch.

    Compared on the models' logits: parameters whose gradient is zero in exact arithmetic (the key
    part of the attention input bias: softmax ignores it) receive float noise that differs with the
    summation order, and Adam's normalisation scales any such noise up to ~lr — harmless to outputs."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    torch.multiprocessing.spawn(_ddp_worker, args=(1, _free_port(), str(tmp_path / "one.pt")), nprocs=1, join=True)
    clip, head, _ = make_clip("tinyclip-vit32")
    start, _, _ = tuned_and_reference(clip, head)
    val = make_data(32, 1)
    images = val.normalise(val.images, "cpu")
    logits = {}
    for name in ("ddp", "one", "start"):
        model = copy.deepcopy(start).eval()
        if name != "start":
            model.load_state_dict(torch.load(tmp_path / f"{name}.pt"))
        with torch.no_grad():
            logits[name] = model(images)
    change = float((logits["one"] - logits["start"]).abs().max())
    diff = float((logits["ddp"] - logits["one"]).abs().max())
    assert change > 0.1  # the runs did train
    assert diff < 1e-4 * change, (diff, change)
