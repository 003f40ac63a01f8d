"""VPT — Visual Prompt Tuning (Jia et al. 2022), a baseline of SPEC §3; reference KMnP/vpt
`src/models/vit_prompt/vit.py`.

Learnable prompt tokens join the token sequence after the positional embedding, right after the class
token (`[cls, prompts, patches]`); the backbone is frozen and only the prompts and the classification
head train. *Shallow*: one set of prompts at the input of the first block. *Deep*: a fresh set at the
input of every block — block i > 0 sees its own prompts in place of the previous block's prompt
outputs, which are discarded. Prompt outputs never reach the pooling: they are dropped after the last
block, so class-token and average pooling see exactly the tower's original tokens. The prompts enter
as the input of the first block, i.e. after open_clip's `ln_pre` / timm's `norm_pre` [choice]: the
reference's ViT has no pre-norm and feeds `[cls, prompts, patches]` straight into block 0, and deep
prompts (inserted between blocks) are un-normalised too, so every set is in the same space.

Towers: open_clip `VisionTransformer`, timm `VisionTransformer` (and subclasses that keep its
`_pos_embed`/`blocks`/`forward_head` structure), and open_clip `ModifiedResNet`. The ResNet has no
transformer blocks; its only attention is the attention pool, whose output is the first token's
(the spatial mean) attending over `[mean, HW tokens] + positional embedding`. Its VPT analogue here
[choice, documented]: the prompts are appended to that token sequence after the positional embedding
as extra keys/values (no query of their own is needed: only the first token's output is kept).
With a single attention layer, shallow and deep are the same method (one set of prompts).

Initialisation [ref]: uniform(−v, v), v = sqrt(6 / (3·p² + D)) — xavier-uniform over the patch
embedding's fan-in 3·p² and the token width D. For the ResNet, p is the side of the image cell one
attention-pool token covers (32 px) [choice]. The defaults follow the reference's config
(`MODEL.PROMPT.NUM_TOKENS = 5`, `MODEL.PROMPT.DROPOUT = 0.0`). As in the reference's `train()`, the
frozen backbone always runs in eval mode (BatchNorm statistics, dropout and patch dropout as at
evaluation); only the prompt dropout follows the training mode.

Persistence: the tuned encoder is a `PromptedTower` holding the original tower as submodule `tower`
and the prompts as one parameter `prompts` of shape (sets, tokens, D), so its state dict is the
tower's keys under `tower.` plus `prompts`. `PromptedTower.from_state_dict(fresh_tower, state)`
rebuilds it (shallow/deep follow from the number of prompt sets); `is_prompted_state` tells such a
state from a plain tower's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from robustify.io import derive_seed
from robustify.methods.finetune import FineTuneMethod, RunContext, register
from robustify.models.zeroshot import ImageClassifier

PREFIX = "tower."


def tower_kind(tower: nn.Module) -> str:
    """'open_clip-vit', 'timm-vit' or 'open_clip-rn'; any other tower is a ValueError naming its type."""
    from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
    from open_clip.transformer import VisionTransformer as OpenClipViT
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if isinstance(tower, OpenClipViT):
        return "open_clip-vit"
    if isinstance(tower, TimmViT):
        return "timm-vit"
    if isinstance(tower, ModifiedResNet):
        if type(tower.attnpool) is not AttentionPool2d:
            raise ValueError(f"VPT: ModifiedResNet with attention pool {type(tower.attnpool).__name__} is not "
                             "supported (expected open_clip's AttentionPool2d)")
        return "open_clip-rn"
    raise ValueError(f"VPT: unsupported image tower {type(tower).__module__}.{type(tower).__qualname__} "
                     "(supported: open_clip VisionTransformer, timm VisionTransformer, open_clip ModifiedResNet)")


def tower_geometry(tower: nn.Module) -> tuple[int, int, int]:
    """(token width D, number of attention blocks, pixels one token covers p²) of a supported tower."""
    kind = tower_kind(tower)
    if kind == "open_clip-vit":
        ph, pw = tower.patch_size
        return int(tower.class_embedding.shape[0]), len(tower.transformer.resblocks), int(ph) * int(pw)
    if kind == "timm-vit":
        ph, pw = tower.patch_embed.patch_size
        return int(tower.embed_dim), len(tower.blocks), int(ph) * int(pw)
    pos = tower.attnpool.positional_embedding
    side = round((pos.shape[0] - 1) ** 0.5)
    cell = tower.image_size // side if isinstance(tower.image_size, int) else tower.image_size[0] // side
    return int(pos.shape[1]), 1, int(cell) ** 2


def init_prompts(tower: nn.Module, tokens: int, deep: bool, generator: torch.Generator) -> torch.Tensor:
    """Prompts (sets, tokens, D) drawn uniform(−v, v), v = sqrt(6 / (3·p² + D)) (the reference's
    xavier-uniform); one set (shallow) or one per block (deep), on the CPU in float32."""
    if tokens < 1:
        raise ValueError(f"VPT: tokens must be >= 1, got {tokens}")
    width, blocks, area = tower_geometry(tower)
    sets = blocks if deep else 1
    bound = (6.0 / (3 * area + width)) ** 0.5
    return (torch.rand(sets, tokens, width, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def is_prompted_state(state: Mapping[str, Any]) -> bool:
    """Whether `state` is a `PromptedTower`'s (a `prompts` entry, every other key under `tower.`)."""
    return "prompts" in state and all(k == "prompts" or k.startswith(PREFIX) for k in state)


