"""Zero-shot classification heads and the image classifier they form with an image tower.

SPEC §1: for each class, embed every template with the class name, L2-normalise each, average,
re-normalise → column w_c. The head keeps unit-norm columns and applies the CLIP scale
s = exp(logit_scale) in `forward` (lipsum-ft's convention; wise-ft folds s into the weights, which
changes AdamW's effective step on the head). It also keeps the per-template context matrix `ctx`
(D×T: per template, the re-normalised mean over classes of its class embeddings) that CAR-FT uses.

open_clip's `build_zero_shot_classifier` computes the same columns, but not the per-template
embeddings `ctx` needs, so both come from one pass over the C×T prompts here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robustify.config import ModelSpec
from robustify.io import load_safetensors, read_json, save_safetensors, write_json
from robustify.models.clip import create_clip


class ZeroShotHead(nn.Module):
    """Logits = s · <f/|f|, w_c> with unit-norm columns w_c and s applied here, not in W."""

    def __init__(self, weight: torch.Tensor, logit_scale: float | torch.Tensor, ctx: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())  # D×C
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).clone())
        self.register_buffer("ctx", ctx.clone() if ctx is not None else torch.empty(weight.shape[0], 0))

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.weight


@torch.no_grad()
def prompt_embeddings(
    clip: nn.Module, tokenize: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
    templates: Sequence[str], batch_size: int = 1024,
) -> torch.Tensor:
    """C×T×D unit-norm text embeddings of every (class, template) prompt."""
    device = next(clip.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]
    chunks = [clip.encode_text(tokenize(texts[i : i + batch_size]).to(device)) for i in range(0, len(texts), batch_size)]
    emb = F.normalize(torch.cat(chunks).float(), dim=-1)
    return emb.view(len(classnames), len(templates), -1)


def resolve_templates(templates: Sequence[str] | str) -> list[str]:
    """A template list from params: explicit "...{}..." strings, or "openai_imagenet" = the 80
    templates of the CLIP paper as shipped by open_clip."""
    if isinstance(templates, str):
        if templates != "openai_imagenet":
            raise ValueError(f"unknown template set '{templates}' (known: openai_imagenet)")
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return list(templates)


def build_zeroshot_head(
    clip: nn.Module, tokenize: Callable[[list[str]], torch.Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> ZeroShotHead:
    if not classnames or not templates:
        raise ValueError("a zero-shot head needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class name: {bad}")
    emb = prompt_embeddings(clip, tokenize, classnames, templates)
    weight = F.normalize(emb.mean(dim=1), dim=-1).T  # D×C
    ctx = F.normalize(emb.mean(dim=0), dim=-1).T  # D×T
    return ZeroShotHead(weight.cpu(), clip.logit_scale.detach().float().cpu(), ctx.cpu())


class ImageClassifier(nn.Module):
    """Image tower + classification head; the unit every evaluation and fine-tuning method uses."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


class EnsembleClassifier(nn.Module):
    """Output-space ensemble: the mean of its members' logits (the greedy ensemble of model soups)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images).float() for m in self.members]).mean(dim=0)


# ------------------------------------------------------------------ classifier directories
def save_zeroshot_classifier(
    out_dir: str | Path, head: ZeroShotHead, spec: ModelSpec, checkpoint: str, info: dict[str, Any]
) -> None:
    """A classifier directory: `head.safetensors` + `classifier.json` naming the image tower's checkpoint.

    The tower is referenced, not copied: a zero-shot classifier of a ViT-L would otherwise duplicate
    a gigabyte per label space.
    """
    out_dir = Path(out_dir)
    save_safetensors(out_dir / "head.safetensors", head.state_dict())
    write_json(out_dir / "classifier.json", {
        "family": spec.family, "arch": spec.arch, "checkpoint": checkpoint, "head": "head.safetensors",
        "head_type": "zeroshot", **info,
    })


def save_classifier(out_dir: str | Path, classifier: ImageClassifier, base: dict[str, Any], info: dict[str, Any]) -> None:
    """A trained classifier directory: its own tower (`encoder.safetensors`) and head, plus `base`'s
    keys (family, arch, the pre-trained CLIP checkpoint — the text tower and θ0 stay referenced)."""
    out_dir = Path(out_dir)
    save_safetensors(out_dir / "encoder.safetensors", classifier.encoder.state_dict())
    save_safetensors(out_dir / "head.safetensors", classifier.head.state_dict())
    keep = {k: base[k] for k in ("family", "arch", "checkpoint", "train_dataset", "classes") if k in base}
    write_json(out_dir / "classifier.json", {**keep, "head": "head.safetensors", "encoder": "encoder.safetensors",
                                             "head_type": "trained", **info})


def save_ensemble(out_dir: str | Path, members: Sequence[str | Path], info: dict[str, Any]) -> None:
    """An ensemble classifier directory: `classifier.json` listing its member directories (referenced,
    not copied), relative to the working directory as the pipeline's paths are."""
    first = read_json(Path(members[0]) / "classifier.json")
    keep = {k: first[k] for k in ("family", "arch", "checkpoint", "train_dataset") if k in first}
    write_json(Path(out_dir) / "classifier.json", {**keep, "head_type": "ensemble",
                                                    "members": [str(m) for m in members], **info})


def load_classifier(clf_dir: str | Path, with_clip: bool = False) -> tuple[nn.Module, dict[str, Any]] | tuple[nn.Module, dict[str, Any], nn.Module]:
    """(classifier, classifier.json) — and the whole pre-trained CLIP when `with_clip` (its text tower
    and θ0 tower; the classifier's tower is then a separate copy). An ensemble directory gives an
    `EnsembleClassifier` of its members (and the first member's CLIP)."""
    clf_dir = Path(clf_dir)
    info = read_json(clf_dir / "classifier.json")
    if info.get("head_type") == "ensemble":
        loaded = [load_classifier(m, with_clip=with_clip and i == 0) for i, m in enumerate(info.get("members") or [])]
        if not loaded:
            raise ValueError(f"{clf_dir / 'classifier.json'}: an ensemble needs 'members'")
        ensemble = EnsembleClassifier([x[0] for x in loaded]).eval()
        return (ensemble, info, loaded[0][2]) if with_clip else (ensemble, info)
    if info.get("family") == "timm":  # a timm classifier (the distillation teachers): no CLIP behind it
        from robustify.models.timm_models import load_timm_classifier

        classifier = load_timm_classifier(clf_dir, info)
        return (classifier, info, None) if with_clip else (classifier, info)
    for key in ("family", "arch", "checkpoint", "head"):
        if key not in info:
            raise ValueError(f"{clf_dir / 'classifier.json'}: missing key '{key}'")
    clip = create_clip(ModelSpec(info["family"], info["arch"]), checkpoint=info["checkpoint"])
    encoder = clip.visual
    if info.get("encoder"):
        if with_clip:
            import copy

            encoder = copy.deepcopy(clip.visual)
        state = load_safetensors(clf_dir / info["encoder"])
        if "prompts" in state:  # a VPT run's tower: the prompts + the frozen tower under `tower.`
            from robustify.methods.regularizers.vpt import PromptedTower, is_prompted_state  # the method owns its format

            if is_prompted_state(state):
                encoder = PromptedTower.from_state_dict(encoder, state)
                state = None
        if state is not None:
            encoder.load_state_dict(state, strict=True)
    state = load_safetensors(clf_dir / info["head"])
    head = ZeroShotHead(state["weight"], state["logit_scale"], state["ctx"])
    classifier = ImageClassifier(encoder, head).eval()
    return (classifier, info, clip) if with_clip else (classifier, info)
