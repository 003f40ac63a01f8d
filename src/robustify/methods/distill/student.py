"""The three-head student of "Efficiently Robustify Pre-Trained Models" (SPEC §3, paper §4.1, App. G).

`M = M_h ∘ M_s ∘ M_b`: a frozen backbone prefix `M_b`, a shared tunable section `M_s` and a head
section `M_h` replicated into the clean `h_c`, unclean/robust `h_u` and combined `h_m` heads, each
ending in its own copy of the classifier.

Layers. A vision tower is seen as `pre → layers[0..L) → post` (`TowerView`); the layers are the
library's own blocks (open_clip ViT resblocks, ModifiedResNet / timm ResNet bottlenecks of
layer1..4, timm ViT blocks). `pre` and `post` hold the tower's own modules and run the library's own
code (its methods called with the section as `self`), so pre → layers → post is the library's
forward op for op. "Fraction tuned" (paper Table 5) selects the trailing layers that are tuned; the
last `head_fraction` (1/5, App. G) of those, at least one, forms the head section, together with
`post` (M_h runs "from the N-th layer till the end", §4.1). Granularity [choice]: whole blocks, as
the brief defines layers; the paper's Table 10 counts (3.1M tuned of ViT-B/16's 88M, less than one
7M block) suggest it counted finer layers, which this view does not split.

Dropout (p = 0.25, App. G) is a `TunableDropout` after every tunable layer (shared and head), on the
layer's whole output (tokens or feature map). Why there: MC-dropout must sample the tunable part only,
so the frozen prefix's features are computed once and reused across passes (App. G: "multiple passes
only through dropout activated layers"); a module between blocks works for every block type without
editing the library's blocks, and its own type lets `mc_dropout` switch exactly these layers — the
library's internal dropouts (timm attn/proj/head drop) keep the library's behaviour.

Ownership. The prefix reuses the tower's modules (no copy; their parameters are set to
requires_grad False) and the tunable layers, `post` and classifier are deep copies, so the tower
itself stays the original model: `ImageClassifier(tower, classifier)` remains T_clean, the frozen
initial model the clean head distils from (§4.3.1), at no extra memory.

Randomness: dropout draws from torch's global RNG (nn.Dropout has no generator argument); callers
that need reproducible masks seed it inside `torch.random.fork_rng`, as the fine-tuning loop does per
step and `selection.mc_head_outputs` does per call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.resnet import ResNet as TimmResNet
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from robustify.methods.distill import selection
from robustify.models.timm_models import TimmEncoder
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead

HEADS: tuple[str, ...] = ("clean", "unclean", "combined")
SHARED = "shared"


# ------------------------------------------------------------------ towers as ordered layers
class _Section(nn.Module):
    """A fixed part of a tower holding the tower's own modules, parameters, buffers and attributes by
    reference (no copy), so a library method can run with this section as `self`.

    Names the tower lacks are left unset, so library code that would need one fails loudly instead
    of reading a silent default (open_clip sets `attn_pool_contrastive` only with attentional pooling).
    """

    def __init__(self, tower: nn.Module, names: Sequence[str], **attrs: object) -> None:
        super().__init__()
        for name in names:
            if not hasattr(tower, name):
                continue
            value = getattr(tower, name)
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:  # None, flags, pooling names
                setattr(self, name, value)
        for name, value in attrs.items():
            setattr(self, name, value)


class _OpenClipViTPre(_Section):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = OpenClipViT._embeds(self, x)  # conv1, class + positional embedding, patch dropout, ln_pre
        # open_clip's Transformer goes sequence-first itself when built with batch_first=False
        return x if self.batch_first else x.transpose(0, 1).contiguous()


class _OpenClipViTPost(_Section):
    _global_pool = OpenClipViT._global_pool  # called by `_pool` on self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        pooled, _ = OpenClipViT._pool(self, x)  # ln_post + token/avg/attentional pooling
        # the pooled embedding only: `output_tokens` towers also return tokens, which no classifier reads
        return pooled if self.proj is None else pooled @ self.proj


class _OpenClipResNetStem(_Section):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ModifiedResNet.stem(self, x)


class _TimmViTPre(_Section):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's forward_features up to its blocks
        x = self.patch_embed(x)
        x = TimmViT._pos_embed(self, x)
        x = self.patch_drop(x)
        return self.norm_pre(x)


class _TimmViTPost(_Section):
    pool = TimmViT.pool  # called by `forward_head` on self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the end of forward_features (final norm), then forward_head up to the classifier (pool, fc_norm, head_drop)
        return TimmViT.forward_head(self, self.norm(x), pre_logits=True)


class _TimmResNetStem(_Section):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # timm's forward_features up to layer1 (timm has no method for the stem alone)
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))


class _TimmResNetPost(_Section):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TimmResNet.forward_head(self, x, pre_logits=True)  # global pool (+ timm's drop_rate)


@dataclass(frozen=True)
class TowerView:
    """A vision tower as `post(layers[L-1](… layers[0](pre(x))))`; every module is the tower's own."""

    kind: str
    pre: nn.Module
    layers: tuple[nn.Module, ...]
    post: nn.Module

    def run(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        for layer in self.layers:
            x = layer(x)
        return self.post(x)


VIEWS: dict[type[nn.Module], Callable[[nn.Module], TowerView]] = {}


def register_view(cls: type[nn.Module]) -> Callable[[Callable[[nn.Module], TowerView]], Callable[[nn.Module], TowerView]]:
    def deco(build: Callable[[nn.Module], TowerView]) -> Callable[[nn.Module], TowerView]:
        VIEWS[cls] = build
        return build

    return deco


@register_view(OpenClipViT)
def _open_clip_vit(tower: nn.Module) -> TowerView:
    batch_first = tower.transformer.batch_first
    pre = _OpenClipViTPre(tower, ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre"),
                          batch_first=batch_first)
    post = _OpenClipViTPost(tower, ("attn_pool", "attn_pool_contrastive", "attn_pool_type", "ln_post", "proj",
                                    "pool_type", "final_ln_after_pool"), batch_first=batch_first)
    return TowerView("open_clip-vit", pre, tuple(tower.transformer.resblocks), post)


@register_view(ModifiedResNet)
def _open_clip_resnet(tower: nn.Module) -> TowerView:
    pre = _OpenClipResNetStem(tower, ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3", "act3", "avgpool"))
    blocks = tuple(b for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4) for b in stage)
    return TowerView("open_clip-resnet", pre, blocks, tower.attnpool)


@register_view(TimmViT)
def _timm_vit(tower: nn.Module) -> TowerView:
    pre = _TimmViTPre(tower, ("patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "dynamic_img_size",
                              "no_embed_class", "num_prefix_tokens", "patch_drop", "norm_pre"))
    post = _TimmViTPost(tower, ("norm", "attn_pool", "pool_include_prefix", "num_prefix_tokens", "global_pool",
                                "fc_norm", "head_drop"))
    return TowerView("timm-vit", pre, tuple(tower.blocks), post)


@register_view(TimmResNet)
def _timm_resnet(tower: nn.Module) -> TowerView:
    pre = _TimmResNetStem(tower, ("conv1", "bn1", "act1", "maxpool"))
    post = _TimmResNetPost(tower, ("global_pool", "drop_rate"))
    blocks = tuple(b for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4) for b in stage)
    return TowerView("timm-resnet", pre, blocks, post)


