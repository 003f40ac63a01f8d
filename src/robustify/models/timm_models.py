"""timm classifiers built from an architecture name and an optional local checkpoint — never a download.

The model is always created with `pretrained=False` and the checkpoint loaded afterwards with every
key checked: timm's own `pretrained` route adapts a mismatching classifier silently (it drops the
head), which would turn a wrong checkpoint into a random head instead of an error.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.data import create_transform, resolve_data_config

from robustify.config import ModelSpec


def read_timm_state(checkpoint: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """A clean state dict from a safetensors file, a plain state dict, or a timm training checkpoint.

    `timm.models.load_state_dict` does the unwrapping: `state_dict_ema`/`model_ema` when `use_ema`
    (timm's `load_checkpoint` default, as EMA weights are the ones timm evaluates), else
    `state_dict`/`model`; DDP `module.` and torch.compile `_orig_mod.` prefixes are stripped; `.pt/.pth`
    is read with `torch.load(weights_only=True)`, allowing only the `argparse.Namespace` that timm's
    train.py stores under `args`.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=use_ema, device="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, SafetensorError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a weights-only timm checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: no tensor state dict found (top-level entries: {keys})")
    return state


def _head_classes(arch: str, state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the checkpoint's classifier weight, found by the name timm's pretrained config gives it."""
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = cfg.classifier if cfg is not None else None
    names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    for name in names:
        weight = state.get(f"{name}.weight") if name else None
        if weight is not None and weight.ndim >= 2:
            return int(weight.shape[0])
    return None


def create_timm(
    spec: ModelSpec,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    init_seed: int | None = None,
    *,
    use_ema: bool = True,
) -> torch.nn.Module:
    """Build `spec.arch` in eval mode; load `checkpoint` (or `spec.checkpoint`) if given, else random init.

    `num_classes=None` takes the head size from the checkpoint (so a 10-class fine-tune loads without
    being told), or timm's default for a random init. `init_seed` seeds the random init without
    touching the global RNG, as for `create_clip`.
    """
    if spec.family != "timm":
        raise ValueError(f"model family '{spec.family}' is not a timm model")
    if not timm.models.is_model(spec.arch):
        raise KeyError(f"unknown timm architecture '{spec.arch}'")
    ckpt = checkpoint if checkpoint is not None else spec.checkpoint
    state = read_timm_state(ckpt, use_ema) if ckpt is not None else None
    if num_classes is None and state is not None:
        num_classes = _head_classes(spec.arch, state)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even when not strict
            raise ValueError(f"{ckpt}: cannot be loaded into timm architecture '{spec.arch}': {e}") from e
        if missing or unexpected:
            raise ValueError(
                f"{ckpt}: does not match timm architecture '{spec.arch}' "
                f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})"
            )
    return model.eval()


def timm_transform(model: torch.nn.Module, **overrides: Any) -> Any:
    """timm's eval transform for `model` (resize by crop_pct, centre crop, normalise), as validate.py builds it.

    `overrides` are `resolve_data_config` arguments (e.g. `crop_pct=0.875` for the classic 256→224).
    """
    config = resolve_data_config(dict(overrides), model=model)
    return create_transform(**config, is_training=False)


# ------------------------------------------------------------------ timm models as ImageClassifiers
class TimmEncoder(torch.nn.Module):
    """A timm classifier's feature part, `forward_head(forward_features(x), pre_logits=True)`, so that
    `ImageClassifier(TimmEncoder(m), m.get_classifier())` computes `m(x)` and the fine-tuning loop,
    the evaluator and the distillation teachers treat timm and open_clip towers alike.

    `preprocess_cfg` is in open_clip's format (size, mean, std, interpolation): the training data and
    the eval transform read it as they read a CLIP tower's. `image_size` overrides timm's default input
    size (a random-init teacher of the 32-px mini-world)."""

    def __init__(self, model: torch.nn.Module, image_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = resolve_data_config({}, model=model)
        size = int(image_size) if image_size is not None else int(cfg["input_size"][-1])
        self.preprocess_cfg = {"size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
                               "interpolation": cfg.get("interpolation", "bicubic"), "resize_mode": "shortest"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def timm_classifier(model: torch.nn.Module, image_size: int | None = None) -> Any:
    """`ImageClassifier` view of a timm model (the head is the model's own classifier module)."""
    from robustify.models.zeroshot import ImageClassifier

    return ImageClassifier(TimmEncoder(model, image_size), model.get_classifier())


def save_timm_classifier(out_dir: str | Path, classifier: Any, arch: str, info: dict[str, Any]) -> None:
    """A timm classifier directory: `model.safetensors` (the whole timm model, loadable by `create_timm`)
    + `classifier.json` (family timm, arch, input size, and `info`)."""
    from robustify.io import save_safetensors, write_json

    out_dir = Path(out_dir)
    encoder = classifier.encoder
    if not isinstance(encoder, TimmEncoder):
        raise TypeError(f"save_timm_classifier: expected a TimmEncoder tower, got {type(encoder).__name__}")
    state = {k: v.contiguous() for k, v in encoder.model.state_dict().items()}
    save_safetensors(out_dir / "model.safetensors", state, metadata={"arch": arch})
    write_json(out_dir / "classifier.json", {
        **info, "family": "timm", "arch": arch, "weights": "model.safetensors", "head_type": "timm",
        "image_size": encoder.preprocess_cfg["size"], "num_classes": int(encoder.model.num_classes)})


def load_timm_classifier(clf_dir: str | Path, info: dict[str, Any]) -> Any:
    """The `ImageClassifier` of a directory written by `save_timm_classifier`."""
    clf_dir = Path(clf_dir)
    for key in ("arch", "weights"):
        if key not in info:
            raise ValueError(f"{clf_dir / 'classifier.json'}: missing key '{key}'")
    model = create_timm(ModelSpec("timm", info["arch"]), checkpoint=clf_dir / info["weights"],
                        num_classes=info.get("num_classes"))
    return timm_classifier(model, info.get("image_size")).eval()
