"""EDSR super-resolution network (Lim et al. 2017) as DeepAugment uses it (hendrycks/imagenet-r
`DeepAugment/EDSR_distort_imagenet.py`, `EDSR_Model/common.py`), plus strict checkpoint loading.

Module and parameter names follow EDSR-PyTorch exactly (`sub_mean`, `head.0`, `body.<i>.body.<0|2>`,
`body.<n_resblocks>`, `tail.0.<2k>`, `tail.1`, `add_mean`), so the release checkpoint
`edsr_baseline_x4-6b446fab.pt` (16 blocks, 64 features, ×4) loads as the reference loads it. `forward`
takes two optional hooks, `pre` (on the head's features) and `body` (replacing the body pass), which is
where DeepAugment perturbs activations (`robustify.augment.deepaugment`); without hooks it is plain EDSR.

The checkpoint helpers at the bottom are shared with `cae.py`.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

PathLike = str | os.PathLike
RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean used by EDSR-PyTorch's MeanShift
M = TypeVar("M", bound=nn.Module)


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class MeanShift(nn.Conv2d):
    """Adds (sign=+1) or subtracts (sign=−1) the RGB mean scaled to `rgb_range`; a frozen 1×1 conv
    because that is how EDSR-PyTorch stores it (its weights are checkpoint keys)."""

    def __init__(self, rgb_range: float, sign: int = -1, rgb_mean: tuple[float, ...] = RGB_MEAN) -> None:
        super().__init__(3, 3, kernel_size=1)
        with torch.no_grad():
            self.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean))
        for p in self.parameters():
            p.requires_grad = False


class ResBlock(nn.Module):
    """conv → ReLU → conv, scaled by `res_scale`, plus the input."""

    def __init__(self, n_feats: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(n_feats, n_feats), nn.ReLU(True), conv3x3(n_feats, n_feats))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul(self.res_scale) + x


class Upsampler(nn.Sequential):
    """Sub-pixel upsampling: log2(scale) × (conv to 4F, PixelShuffle(2)), or one ×3 stage."""

    def __init__(self, scale: int, n_feats: int) -> None:
        layers: list[nn.Module] = []
        if scale >= 1 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [conv3x3(n_feats, 4 * n_feats), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [conv3x3(n_feats, 9 * n_feats), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"EDSR: scale must be a power of 2 or 3, got {scale}")
        super().__init__(*layers)


class EDSR(nn.Module):
    """EDSR; the defaults are the 'baseline' model (r16f64) DeepAugment uses, at ×4. Input and output
    are RGB in [0, rgb_range] (255 in the reference)."""

    def __init__(self, n_resblocks: int = 16, n_feats: int = 64, scale: int = 4, res_scale: float = 1.0,
                 rgb_range: float = 255.0, n_colors: int = 3) -> None:
        super().__init__()
        self.n_resblocks, self.n_feats, self.scale, self.rgb_range = n_resblocks, n_feats, scale, rgb_range
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.head = nn.Sequential(conv3x3(n_colors, n_feats))
        self.body = nn.Sequential(*[ResBlock(n_feats, res_scale) for _ in range(n_resblocks)],
                                  conv3x3(n_feats, n_feats))
        self.tail = nn.Sequential(Upsampler(scale, n_feats), conv3x3(n_feats, n_colors))

    def forward(self, x: torch.Tensor, pre: Callable[[torch.Tensor], torch.Tensor] | None = None,
                body: Callable[[nn.Sequential, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        x = self.head(self.sub_mean(x))
        if pre is not None:
            x = pre(x)
        res = self.body(x) if body is None else body(self.body, x)
        return self.add_mean(self.tail(res + x))


# ------------------------------------------------------------------------------ checkpoints
def read_state_dict(path: PathLike, what: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a `.safetensors` file or a `torch.save`d state dict (read with
    `weights_only=True`: a checkpoint never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found: {path}")
    if path.suffix == ".safetensors":
        from robustify.io import load_safetensors

        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable {what} state dict ({err})") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a {what} state dict (name -> tensor), got {type(state).__name__}")
    return dict(state)


def load_strict(model: M, state: Mapping[str, torch.Tensor], path: PathLike, what: str) -> M:
    """Load `state` into `model` requiring the same keys and shapes, naming every difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: not a {what} checkpoint: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{k}: {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path}: {what} checkpoint has tensors of the wrong shape: {wrong}")
    model.load_state_dict(state)
    model.eval()
    return model


def edsr_config(state: Mapping[str, torch.Tensor], path: PathLike = "<state dict>") -> dict[str, int]:
    """n_resblocks, n_feats, scale and n_colors read off the tensors, so any EDSR export loads."""
    if "head.0.weight" not in state:
        raise ValueError(f"{path}: not an EDSR checkpoint: missing key 'head.0.weight' (has {sorted(state)[:8]}...)")
    n_feats, n_colors = state["head.0.weight"].shape[:2]
    blocks = {int(m.group(1)) for k in state if (m := re.fullmatch(r"body\.(\d+)\.body\.0\.weight", k))}
    ups = sorted(k for k in state if re.fullmatch(r"tail\.0\.\d+\.weight", k))
    if not ups:
        raise ValueError(f"{path}: not an EDSR checkpoint: missing key 'tail.0.0.weight'")
    out = state[ups[0]].shape[0]
    if out == 4 * n_feats:
        scale = 2 ** len(ups)
    elif out == 9 * n_feats and len(ups) == 1:
        scale = 3
    else:
        raise ValueError(f"{path}: '{ups[0]}' has {out} output channels; expected 4 or 9 × n_feats={n_feats}")
    return {"n_resblocks": len(blocks), "n_feats": int(n_feats), "scale": scale, "n_colors": int(n_colors)}


def load_edsr(path: PathLike, res_scale: float = 1.0, rgb_range: float = 255.0) -> EDSR:
    """EDSR from a checkpoint (e.g. EDSR-PyTorch's `edsr_baseline_x4-6b446fab.pt`), in eval mode on CPU.

    The architecture is inferred from the tensors; `res_scale` is not stored (1 for the baseline
    models, 0.1 for the r32f256 ones). The mean-shift convs are constants of the architecture, so a
    checkpoint without them (some re-exports drop frozen parameters) gets the model's own."""
    state = read_state_dict(path, "EDSR")
    model = EDSR(res_scale=res_scale, rgb_range=rgb_range, **edsr_config(state, path))
    own = model.state_dict()
    for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
        state.setdefault(key, own[key])
    return load_strict(model, state, path, "EDSR")