class PromptedTower(nn.Module):
    """A frozen image tower whose forward inserts VPT prompts (see the module docstring).

    `prompts` has shape (sets, tokens, D): sets = 1 is shallow VPT, sets = number of blocks deep VPT.
    The tower stays in eval mode whatever `train()` says. Prompt dropout (rate `dropout`, the
    reference's `Dropout` on the prompt embeddings, per sample) draws its masks from the generator
    set by `reseed`, never from the global random state.
    """

    def __init__(self, tower: nn.Module, prompts: torch.Tensor, dropout: float = 0.0) -> None:
        super().__init__()
        self.kind = tower_kind(tower)
        width, blocks, _ = tower_geometry(tower)
        shape = tuple(prompts.shape)
        if len(shape) != 3 or shape[0] not in (1, blocks) or shape[1] < 1 or shape[2] != width:
            raise ValueError(f"VPT: prompts for this {type(tower).__name__} must have shape "
                             f"(1 or {blocks}, tokens >= 1, {width}), got {shape}")
        if not 0 <= dropout < 1:
            raise ValueError(f"VPT: dropout must be in [0, 1), got {dropout}")
        device = next(tower.parameters()).device
        self.tower = tower
        self.prompts = nn.Parameter(prompts.detach().to(device).clone())
        self.dropout = float(dropout)
        self.prefix = 1 if self.kind == "open_clip-vit" else int(getattr(tower, "num_prefix_tokens", 1))
        self._generator: torch.Generator | None = None
        self.train(tower.training)

    @property
    def tokens(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def deep(self) -> bool:
        return self.prompts.shape[0] > 1

    @classmethod
    def from_state_dict(cls, tower: nn.Module, state: Mapping[str, torch.Tensor],
                        dropout: float = 0.0) -> PromptedTower:
        """Rebuild from a saved state dict around `tower` (a fresh tower of the same architecture,
        whose weights are replaced in place, strictly). Wrong keys: ValueError listing them."""
        expected = {"prompts"} | {PREFIX + k for k in tower.state_dict()}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"VPT: state dict does not fit a prompted {type(tower).__name__}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        module = cls(tower, state["prompts"], dropout)
        tower.load_state_dict({k[len(PREFIX):]: v for k, v in state.items() if k != "prompts"}, strict=True)
        return module

    def train(self, mode: bool = True) -> PromptedTower:
        self.training = mode
        self.tower.train(False)  # frozen backbone: the reference keeps it in eval mode while training
        return self

    def reseed(self, seed: int) -> None:
        """The generator prompt dropout draws from, on the prompts' device (the method reseeds it
        every step, so the masks are a function of (run seed, step) and resume exactly)."""
        self._generator = torch.Generator(device=self.prompts.device).manual_seed(int(seed))

    # ------------------------------------------------------------------------------ forward
    def _prompt(self, index: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
        p = self.prompts[index].to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if self.training and self.dropout > 0:
            if self._generator is None:
                raise RuntimeError("VPT: prompt dropout in training mode needs a generator: call reseed(seed) first")
            keep = torch.rand(p.shape, generator=self._generator, device=self._generator.device) >= self.dropout
            p = p * keep.to(p.device, p.dtype) / (1 - self.dropout)
        return p

    def _insert(self, x: torch.Tensor, index: int, replace: bool) -> torch.Tensor:
        """[prefix, prompts of set `index`, patches]; `replace` drops the previous block's prompt outputs."""
        n = self.prefix
        rest = x[:, n + self.tokens:] if replace else x[:, n:]
        return torch.cat([x[:, :n], self._prompt(index, x.shape[0], x.dtype), rest], dim=1)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.prefix], x[:, self.prefix + self.tokens:]], dim=1)

    def _blocks(self, x: torch.Tensor, blocks: nn.Module, batch_first: bool, grad_checkpointing: bool) -> torch.Tensor:
        """Run the blocks on batch-first tokens with prompts inserted (and replaced, deep) before each."""
        for i, block in enumerate(blocks):
            if i < self.prompts.shape[0]:  # set 0 always; deep: a fresh set for every block
                x = self._insert(x, i, replace=i > 0)
            if not batch_first:
                x = x.transpose(0, 1)
            x = checkpoint(block, x, use_reentrant=False) if grad_checkpointing else block(x)
            if not batch_first:
                x = x.transpose(0, 1)
        return self._drop(x)

    def forward(self, images: torch.Tensor) -> Any:
        t = self.tower
        if self.kind == "open_clip-vit":
            x = t._embeds(images)  # conv1, class token, positional embedding, patch dropout, ln_pre
            x = self._blocks(x, t.transformer.resblocks, t.transformer.batch_first, t.transformer.grad_checkpointing)
            pooled, tokens = t._pool(x)
            if t.proj is not None:
                pooled = pooled @ t.proj
            return (pooled, tokens) if t.output_tokens else pooled
        if self.kind == "timm-vit":
            x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(images))))
            x = self._blocks(x, t.blocks, True, t.grad_checkpointing)
            return t.forward_head(t.norm(x))
        return self._resnet(images)

    def _resnet(self, images: torch.Tensor) -> torch.Tensor:
        """open_clip's ModifiedResNet forward with the prompts as extra keys/values of the attention pool."""
        t, pool = self.tower, self.tower.attnpool
        x = t.layer4(t.layer3(t.layer2(t.layer1(t.stem(images)))))
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + pool.positional_embedding[:, None, :].to(x.dtype)
        kv = torch.cat([x, self._prompt(0, x.shape[1], x.dtype).transpose(0, 1)], dim=0)  # (HW+1+T)NC
        # only the first query's output is kept (as open_clip's `x[0]`), so only it is computed
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=kv, value=kv, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return out[0]


