"""The compressive autoencoder DeepAugment uses (hendrycks/imagenet-r
`DeepAugment/CAE_Model/cae_32x32x32_zero_pad_bin.py`, after Theis et al. 2017 via alexandru-dinu/cae):
a 32-channel latent at 1/4 resolution, stochastically binarised, then decoded.

Module and parameter names match the reference class, so its `CAE_Weights/model_final.state` loads
with the same keys. The reference's forward also draws one of nine latent distortions from the global
NumPy/`random` state; here the network is plain and exposes the two places DeepAugment touches as
hooks — `latent` (on the tanh code before binarisation) and `code` (on the 0/1 code) — while the
sampling lives in `robustify.augment.deepaugment`. The stochastic binarisation is part of the model
and draws from the generator passed to `forward`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from robustify.augment.edsr import PathLike, load_strict, read_state_dict

Hook = Callable[[torch.Tensor], torch.Tensor]

# the reference's layer numbering (CAE_distort_imagenet.py `weight_keys`): layer l = (weight, bias)
LAYERS = (
    "e_conv_1.1", "e_conv_2.1", "e_block_1.1", "e_block_1.4", "e_block_2.1", "e_block_2.4", "e_block_3.1",
    "e_block_3.4", "e_conv_3.0", "d_up_conv_1.0", "d_up_conv_1.3", "d_block_1.1", "d_block_1.4",
    "d_block_2.1", "d_block_2.4", "d_block_3.1", "d_block_3.4", "d_up_conv_2.0", "d_up_conv_2.3",
    "d_up_conv_3.0", "d_up_conv_3.3",
)


def _res_block(c: int) -> nn.Sequential:
    return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(c, c, 3), nn.LeakyReLU(),
                         nn.ZeroPad2d(1), nn.Conv2d(c, c, 3))


def _up(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, mid, 3), nn.LeakyReLU(), nn.ZeroPad2d(1),
                         nn.ConvTranspose2d(mid, cout, 2, stride=2))


class CAE(nn.Module):
    """Encoder 3→64→128 (two stride-2 5×5 convs), three residual blocks, 5×5 conv to a tanh 32-channel
    code; decoder mirrors it with transposed convs. Input RGB in [0, 1] with H, W divisible by 4;
    output (tanh) at the input size — the reference clamps it to [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.e_conv_1 = nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(3, 64, 5, stride=2), nn.LeakyReLU())
        self.e_conv_2 = nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(64, 128, 5, stride=2), nn.LeakyReLU())
        self.e_block_1, self.e_block_2, self.e_block_3 = _res_block(128), _res_block(128), _res_block(128)
        self.e_conv_3 = nn.Sequential(nn.Conv2d(128, 32, 5, padding=2), nn.Tanh())
        self.d_up_conv_1 = _up(32, 64, 128)
        self.d_block_1, self.d_block_2, self.d_block_3 = _res_block(128), _res_block(128), _res_block(128)
        self.d_up_conv_2 = _up(128, 32, 256)
        self.d_up_conv_3 = nn.Sequential(nn.Conv2d(256, 16, 3), nn.LeakyReLU(), nn.ReflectionPad2d(2),
                                         nn.Conv2d(16, 3, 3), nn.Tanh())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The continuous code in [−1, 1] (before binarisation)."""
        x = self.e_conv_2(self.e_conv_1(x))
        x = self.e_block_1(x) + x
        x = self.e_block_2(x) + x
        x = self.e_block_3(x) + x
        return self.e_conv_3(x)

    @staticmethod
    def binarize(latent: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Stochastic binarisation: bit 1 with probability (1 + latent)/2. Written with the
        reference's arithmetic, 0.5·(latent + ε + 1), so the float result is the same."""
        rand = torch.rand(latent.shape, generator=gen, device=gen.device).to(latent.device)
        eps = torch.where(rand <= (1 + latent) / 2, 1 - latent, -latent - 1)
        return 0.5 * (latent + eps + 1)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        y = self.d_up_conv_1(code * 2.0 - 1)
        y = self.d_block_1(y) + y
        y = self.d_block_2(y) + y
        y = self.d_block_3(y) + y
        return self.d_up_conv_3(self.d_up_conv_2(y))

    def forward(self, x: torch.Tensor, gen: torch.Generator, latent: Hook | None = None,
                code: Hook | None = None) -> torch.Tensor:
        z = self.encode(x)
        if latent is not None:
            z = latent(z)
        bits = self.binarize(z, gen)
        if code is not None:
            bits = code(bits)
        return self.decode(bits)


def load_cae(path: PathLike) -> CAE:
    """The CAE from a state dict (the reference's `CAE_Weights/model_final.state`), eval mode, CPU."""
    return load_strict(CAE(), read_state_dict(path, "CAE"), path, "CAE")
