"""Local checkpoint loading: every format a model arrives in reloads to bit-identical outputs, and
wrong or unsafe files fail with an error that names the file and the architecture."""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from robustify.config import ModelSpec
from robustify.io import save_safetensors
from robustify.models.clip import create_clip, is_torchscript, save_clip, tokenizer
from robustify.models.factory import create_model
from robustify.models.timm_models import create_timm, timm_transform

CLIP_SPEC = ModelSpec("open_clip", "tinyclip-rn32", None)
TIMM_SPEC = ModelSpec("timm", "resnet18", None)


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    return create_clip(CLIP_SPEC, init_seed=0)


@pytest.fixture(scope="module")
def clip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images, tokenizer(CLIP_SPEC.arch)(["a photo of a dog", "a red square"])


@torch.no_grad()
def clip_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    images, text = inputs
    return model.encode_image(images), model.encode_text(text), model.logit_scale.detach()


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def save_openai_style(model: torch.nn.Module, path: Path, fp16: bool) -> None:
    """A TorchScript archive laid out like OpenAI's release: the scripted CLIP (open_clip's CLIP
    scripts, as `create_model(jit=True)` does), the int attributes `input_resolution`,
    `context_length`, `vocab_size` stored as tensors, and — for `fp16` — OpenAI's half-precision
    conv/linear/attention/projection weights (`convert_weights_to_lp` mirrors their `convert_weights`)."""
    m = copy.deepcopy(model)
    ints = {"input_resolution": m.visual.image_size, "context_length": m.context_length, "vocab_size": m.vocab_size}
    for name, value in ints.items():  # open_clip keeps them as plain ints, unused by the scripted forward
        if hasattr(m, name):
            delattr(m, name)
        m.register_buffer(name, torch.tensor(value))
    if fp16:
        open_clip.convert_weights_to_lp(m, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's format is not
        torch.jit.script(m).save(str(path))


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-like-openai"])
def test_clip_torchscript_archive(clip, clip_inputs, tmp_path, fp16):
    path = tmp_path / "RN-tiny.pt"
    save_openai_style(clip, path, fp16)
    assert is_torchscript(path)
    loaded = create_clip(CLIP_SPEC, checkpoint=path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    reference = copy.deepcopy(clip)
    if fp16:  # the archive holds half-precision weights: compare with their fp32 cast
        open_clip.convert_weights_to_lp(reference, dtype=torch.float16)
        reference.float()
    assert_same(clip_outputs(loaded, clip_inputs), clip_outputs(reference, clip_inputs))


def test_clip_training_checkpoint_plain_and_safetensors(clip, clip_inputs, tmp_path):
    state = clip.state_dict()
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    torch.save(state, tmp_path / "plain.pt")
    weights = save_clip(clip, CLIP_SPEC, tmp_path / "st")
    expected = clip_outputs(clip, clip_inputs)
    for path in (tmp_path / "epoch_3.pt", tmp_path / "plain.pt", weights):
        assert_same(clip_outputs(create_clip(CLIP_SPEC, checkpoint=path), clip_inputs), expected)
    spec = ModelSpec("open_clip", CLIP_SPEC.arch, str(weights))  # the spec's own checkpoint, via the factory
    assert_same(clip_outputs(create_model(spec), clip_inputs), expected)


def test_clip_errors_name_file_and_arch(clip, tmp_path):
    missing = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        create_clip(CLIP_SPEC, checkpoint=missing)

    other = tmp_path / "resnet18.safetensors"
    save_safetensors(other, create_timm(TIMM_SPEC, num_classes=10, init_seed=0).state_dict())
    with pytest.raises(ValueError, match=r"resnet18\.safetensors.*tinyclip-rn32.*missing"):
        create_clip(CLIP_SPEC, checkpoint=other)

    state = dict(clip.state_dict())
    state["text_projection"] = torch.zeros(64, 32)  # same keys, another embed_dim
    torch.save(state, tmp_path / "wrong_shape.pt")
    with pytest.raises(ValueError, match=r"wrong_shape\.pt.*tinyclip-rn32"):
        create_clip(CLIP_SPEC, checkpoint=tmp_path / "wrong_shape.pt")

    torch.save(clip, tmp_path / "pickled_module.pt")  # a pickled nn.Module: refused by weights_only=True
    with pytest.raises(ValueError, match=r"pickled_module\.pt.*tinyclip-rn32"):
        create_clip(CLIP_SPEC, checkpoint=tmp_path / "pickled_module.pt")


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return create_timm(TIMM_SPEC, num_classes=10, init_seed=0)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))


def test_timm_formats_reload_identically(resnet, tmp_path):
    state = resnet.state_dict()
    prefixed = {f"module.{k}": v for k, v in state.items()}
    save_safetensors(tmp_path / "model.safetensors", state)
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"epoch": 7, "arch": "resnet18", "state_dict": prefixed, "args": argparse.Namespace(lr=0.1)}, tmp_path / "train.pth.tar")
    torch.save({"model": prefixed, "epoch": 7}, tmp_path / "model_key.pt")
    torch.save({"state_dict_ema": prefixed}, tmp_path / "ema_only.pth")
    expected = logits(resnet)
    for name in ("model.safetensors", "plain.pth", "train.pth.tar", "model_key.pt", "ema_only.pth"):
        loaded = create_timm(TIMM_SPEC, checkpoint=tmp_path / name)  # head size read from the checkpoint
        assert not loaded.training
        assert torch.equal(logits(loaded), expected), name
    spec = ModelSpec("timm", "resnet18", str(tmp_path / "model.safetensors"))
    assert torch.equal(logits(create_model(spec, num_classes=10)), expected)


def test_timm_ema_preferred_like_timm(resnet, tmp_path):
    other = create_timm(TIMM_SPEC, num_classes=10, init_seed=1)
    torch.save({"state_dict": other.state_dict(), "state_dict_ema": resnet.state_dict()}, tmp_path / "both.pth")
    assert torch.equal(logits(create_timm(TIMM_SPEC, tmp_path / "both.pth")), logits(resnet))
    assert torch.equal(logits(create_timm(TIMM_SPEC, tmp_path / "both.pth", use_ema=False)), logits(other))


def test_timm_errors(resnet, clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        create_timm(TIMM_SPEC, checkpoint=tmp_path / "absent.pth")
    save_safetensors(tmp_path / "r18.safetensors", resnet.state_dict())
    with pytest.raises(ValueError, match=r"r18\.safetensors.*resnet18"):
        create_timm(TIMM_SPEC, checkpoint=tmp_path / "r18.safetensors", num_classes=5)
    save_safetensors(tmp_path / "clip.safetensors", clip.state_dict())
    with pytest.raises(ValueError, match=r"clip\.safetensors.*resnet18.*missing"):
        create_timm(TIMM_SPEC, checkpoint=tmp_path / "clip.safetensors")
    with pytest.raises(ValueError, match="unknown model family 'hf'"):
        create_model(ModelSpec("hf", "bert", None))
    with pytest.raises(ValueError, match="num_classes"):
        create_model(CLIP_SPEC, num_classes=10)


def test_timm_transform_is_eval_protocol(resnet):
    x = timm_transform(resnet, crop_pct=0.875)(Image.new("RGB", (400, 300), (200, 10, 10)))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