@register_view(TimmEncoder)
def _robustify_timm_encoder(tower: nn.Module) -> TowerView:
    """robustify's `TimmEncoder` (a timm classifier's tower, e.g. a unimodal student's start point): the
    view of the timm model inside, which ends at `forward_head(..., pre_logits=True)` as the encoder does."""
    return tower_view(tower.model)


def tower_view(tower: nn.Module) -> TowerView:
    """The layer view of `tower`. Types match exactly: a subclass may change the forward (timm's
    distilled ViT pools two tokens), so it needs its own entry in `VIEWS`. Gradient checkpointing
    flags are ignored (they change memory, not values). For a timm classifier the view ends before
    its classifier (`get_classifier()`), i.e. at `forward_head(..., pre_logits=True)`."""
    build = VIEWS.get(type(tower))
    if build is None:
        known = sorted(f"{c.__module__}.{c.__qualname__}" for c in VIEWS)
        raise TypeError(f"no layer view for tower type {type(tower).__module__}.{type(tower).__qualname__} (supported: {known})")
    return build(tower)


# ------------------------------------------------------------------ which layers are tuned
def _round_half_up(v: float) -> int:
    # not round(): banker's rounding would send 2.5 layers to 2 but 3.5 to 4; the epsilon absorbs
    # float noise such as 0.15 * 10 = 1.4999999999999998
    return math.floor(v + 0.5 + 1e-9)


