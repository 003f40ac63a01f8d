"""VPT (shallow, deep) and ZS-full tuning (SPEC §3 baselines): which weights train, the prompted
forward of each tower against a hand computation, prompt persistence, dropout determinism, resume."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from robustify.io import load_safetensors, save_safetensors
from robustify.methods.finetune import FineTuneConfig, ImageData, RunContext, finetune, make_method
from robustify.methods.regularizers.vpt import PromptedTower, init_prompts, is_prompted_state
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
CLASSES = 4


def seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """A module whose random init is a function of `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def open_clip_vit(seed: int = 0, pool_type: str = "tok") -> VisionTransformer:
    return seeded(lambda: VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2,
                                            output_dim=16, pool_type=pool_type), seed)


def timm_vit(seed: int = 0, global_pool: str = "token") -> torch.nn.Module:
    import timm

    return seeded(lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                            depth=2, num_classes=0, global_pool=global_pool), seed)


def resnet(seed: int = 0) -> ModifiedResNet:
    tower = seeded(lambda: ModifiedResNet(layers=(1, 1, 1, 1), output_dim=16, heads=2, image_size=32, width=16), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # open_clip zeroes every bn3 weight and leaves BN at identity: make them matter
        for m in tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return tower


TOWERS = {"open_clip-vit": (open_clip_vit, 16), "timm-vit": (timm_vit, 192), "open_clip-rn": (resnet, 16)}


def classifier(kind: str, seed: int = 0) -> ImageClassifier:
    build, dim = TOWERS[kind]
    weight = torch.nn.functional.normalize(torch.randn(dim, CLASSES, generator=torch.Generator().manual_seed(9)), dim=0)
    return ImageClassifier(build(seed), ZeroShotHead(weight, math.log(10.0)))


def data(n: int, seed: int) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageData(images, torch.randint(0, CLASSES, (n,), generator=g), MEAN, STD)


def images(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _threads(single_thread: None) -> None:
    """Tiny tensors: one intra-op thread (conftest's `single_thread`)."""


def train(model: ImageClassifier, name: str, params: dict | None = None, steps: int = 3, **kw) -> object:
    cfg = FineTuneConfig(steps=steps, batch_size=8, lr=1e-2, **{"eval_every": 0, **kw.pop("cfg", {})})
    reference = copy.deepcopy(model)
    return finetune(model, reference, make_method(name, params), data(32, 0), data(16, 1), cfg, seed=3, **kw)


def setup(model: ImageClassifier, name: str, seed: int = 0, params: dict | None = None) -> ImageClassifier:
    """`model` after the method's `setup` (the loop's first switching every parameter on)."""
    for p in model.parameters():
        p.requires_grad_(True)
    make_method(name, params).setup(model, RunContext(copy.deepcopy(model), None, data(8, 0), data(8, 1),
                                                      FineTuneConfig(steps=1, batch_size=4), seed, "cpu"))
    return model


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- what trains
# tokens × width (× blocks when deep) + the D×4 head; the ResNet's one attention layer: shallow == deep
@pytest.mark.parametrize("kind,name,expected", [
    ("open_clip-vit", "vpt-shallow", 5 * 32 + 16 * 4), ("open_clip-vit", "vpt-deep", 2 * 5 * 32 + 16 * 4),
    ("timm-vit", "vpt-shallow", 5 * 192 + 192 * 4), ("timm-vit", "vpt-deep", 2 * 5 * 192 + 192 * 4),
    ("open_clip-rn", "vpt-shallow", 5 * 512 + 16 * 4), ("open_clip-rn", "vpt-deep", 5 * 512 + 16 * 4),
])
def test_trainable_parameters_are_prompts_and_head(kind: str, name: str, expected: int) -> None:
    model = setup(classifier(kind), name)
    assert isinstance(model.encoder, PromptedTower)
    assert trainable(model) == expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["encoder.prompts", "head.weight"]


@pytest.mark.parametrize("kind,name", [("open_clip-vit", "vpt-shallow"), ("open_clip-vit", "vpt-deep"),
                                       ("timm-vit", "vpt-deep"), ("open_clip-rn", "vpt-shallow")])
def test_finetune_moves_only_prompts_and_head(kind: str, name: str) -> None:
    model = classifier(kind)
    tower0 = copy.deepcopy(model.encoder.state_dict())  # BatchNorm statistics included
    head0 = model.head.weight.detach().clone()
    result = train(model, name)
    assert result.steps_run == 3
    for final in (model, result.model):  # the live model and the kept (evaluated, saved) one
        assert isinstance(final.encoder, PromptedTower)
        assert final.encoder.deep == (name == "vpt-deep" and kind != "open_clip-rn")
        state = final.encoder.tower.state_dict()
        assert state.keys() == tower0.keys() and all(torch.equal(state[k], tower0[k]) for k in tower0)
        assert not torch.equal(final.head.weight, head0)
    assert torch.equal(result.model.encoder.prompts, model.encoder.prompts)  # evaluated at the end only
    initial = setup(classifier(kind), name, seed=3)  # the run's seed: the prompts it started from
    assert (model.encoder.prompts - initial.encoder.prompts).abs().max() > 0


def test_prompts_are_drawn_from_the_run_seed() -> None:
    a, b, c = (setup(classifier("open_clip-vit"), "vpt-deep", seed).encoder.prompts for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------- forward by hand
def hand_open_clip(t: VisionTransformer, prompts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[cls, prompts, patches] into block 0; deep: rows 1..T replaced before each later block."""
    n, tokens = x.shape[0], prompts.shape[1]
    seq = t.conv1(x).flatten(2).transpose(1, 2)
    seq = torch.cat([t.class_embedding.view(1, 1, -1).expand(n, 1, -1), seq], 1) + t.positional_embedding
    seq = t.ln_pre(seq)
    seq = torch.cat([seq[:, :1], prompts[0].expand(n, -1, -1), seq[:, 1:]], 1)
    for i, block in enumerate(t.transformer.resblocks):
        if i > 0 and prompts.shape[0] > 1:
            seq = torch.cat([seq[:, :1], prompts[i].expand(n, -1, -1), seq[:, 1 + tokens:]], 1)
        seq = block(seq)
    seq = t.ln_post(torch.cat([seq[:, :1], seq[:, 1 + tokens:]], 1))
    pooled = seq[:, 0] if t.pool_type == "tok" else seq[:, 1:].mean(1)
    return pooled @ t.proj


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
@pytest.mark.parametrize("deep", [False, True])
def test_open_clip_vit_prompted_forward_by_hand(deep: bool, pool_type: str) -> None:
    tower = open_clip_vit(pool_type=pool_type).double()
    prompts = init_prompts(tower, 3, deep, torch.Generator().manual_seed(1)).double()
    prompted = PromptedTower(tower, prompts).eval()
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
             for b in tower.transformer.resblocks]
    x = images().double()
    with torch.no_grad():
        out = prompted(x)
        for h in hooks:
            h.remove()
        expected = hand_open_clip(tower, prompts, x)
    assert out.shape == (3, 16)
    assert (out - expected).abs().max() < 1e-6
    # every block sees 1 + 3 + 16 tokens: deep prompts replace the previous ones, they do not pile up
    assert [s.shape[1] for s in seen] == [20, 20]
    # deep: block 1's prompt rows are set 1 itself; shallow: they are block 0's prompt outputs
    assert torch.equal(seen[1][:, 1:4], prompts[-1].expand(3, -1, -1)) == deep
    with torch.no_grad():
        plain = tower(x)
    assert (out - plain).abs().max() > 1e-4  # the prompts do change the features


def test_shallow_and_deep_differ_and_share_the_first_set() -> None:
    tower = open_clip_vit()
    deep = init_prompts(tower, 5, True, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = PromptedTower(tower, deep[:1]).eval()(images())
        b = PromptedTower(tower, deep).eval()(images())
        c = PromptedTower(tower, torch.cat([deep[:1], -deep[1:]])).eval()(images())  # (a shift would vanish in LN)
    assert (a - b).abs().max() > 1e-4 and (b - c).abs().max() > 1e-4


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_timm_vit_prompted_forward_by_hand(global_pool: str) -> None:
    t = timm_vit(global_pool=global_pool).double()
    prompts = init_prompts(t, 4, True, torch.Generator().manual_seed(3)).double()
    x = images().double()
    with torch.no_grad():
        out = PromptedTower(t, prompts).eval()(x)
        seq = t.patch_embed(x)
        seq = torch.cat([t.cls_token.expand(3, -1, -1), seq], 1) + t.pos_embed
        seq = torch.cat([seq[:, :1], prompts[0].expand(3, -1, -1), seq[:, 1:]], 1)
        seq = t.blocks[0](seq)
        seq = t.blocks[1](torch.cat([seq[:, :1], prompts[1].expand(3, -1, -1), seq[:, 5:]], 1))
        seq = t.norm(torch.cat([seq[:, :1], seq[:, 5:]], 1))
        pooled = t.fc_norm(seq[:, 0] if global_pool == "token" else seq[:, 1:].mean(1))
    assert out.shape == (3, 192)
    assert (out - pooled).abs().max() < 1e-6


def test_resnet_prompts_are_extra_keys_of_the_attention_pool() -> None:
    t = resnet().double()
    prompts = init_prompts(t, 3, False, torch.Generator().manual_seed(4)).double()
    assert torch.equal(init_prompts(t, 3, True, torch.Generator().manual_seed(4)).double(), prompts)  # one layer
    x = images().double()
    with torch.no_grad():
        out = PromptedTower(t, prompts).eval()(x)
        pool = t.attnpool
        feats = t.layer4(t.layer3(t.layer2(t.layer1(t.stem(x))))).flatten(2).transpose(1, 2)  # N, HW, C
        seq = torch.cat([feats.mean(1, keepdim=True), feats], 1) + pool.positional_embedding
        kv = torch.cat([seq, prompts[0].expand(3, -1, -1)], 1)  # N, HW + 1 + T, C
        heads, width = pool.num_heads, seq.shape[-1]
        q = pool.q_proj(seq[:, 0]).view(3, heads, width // heads)
        k = pool.k_proj(kv).view(3, -1, heads, width // heads)
        v = pool.v_proj(kv).view(3, -1, heads, width // heads)
        attn = (torch.einsum("nhd,nlhd->nhl", q, k) / math.sqrt(width // heads)).softmax(-1)
        expected = pool.c_proj(torch.einsum("nhl,nlhd->nhd", attn, v).reshape(3, width))
        plain = t(x)
    assert out.shape == (3, 16) and kv.shape[1] == 1 + 1 + 3
    assert (out - expected).abs().max() < 1e-9
    assert (out - plain).abs().max() > 1e-4


def test_init_is_the_references_xavier_uniform_and_seeded() -> None:
    tower = open_clip_vit()
    p = init_prompts(tower, 10, True, torch.Generator().manual_seed(0))
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))  # 8-px patches, width 32
    assert p.shape == (2, 10, 32) and p.dtype == torch.float32
    assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound and abs(float(p.mean())) < 0.02
    assert torch.equal(p, init_prompts(tower, 10, True, torch.Generator().manual_seed(0)))
    assert not torch.equal(p, init_prompts(tower, 10, True, torch.Generator().manual_seed(1)))
    rn = init_prompts(resnet(), 2, False, torch.Generator().manual_seed(0))  # one token covers a 32-px cell
    assert rn.shape == (1, 2, 512) and rn.abs().max() <= math.sqrt(6 / (3 * 32 * 32 + 512))


# ------------------------------------------------------------------------------- persistence
def test_state_dict_round_trip_into_a_fresh_tower(tmp_path: Path) -> None:
    model = classifier("open_clip-vit")
    result = train(model, "vpt-deep", {"tokens": 2})
    state = result.model.encoder.state_dict()
    assert is_prompted_state(state) and not is_prompted_state(open_clip_vit().state_dict())
    assert state["prompts"].shape == (2, 2, 32)
    save_safetensors(tmp_path / "encoder.safetensors", state)
    loaded = load_safetensors(tmp_path / "encoder.safetensors")
    with pytest.raises(RuntimeError):  # why the prompted tower needs its own loader
        open_clip_vit(seed=1).load_state_dict(loaded, strict=True)
    rebuilt = ImageClassifier(PromptedTower.from_state_dict(open_clip_vit(seed=1), loaded), result.model.head).eval()
    assert rebuilt.encoder.deep and rebuilt.encoder.tokens == 2
    with torch.no_grad():
        assert torch.equal(rebuilt(images()), result.model.eval()(images()))

    bad = dict(loaded)
    bad.pop("tower.proj")
    bad["tower.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['tower.proj'\], unexpected keys \['tower.extra'\]"):
        PromptedTower.from_state_dict(open_clip_vit(), bad)
    with pytest.raises(ValueError, match=r"shape \(1 or 2, tokens >= 1, 32\), got \(3, 2, 32\)"):
        PromptedTower.from_state_dict(open_clip_vit(), {**loaded, "prompts": torch.zeros(3, 2, 32)})


# ------------------------------------------------------------------------------------ dropout
def test_prompt_dropout_is_seeded_and_off_at_evaluation() -> None:
    tower = open_clip_vit()
    prompted = PromptedTower(tower, init_prompts(tower, 4, True, torch.Generator().manual_seed(0)), dropout=0.5)
    plain = PromptedTower(tower, prompted.prompts.detach(), dropout=0.0).eval()
    prompted.train()
    assert not tower.training  # the frozen backbone stays in eval mode
    with pytest.raises(RuntimeError, match="reseed"):
        prompted(images())
    with torch.no_grad():
        prompted.reseed(3)
        a, masked = prompted(images()), prompted._prompt(1, 2, torch.float32)
        prompted.reseed(3)
        b = prompted(images())
        prompted.reseed(4)
        c = prompted(images())
        d = prompted.eval()(images())
        e = plain(images())
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)
    scaled = 2 * prompted.prompts[1].detach().expand(2, -1, -1)
    assert ((masked == 0) | (masked == scaled)).all() and 0.3 < float((masked == 0).float().mean()) < 0.7


def test_resume_with_prompt_dropout_equals_uninterrupted(tmp_path: Path) -> None:
    def go(stop_after: int | None) -> object:
        return train(classifier("open_clip-vit"), "vpt-deep", {"dropout": 0.3}, steps=4,
                     cfg={"eval_every": 2, "checkpoint_every": 2}, resume_path=tmp_path / "resume.pt",
                     fingerprint="run", stop_after=stop_after)

    whole = go(None)
    go(3)  # killed after step 3: the checkpoint is step 2's
    assert (tmp_path / "resume.pt").exists()
    resumed = go(None)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = train(classifier("open_clip-vit"), "vpt-deep", {"dropout": 0.0}, steps=4)
    assert not torch.equal(other.model.encoder.prompts, whole.model.encoder.prompts)  # the dropout did act


# ------------------------------------------------------------------------------ errors, registry
def test_params_and_errors() -> None:
    assert make_method("vpt-shallow").params == {"tokens": 5, "dropout": 0.0}  # KMnP/vpt's defaults
    assert make_method("vpt-deep", {"tokens": 10, "dropout": 0.1}).params == {"tokens": 10, "dropout": 0.1}
    with pytest.raises(ValueError, match="tokens must be an integer >= 1, got 0"):
        make_method("vpt-deep", {"tokens": 0})
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        make_method("vpt-shallow", {"dropout": 1.0})
    with pytest.raises(ValueError, match="method 'vpt-deep'.*lam"):
        make_method("vpt-deep", {"lam": 1.0})
    with pytest.raises(ValueError, match="unsupported image tower torch.nn.modules.linear.Linear"):
        PromptedTower(torch.nn.Linear(3, 3), torch.zeros(1, 1, 3))
    model = setup(classifier("open_clip-vit"), "vpt-shallow")
    with pytest.raises(ValueError, match="already a PromptedTower"):
        setup(model, "vpt-deep")


# ------------------------------------------------------------------------------------- zs-ft
def test_zs_ft_trains_the_tower_with_the_zero_shot_head_frozen() -> None:
    model = classifier("open_clip-vit")
    tower0 = copy.deepcopy(model.encoder.state_dict())
    head0 = copy.deepcopy(model.head.state_dict())
    result = train(model, "zs-ft")
    assert trainable(model) == sum(p.numel() for p in model.encoder.parameters())
    for final in (model, result.model):
        head = final.head.state_dict()
        assert all(torch.equal(head[k], head0[k]) for k in head0)
        tower = final.encoder.state_dict()
        assert tower.keys() == tower0.keys()
        assert all(not torch.equal(tower[k], tower0[k]) for k in ("conv1.weight", "proj", "class_embedding"))
