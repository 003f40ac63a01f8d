"""open_clip models built from a config name and an optional local checkpoint — never a download.

robustify ships small configs (e.g. `tinyclip-rn32`, the mini-world's ResNet tower at 32 px) in
`configs/` beside this file and registers them with open_clip, so the same `create_model` path
serves them and open_clip's builtin architectures.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import open_clip
import torch

from robustify.config import ModelSpec
from robustify.io import load_safetensors, read_json, save_safetensors, write_json

CONFIG_DIR = Path(__file__).parent / "configs"


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
    itself randomly per process, so an unseeded init differs on every run).
    """
    if spec.family != "open_clip":
        raise ValueError(f"model family '{spec.family}' is not an open_clip model")
    model_config(spec.arch)
    ckpt = checkpoint if checkpoint is not None else spec.checkpoint
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
        ckpt = Path(ckpt)
        if ckpt.suffix == ".safetensors":
            state = load_safetensors(ckpt)
        else:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "attn_mask"]  # a buffer rebuilt from the config
        if missing or unexpected:
            raise ValueError(f"{ckpt}: does not match architecture '{spec.arch}' (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


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