def tuned_layer_counts(n_layers: int, fraction_tuned: float, head_fraction: float = 0.2) -> tuple[int, int]:
    """(tuned layers, head-section layers) for a tower of `n_layers` layers.

    tuned = round(fraction_tuned · n_layers) [choice: nearest, halves up], which must leave at least
    one layer tuned and one frozen; head = max(1, round(head_fraction · tuned)) — App. G's "last
    one-fifth of the tuning portion", at least one layer so the heads differ in more than `post`.
    """
    if not 0.0 < fraction_tuned < 1.0:
        raise ValueError(f"fraction_tuned must be in (0, 1), got {fraction_tuned}")
    if not 0.0 < head_fraction <= 1.0:
        raise ValueError(f"head_fraction must be in (0, 1], got {head_fraction}")
    n_tuned = _round_half_up(fraction_tuned * n_layers)
    if n_tuned < 1:
        raise ValueError(f"fraction_tuned={fraction_tuned} of {n_layers} layers selects no layer "
                         f"({fraction_tuned * n_layers:.3g} rounds to 0; the smallest usable fraction is {0.5 / n_layers:.3g})")
    if n_tuned >= n_layers:
        raise ValueError(f"fraction_tuned={fraction_tuned} of {n_layers} layers selects all {n_layers} layers; "
                         "at least one must stay frozen")
    return n_tuned, max(1, _round_half_up(head_fraction * n_tuned))


@dataclass(frozen=True)
class TowerSplit:
    """`view.layers` = frozen [0, n_frozen) + shared [n_frozen, n_frozen + n_shared) + head (the rest)."""

    view: TowerView
    n_frozen: int
    n_shared: int
    n_head: int

    @property
    def n_tuned(self) -> int:
        return self.n_shared + self.n_head

    @property
    def frozen_layers(self) -> tuple[nn.Module, ...]:
        return self.view.layers[: self.n_frozen]

    @property
    def shared_layers(self) -> tuple[nn.Module, ...]:
        return self.view.layers[self.n_frozen : self.n_frozen + self.n_shared]

    @property
    def head_layers(self) -> tuple[nn.Module, ...]:
        return self.view.layers[self.n_frozen + self.n_shared :]


def split_tower(tower: nn.Module, fraction_tuned: float, head_fraction: float = 0.2) -> TowerSplit:
    """Split `tower` into frozen / shared / head layers (see `tuned_layer_counts`)."""
    view = tower_view(tower)
    n_tuned, n_head = tuned_layer_counts(len(view.layers), fraction_tuned, head_fraction)
    return TowerSplit(view, len(view.layers) - n_tuned, n_tuned - n_head, n_head)


# ------------------------------------------------------------------ the student
class TunableDropout(nn.Dropout):
    """The dropout of the tunable part (after each tunable layer): its own type so that `mc_dropout`
    switches exactly these layers."""


def _tunable(layers: Sequence[nn.Module], p: float) -> nn.Sequential:
    seq = nn.Sequential(*(m for layer in layers for m in (copy.deepcopy(layer), TunableDropout(p))))
    return seq.requires_grad_(True)  # tuned whatever the tower's flags (a `lock()`ed tower has none set)


class _Prefix(nn.Module):
    def __init__(self, pre: nn.Module, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pre, self.layers = pre, nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pre(x))


class _Head(nn.Module):
    def __init__(self, layers: nn.Sequential, post: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layers, self.post, self.classifier = layers, post, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.post(self.layers(x)))