class _VPT(FineTuneMethod):
    """Shared by shallow and deep VPT: wrap the tuned tower in a `PromptedTower`, freeze the tower."""

    deep: ClassVar[bool] = False

    def __init__(self, tokens: int = 5, dropout: float = 0.0) -> None:
        if int(tokens) != tokens or tokens < 1:
            raise ValueError(f"method '{self.name}': tokens must be an integer >= 1, got {tokens}")
        if not 0 <= dropout < 1:
            raise ValueError(f"method '{self.name}': dropout must be in [0, 1), got {dropout}")
        self.tokens, self.dropout = int(tokens), float(dropout)
        self.seed, self.next_step = 0, 0
        self.tower: PromptedTower | None = None

    @property
    def params(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "dropout": self.dropout}

    def setup(self, model: ImageClassifier, run: RunContext) -> None:
        """Replace `model.encoder` by the prompted tower (the loop then trains, evaluates and saves
        that), with prompts drawn from a stream of the run seed; freeze the tower, keep the head."""
        if isinstance(model.encoder, PromptedTower):
            raise ValueError(f"method '{self.name}': the encoder is already a PromptedTower")
        tower = model.encoder
        prompts = init_prompts(tower, self.tokens, self.deep,
                               torch.Generator().manual_seed(derive_seed(run.seed, "vpt", "prompts")))
        for p in tower.parameters():
            p.requires_grad_(False)
        model.encoder = PromptedTower(tower, prompts, self.dropout)
        self.tower, self.seed = model.encoder, run.seed
        self._reseed(0)

    def _reseed(self, step: int) -> None:
        self.next_step = step
        if self.dropout > 0:
            self.tower.reseed(derive_seed(self.seed, "vpt", "dropout", step))

    def on_step_end(self, model: ImageClassifier, step: int) -> None:
        self._reseed(step + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reseed(int(state["next_step"]))


@register
class VPTShallow(_VPT):
    name: ClassVar[str] = "vpt-shallow"
    deep: ClassVar[bool] = False


@register
class VPTDeep(_VPT):
    name: ClassVar[str] = "vpt-deep"
    deep: ClassVar[bool] = True
