"""open_clip models built from a config name and an optional local checkpoint — never a download.

robustify ships small configs (e.g. `tinyclip-rn32`, the mini-world's ResNet tower at 32 px) in
`configs/` beside this file and registers them with open_clip, so the same `create_model` path
serves them and open_clip's builtin architectures.
"""

from __future__ import annotations

import functools
import logging
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError

from robustify.config import ModelSpec
from robustify.io import read_json, save_safetensors, write_json

CONFIG_DIR = Path(__file__).parent / "configs"
OPENAI_INT_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints OpenAI's archives store as tensors


@functools.cache
def _register_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def model_config(arch: str) -> dict[str, Any]:
    _register_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise KeyError(f"unknown open_clip architecture '{arch}' (shipped: {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))})")
    return cfg


def create_clip(spec: ModelSpec, checkpoint: str | Path | None = None, init_seed: int | None = None) -> torch.nn.Module:
    """Build `spec.arch`; load `checkpoint` (or `spec.checkpoint`) if given, else random init.

    `init_seed` makes the random init reproducible without touching the global RNG (torch seeds
    itself randomly per process, so an unseeded init differs on every run). Checkpoint formats:
    see `load_clip_checkpoint`.
    """
    if spec.family != "open_clip":
        raise ValueError(f"model family '{spec.family}' is not an open_clip model")
    model_config(spec.arch)
    ckpt = checkpoint if checkpoint is not None else spec.checkpoint
    if ckpt is not None and not Path(ckpt).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt} (model '{spec.arch}')")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns about random init, which is what we asked for
    try:
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            model = open_clip.create_model(spec.arch, pretrained=None)
    finally:
        root.setLevel(level)
    if ckpt is not None:
        load_clip_checkpoint(model, ckpt, spec.arch)
    return model.eval()


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (OpenAI's released `.pt`) is a zip holding `constants.pkl`; the same test
    `torch.load` applies before refusing such an archive under `weights_only=True`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in zf.namelist())


def load_clip_checkpoint(model: torch.nn.Module, checkpoint: str | Path, arch: str) -> None:
    """Load a local checkpoint into `model` in place; every key must match.

    Formats: an OpenAI TorchScript archive; a plain state dict `.pt`/`.pth`/`.bin`; an open_clip
    training checkpoint (`{'state_dict': ..., 'epoch': ...}`, DDP `module.` prefixes); `.safetensors`.
    Everything but TorchScript goes through `open_clip.load_checkpoint` (weights_only=True), which
    unwraps and converts the formats open_clip knows. We build the model first and load into it rather
    than `open_clip.create_model(arch, pretrained=path)` because that path loads strictly with
    `torch.load(weights_only=True)`, which refuses TorchScript; one route serves all formats here.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (model '{arch}')")
    try:
        if is_torchscript(path):
            missing, unexpected = _load_torchscript(model, path)
        else:
            result = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
            # big_vision .npz weights are loaded by name and come back as {}, not as incompatible keys
            missing, unexpected = (result.missing_keys, result.unexpected_keys) if hasattr(result, "missing_keys") else ([], [])
    except (RuntimeError, KeyError, TypeError, AttributeError, StopIteration, pickle.UnpicklingError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot be loaded into open_clip architecture '{arch}': {e}") from e
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match open_clip architecture '{arch}' "
            f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
        )


def _load_torchscript(model: torch.nn.Module, path: Path) -> tuple[list[str], list[str]]:
    """OpenAI's route (open_clip `load_openai_model`): `torch.jit.load` on CPU, then `.state_dict()`.

    `torch.load(weights_only=True)` refuses TorchScript; `torch.jit.load` restores TorchScript
    modules and tensors and, unlike an unrestricted unpickle, cannot call arbitrary Python (still,
    such archives are trusted inputs: the published OpenAI files). Keys follow open_clip
    `load_state_dict`'s treatment of a ScriptModule: the int attributes OpenAI stored as tensors are
    dropped; so are buffers the model rebuilds from its config (`attn_mask`, which scripting makes
    persistent). OpenAI's fp16 weights are cast by `load_state_dict` into the fp32 parameters.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation; this format needs it
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    own = model.state_dict()
    rebuilt = {name for name, _ in model.named_buffers()} - own.keys()
    state = {k: v for k, v in state.items() if k not in OPENAI_INT_KEYS and k not in rebuilt}
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    return list(missing), list(unexpected)


def tokenizer(arch: str) -> Any:
    _register_configs()
    return open_clip.get_tokenizer(arch)


def preprocess(model: torch.nn.Module) -> Any:
    """open_clip's own eval transform for this model (resize, centre crop, CLIP normalisation)."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(
        cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
    )


def save_clip(model: torch.nn.Module, spec: ModelSpec, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """`model.safetensors` + `config.json` (family, arch, open_clip config) — reloadable by `load_clip`."""
    out_dir = Path(out_dir)
    state = {k: v for k, v in model.state_dict().items() if k != "attn_mask"}
    save_safetensors(out_dir / "model.safetensors", state, metadata={"arch": spec.arch})
    write_json(out_dir / "config.json", {"family": spec.family, "arch": spec.arch, "open_clip_config": model_config(spec.arch), **(extra or {})})
    return out_dir / "model.safetensors"


def load_clip(model_dir: str | Path) -> tuple[torch.nn.Module, ModelSpec]:
    info = read_json(Path(model_dir) / "config.json")
    spec = ModelSpec(family=info["family"], arch=info["arch"], checkpoint=str(Path(model_dir) / "model.safetensors"))
    return create_clip(spec), spec