class ThreeHeadStudent(nn.Module):
    """Frozen prefix (pre + frozen layers) → shared section → heads {clean, unclean, combined}, each
    = its head layers + `post` + its classifier; every tunable layer is followed by dropout.

    Each head starts as a copy of the original trailing layers, `post` and classifier, so at init
    (dropout inactive) every head computes the original model's logits. The classifier is trainable
    in the visual-evaluation setup (a linear head) and frozen in the zero-shot setup (a `ZeroShotHead`:
    normalised text embeddings × logit scale); `classifier_trainable` overrides that default.
    """

    def __init__(self, split: TowerSplit, classifier: nn.Module, dropout: float = 0.25,
                 classifier_trainable: bool | None = None, heads: Sequence[str] = HEADS) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        heads = tuple(heads)
        if not heads or len(set(heads)) != len(heads) or any(h not in HEADS for h in heads):
            raise ValueError(f"heads must be distinct names from {list(HEADS)}, got {list(heads)}")
        self.kind, self.dropout = split.view.kind, float(dropout)
        self.prefix = _Prefix(split.view.pre, split.frozen_layers).requires_grad_(False)
        self.shared = _tunable(split.shared_layers, dropout)
        trainable = not isinstance(classifier, ZeroShotHead) if classifier_trainable is None else classifier_trainable
        self.heads = nn.ModuleDict({
            name: _Head(_tunable(split.head_layers, dropout), copy.deepcopy(split.view.post).requires_grad_(True),
                        copy.deepcopy(classifier).requires_grad_(trainable))
            for name in heads
        })
        self.train()

    @classmethod
    def from_model(cls, model: nn.Module, fraction_tuned: float, head_fraction: float = 0.2, dropout: float = 0.25,
                   classifier_trainable: bool | None = None, heads: Sequence[str] = HEADS) -> ThreeHeadStudent:
        """From an `ImageClassifier` (open_clip tower + head) or a timm classifier (tower = the model,
        classifier = its `get_classifier()`)."""
        if isinstance(model, ImageClassifier):
            tower, classifier = model.encoder, model.head
        elif type(model) in (TimmViT, TimmResNet):
            tower, classifier = model, model.get_classifier()
        else:
            raise TypeError(f"cannot take tower and classifier from {type(model).__qualname__}: pass an ImageClassifier "
                            "or a timm VisionTransformer/ResNet, or build with ThreeHeadStudent(split_tower(...), classifier)")
        return cls(split_tower(tower, fraction_tuned, head_fraction), classifier, dropout, classifier_trainable, heads)

    def train(self, mode: bool = True) -> ThreeHeadStudent:
        """The tunable part follows `mode`; the prefix stays in eval, so the frozen backbone's
        BatchNorm statistics never change and its own dropouts never fire."""
        super().train(mode)
        self.prefix.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output, without autograd: the cacheable part of every pass.

        The prefix's modules are the tower's own, so a `tower.train()` elsewhere (e.g. on the T_clean
        classifier that shares them) would switch them too; eval is therefore set here on every call.
        """
        self.prefix.eval()
        with torch.no_grad():
            return self.prefix(x)

    def forward_from_features(self, features: torch.Tensor, heads: Sequence[str] = HEADS) -> dict[str, torch.Tensor]:
        """Logits per requested head: the shared section once, then each head."""
        unknown = [h for h in heads if h not in self.heads]
        if unknown:
            raise ValueError(f"unknown heads {unknown} (this student has: {list(self.heads)})")
        z = self.shared(features)
        return {h: self.heads[h](z) for h in heads}

    def forward(self, x: torch.Tensor, heads: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.forward_from_features(self.features(x), tuple(self.heads) if heads is None else heads)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The state that is not the pre-trained tower's: shared section and heads (what a run saves;
        the frozen prefix is the tower's own weights, loaded from its checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("prefix.")}

    def section_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by section: "shared", then one entry per head."""
        sections = {SHARED: self.shared, **self.heads}
        return {name: [p for p in m.parameters() if p.requires_grad] for name, m in sections.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for params in self.section_parameters().values() for p in params]

    def count_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def mc_dropout(model: nn.Module, enabled: bool = True) -> AbstractContextManager[nn.Module]:
    """Everything in eval mode except, when `enabled`, the `TunableDropout` layers (MC-dropout passes);
    every module's previous mode is restored on exit.

    Unlike `selection.mc_dropout`'s default, which switches every dropout type, only the paper's
    dropout fires: the library's own dropouts inside copied blocks (timm attn/proj/head drop) keep eval
    behaviour.
    """
    return selection.mc_dropout(model, types=(TunableDropout,) if enabled else ())
