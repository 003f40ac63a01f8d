"""One entry point from a DESIGN §3 model spec `{family, arch, checkpoint}` to a module.

A registry keyed by family, so adding a family is one entry here and no caller changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from robustify.config import ModelSpec
from robustify.models.clip import create_clip
from robustify.models.timm_models import create_timm


def _open_clip(spec: ModelSpec, checkpoint: str | Path | None, num_classes: int | None, init_seed: int | None) -> torch.nn.Module:
    if num_classes is not None:
        raise ValueError(f"open_clip model '{spec.arch}' has no classifier head to size (num_classes={num_classes}); "
                         "build a zero-shot head instead")
    return create_clip(spec, checkpoint, init_seed)


def _timm(spec: ModelSpec, checkpoint: str | Path | None, num_classes: int | None, init_seed: int | None) -> torch.nn.Module:
    return create_timm(spec, checkpoint, num_classes, init_seed)


FAMILIES: dict[str, Callable[[ModelSpec, str | Path | None, int | None, int | None], torch.nn.Module]] = {
    "open_clip": _open_clip,
    "timm": _timm,
}


def create_model(
    spec: ModelSpec, checkpoint: str | Path | None = None, num_classes: int | None = None, init_seed: int | None = None
) -> torch.nn.Module:
    """The model `spec` names, in eval mode; `checkpoint` overrides `spec.checkpoint` (None in both: random init)."""
    try:
        build = FAMILIES[spec.family]
    except KeyError:
        raise ValueError(f"unknown model family '{spec.family}' (known: {sorted(FAMILIES)})") from None
    return build(spec, checkpoint, num_classes, init_seed)
