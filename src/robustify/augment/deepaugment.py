"""DeepAugment (Hendrycks et al. 2021; hendrycks/imagenet-r `DeepAugment/`): images are passed through
an image-to-image network whose weights and activations are randomly perturbed (SPEC §3).

Three kinds: `edsr` (super-resolution net, `EDSR_distort_imagenet.py`), `cae` (compressive
autoencoder, `CAE_distort_imagenet.py`) — both need their pretrained weights, loaded from a path — and
the weight-free `noise2net` (`train_noise2net.py`), the default when no weights are given [choice].

**On the fly, per batch.** The reference distorts ImageNet offline, one image at a time (a fresh
activation distortion per image, the weight distortion re-drawn with probability 0.05 per image, i.e.
kept for ~20 images) and trains on the saved files. Here one perturbed network — weight and activation
distortions drawn together — is drawn per call, i.e. per batch, and applied to every image in it. The
unperturbed network is never modified: perturbed weights are new tensors handed to
`torch.func.functional_call`, activation distortions are callables passed to the network's forward.

The distortion menus, their probabilities and magnitudes are the reference's. Where its code does not
do what it seems to intend, we reproduce what it *computed* (those are the images the method was
trained on) and say so at the spot. Every draw comes from the caller's `torch.Generator` (see `Draws`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from robustify.augment.cae import CAE, LAYERS, load_cae
from robustify.augment.edsr import EDSR, PathLike, load_edsr
from robustify.augment.noise2net import noise2net

KINDS = ("noise2net", "edsr", "cae")
Weights = dict[str, torch.Tensor]


class Draws:
    """The random source of one distortion. Discrete choices (options, layers, channels) come from the
    caller's generator; tensor noise (activation masks, weight noise) from a generator on the working
    device seeded by one draw of the caller's, so activation-sized noise is made where it is used
    instead of on the host and copied. Same caller seed → same distortion, on a given device."""

    def __init__(self, gen: torch.Generator, device: torch.device | str) -> None:
        self.gen = gen
        self.device = torch.device(device)
        self.noise = torch.Generator(device=self.device).manual_seed(self.seed())

    def seed(self) -> int:
        return int(torch.randint(0, 2 ** 62, (1,), generator=self.gen, device=self.gen.device))

    def below(self, n: int) -> int:
        """Uniform on {0, …, n−1} (np.random.randint(n), np.random.choice(range(n)))."""
        return int(torch.randint(n, (1,), generator=self.gen, device=self.gen.device))

    def randint(self, lo: int, hi: int) -> int:
        """Uniform on {lo, …, hi}, both ends included (Python's random.randint)."""
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.gen, device=self.gen.device))

    def rand(self, shape: Sequence[int]) -> torch.Tensor:
        """U[0, 1) float32 noise on the working device (torch.rand_like in the reference)."""
        return torch.rand(tuple(shape), generator=self.noise, device=self.noise.device)

    def dirichlet(self, alpha: Sequence[float], size: tuple[int, ...]) -> torch.Tensor:
        """NumPy's Dirichlet (as the reference), from a NumPy generator seeded by one draw of ours:
        torch has no seeded Dirichlet sampler."""
        rng = np.random.default_rng(self.seed())
        return torch.from_numpy(rng.dirichlet(alpha, size)).float().to(self.device)


@dataclass
class Distortion:
    """One sampled perturbation of a network: replacement weights (new tensors; the network's own are
    untouched), keyword arguments for its forward (activation hooks), and what was drawn."""

    weights: Weights = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _call(net: nn.Module, x: torch.Tensor, distortion: Distortion | None, **kwargs: Any) -> torch.Tensor:
    if distortion is None:
        return net(x, **kwargs)
    return functional_call(net, distortion.weights, (x,), {**kwargs, **distortion.hooks})


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


# ====================================================================================== EDSR
# Weight distortions of `get_weights()`: 3 of these 17 ops (with replacement) per draw, applied in
# turn to the residual blocks' convs. `w` maps names to tensors and is updated out of place; each op
# returns the block indices it touched.
def _k(i: int, j: int, t: str = "weight") -> str:
    return f"body.{i}.body.{j}.{t}"


def _ew_flip_out(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(0, 10, 3))
    for j in (0, 2):
        for t in ("weight", "bias"):
            w[_k(i, j, t)] = w[_k(i, j, t)].flip(0)
    return [i]


def _ew_negate(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(1, 10, 3))
    for t in ("weight", "bias"):
        w[_k(i, 0, t)] = -w[_k(i, 0, t)]
    return [i]


def _ew_zero(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(0, 10, 3))
    for t in ("weight", "bias"):
        w[_k(i, 0, t)] = 0 * w[_k(i, 0, t)]
    return [i]


def _ew_neg_gelu(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(0, 10, 3))
    for j in (0, 2):
        w[_k(i, j)] = -F.gelu(w[_k(i, j)])
    return [i]


LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
SHARPEN = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))


def _ew_kernel(kernel: tuple[tuple[float, ...], ...]) -> Callable[[Weights, Draws, int], list[int]]:
    def op(w: Weights, d: Draws, f: int) -> list[int]:
        i = d.choice(range(0, 10, 3))
        w[_k(i, 0)] = w[_k(i, 0)] * torch.tensor(kernel, device=w[_k(i, 0)].device).view(1, 1, 3, 3)
        return [i]
    return op


def _ew_scale_noise(w: Weights, d: Draws, f: int) -> list[int]:
    # reference: `1 + 2u·(2*torch.rand_like(W - 1))` — the −1 sits inside rand_like, so the factor is
    # 1 + 4u·U[0,1), never below 1; reproduced as computed
    i = d.choice(range(0, 10, 3))
    u = d.uniform()
    w[_k(i, 2)] = w[_k(i, 2)] * (1 + 2 * u * (2 * d.rand(w[_k(i, 2)].shape)))
    return [i]


def _ew_flip_negate(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(0, 10, 3))
    w[_k(i, 0)] = w[_k(i, 0)].flip(-1)
    w[_k(i, 2)] = -1 * w[_k(i, 2)]
    return [i]


def _ew_shift_conv(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(1, 13, 4))
    z = torch.zeros_like(w[_k(i, 0)])
    for j in range(z.shape[0]):
        sx, sy = d.below(3), d.below(3)
        z[:, j, sx, sy] = d.choice((1.0, -1.0))
    w[_k(i, 0)] = F.conv2d(w[_k(i, 0)], z, padding=1)
    return [i]


def _ew_noise_conv(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(0, 10, 3))
    r = d.rand(w[_k(i, 0)].shape)
    z = (2 * r * d.uniform() - 1) / 6.0
    w[_k(i, 0)] = F.conv2d(w[_k(i, 0)], z, padding=1)
    return [i]


def _ew_dirichlet_conv(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.choice(range(1, 12, 4))
    z = d.dirichlet([0.1] * 9, (f, f)).view(f, f, 3, 3)
    w[_k(i, 2)] = F.conv2d(w[_k(i, 2)], z, padding=1)
    return [i]


def _ew_uniform_noise(w: Weights, d: Draws, f: int) -> list[int]:
    i = d.below(15)
    w[_k(i, 2)] = w[_k(i, 2)] + (d.rand(w[_k(i, 2)].shape) - 0.5) * 1.0
    return [i]


def _ew_rot90(w: Weights, d: Draws, f: int) -> list[int]:
    touched = []
    for _ in range(5):
        i, j = d.below(15), d.choice((0, 2))
        k = d.randint(1, 3)
        dims = (2, 3) if d.randint(0, 1) == 0 else (0, 1)
        w[_k(i, j)] = torch.rot90(w[_k(i, j)], k=k, dims=dims)
        touched.append(i)
    return touched


def _ew_mask(signed: bool) -> Callable[[Weights, Draws, int], list[int]]:
    def op(w: Weights, d: Draws, f: int) -> list[int]:
        touched = [d.below(15) for _ in range(5)]
        for i in touched:
            mask = torch.round(d.rand(w[_k(i, 0)].shape))
            w[_k(i, 0)] = w[_k(i, 0)] * (mask * 2 - 1 if signed else mask)
        return touched
    return op


def _ew_negate_filters(w: Weights, d: Draws, f: int) -> list[int]:
    # `W[idx] *= -1` with repeated indices negates each chosen filter once
    touched = [d.below(15) for _ in range(5)]
    for i in touched:
        sign = torch.ones(f, device=w[_k(i, 0)].device)
        sign[[d.below(f) for _ in range(f // 2)]] = -1
        w[_k(i, 0)] = w[_k(i, 0)] * sign.view(-1, 1, 1, 1)
    return touched


def _ew_keep_max(w: Weights, d: Draws, f: int) -> list[int]:
    touched = []
    for _ in range(5):
        i, j = d.below(15), d.choice((0, 2))
        flat = w[_k(i, j)].reshape(f, f, 9)
        top = torch.topk(flat, k=1)
        w[_k(i, j)] = torch.zeros_like(flat).scatter(2, top.indices, top.values).reshape(f, f, 3, 3)
        touched.append(i)
    return touched


EDSR_WEIGHT_OPS: tuple[Callable[[Weights, Draws, int], list[int]], ...] = (
    _ew_flip_out, _ew_negate, _ew_zero, _ew_neg_gelu, _ew_kernel(LAPLACIAN), _ew_kernel(SHARPEN),
    _ew_scale_noise, _ew_flip_negate, _ew_shift_conv, _ew_noise_conv, _ew_dirichlet_conv,
    _ew_uniform_noise, _ew_rot90, _ew_mask(signed=True), _ew_mask(signed=False), _ew_negate_filters,
    _ew_keep_max,
)
EDSR_PRE = (1, 2, 3, 4)  # 4 = none
EDSR_BODY = (1, 2, 3, 4, 5)  # 5 = none


def _edsr_pre(op: int, d: Draws, f: int, info: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Distortions of the head's features (`pre_distortions`)."""
    if op == 1:
        # reference: `x[:, c1], x[:, c2] = x[:, c2], x[:, c1]` — the right side is a pair of views, so
        # channel c1 receives c2 and c2 keeps its own: five channel copies, not swaps; reproduced
        pairs = [(d.below(f), d.below(f)) for _ in range(5)]
        src = list(range(f))
        for c1, c2 in pairs:
            src[c1] = src[c2]
        info["copies"] = pairs
        return lambda x: x[:, src]
    if op == 2:
        return lambda x: x * torch.round(d.rand(x.shape) + 0.45)  # round(U + 0.45): keep w.p. 0.95
    if op == 3:
        return lambda x: x * (torch.round(d.rand(x.shape) + 0.475) * 2 - 1)  # +1 w.p. 0.975, else −1
    return None


def _edsr_body(op: int, d: Draws, info: dict[str, Any]) -> Callable[[nn.Sequential, torch.Tensor], torch.Tensor] | None:
    """Distortions of the body pass (`body_distortions`), between its first five blocks and the rest."""
    if op == 1:
        return lambda body, x: body[5:](-body[:5](x))
    if op == 2:
        act = F.relu if d.randint(0, 2) == 1 else F.gelu
        info["act"] = act.__name__
        return lambda body, x: body[5:](act(body[:5](x)))
    if op == 3:
        axes = [1, 2] if d.randint(0, 2) == 1 else [1, 3]
        info["flip"] = axes
        return lambda body, x: body[5:](torch.flip(body[:5](x), axes))
    if op == 4:
        # reference: `for i in range(len(body)): if i not in to_skip: res = body[i](x)` feeds x, not
        # res, to every layer, so only the last layer not skipped counts; reproduced as computed
        skip = {d.randint(2, 16) for _ in range(3)}
        info["skip"] = sorted(skip)

        def last_kept(body: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
            return body[max(i for i in range(len(body)) if i not in skip)](x)
        return last_kept
    return None


@torch.no_grad()
def sample_edsr(net: EDSR, gen: torch.Generator, weight_ops: Sequence[int] | None = None,
                pre: int | None = None, body: int | None = None) -> Distortion:
    """One EDSR distortion: 3 weight ops of 17 (`weight_ops` forces them), a feature distortion
    pre ∈ U{1..4} and a body distortion ∈ U{1..5} (4 and 5 = none), as the reference draws them."""
    if net.n_resblocks < 16:
        raise ValueError(f"EDSR distortions address residual blocks 0-15 as the reference does; "
                         f"the network has {net.n_resblocks} blocks")
    d = Draws(gen, _device(net))
    ops = [d.below(len(EDSR_WEIGHT_OPS)) for _ in range(3)] if weight_ops is None else list(weight_ops)
    pre = d.randint(1, 4) if pre is None else pre
    body = d.randint(1, 5) if body is None else body
    if any(not 0 <= o < len(EDSR_WEIGHT_OPS) for o in ops) or pre not in EDSR_PRE or body not in EDSR_BODY:
        raise ValueError(f"EDSR distortion out of range: weight ops {ops} (0-16), pre {pre} (1-4), body {body} (1-5)")
    params = dict(net.named_parameters())
    w = dict(params)
    info: dict[str, Any] = {"weight_ops": ops, "pre": pre, "body": body}
    info["blocks"] = [EDSR_WEIGHT_OPS[o](w, d, net.n_feats) for o in ops]
    hooks = {"pre": _edsr_pre(pre, d, net.n_feats, info), "body": _edsr_body(body, d, info)}
    return Distortion({k: v for k, v in w.items() if v is not params[k]}, hooks, info)


@torch.no_grad()
def run_edsr(net: EDSR, images: torch.Tensor, distortion: Distortion | None = None) -> torch.Tensor:
    """EDSR (optionally distorted) on [0, 1] images, keeping their size.

    The reference super-resolves 128-px images ×4 to 512 px offline and crops 224 from those; on the
    fly we downscale the batch by the net's scale (bilinear, antialiased, as PIL's Resize that made
    the reference's inputs) and super-resolve back, resizing only if the size is not a multiple of it."""
    h, w = images.shape[-2:]
    x = images.float()
    if net.scale != 1:
        size = (max(1, round(h / net.scale)), max(1, round(w / net.scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    out = _call(net, x * net.rgb_range, distortion)
    if out.shape[-2:] != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return (out.clamp(0, net.rgb_range) / net.rgb_range).to(images.dtype)


# ======================================================================================= CAE
# Weight distortions of the CAE's `get_weights()`: one of ops 0-7 (the reference lists an op 8 that
# `random.sample(range(8), 1)` never draws) on a layer of the reference's numbering (cae.LAYERS).
CAE_OP_LAYERS = {0: range(11, 16), 1: range(8, 14), 2: range(8, 14), 3: range(10, 14), 4: range(8, 14),
                 5: range(8, 14), 6: range(8, 14), 7: range(8, 14)}


def _cw(layer: int, t: str = "weight") -> str:
    return f"{LAYERS[layer]}.{t}"


def _cae_weights(op: int, w: Weights, d: Draws) -> list[int]:
    i = d.choice(CAE_OP_LAYERS[op])
    wi, bi = _cw(i), _cw(i, "bias")
    if op == 0:
        # reference flips W_i, b_i, W_j and "b_j" — but its b_j is `get_name(j, "weight")`, so W_j is
        # flipped twice (unchanged, or W_i flipped back and again when i == j): only layer i changes
        w[wi], w[bi] = w[wi].flip(0), w[bi].flip(0)
    elif op in (1, 2, 3):
        rows = [d.below(w[wi].shape[0]) for _ in range(12 if op == 1 else 25)]
        weight, bias = w[wi].clone(), w[bi].clone()
        for k in rows:  # in turn, as the reference: a row drawn twice is negated back / transformed twice
            if op == 1:
                weight[k], bias[k] = -weight[k], -bias[k]
            elif op == 2:
                weight[k], bias[k] = 0 * weight[k], 0 * bias[k]
            else:
                weight[k], bias[k] = -F.gelu(weight[k]), -F.gelu(bias[k])
        w[wi], w[bi] = weight, bias
    elif op == 4:
        # reference: `1 + 2u·(4*torch.rand_like(W - 1))` = 1 + 8u·U[0,1) (the −1 inside rand_like);
        # applied to layers i and j, each with its own u
        j = d.choice(CAE_OP_LAYERS[op])
        for layer in (i, j):
            u = d.uniform()
            w[_cw(layer)] = w[_cw(layer)] * (1 + 2 * u * (4 * d.rand(w[_cw(layer)].shape)))
        return [i, j]
    elif op == 5:
        signed = d.uniform() >= 0.5
        mask = torch.round(d.rand(w[wi].shape))
        w[wi] = w[wi] * (mask * 2 - 1 if signed else mask)
    elif op == 6:
        w[wi] = torch.rot90(w[wi], k=d.randint(1, 3), dims=(2, 3))
    elif op == 7:
        out = w[wi].shape[0]
        rows = sorted({d.below(out) for _ in range(out // 5)})
        sign = torch.ones(out, device=w[wi].device)
        sign[rows] = -1
        w[wi] = w[wi] * sign.view(-1, *([1] * (w[wi].ndim - 1)))
    return [i]


def _identity_kernel(c: int, device: torch.device) -> torch.Tensor:
    z = torch.zeros(c, c, 3, 3, device=device)
    z[range(c), range(c), 1, 1] = 1
    return z


def _flip_dims(d: Draws) -> list[int]:
    """Latent dims to flip. The reference flips `ec3[:, c]` — (batch, H, W) — over two of its three
    dims, a uniformly drawn pair; with its batch of one the batch flip is a no-op, so per image this is
    a flip over H, W or both. We keep that spatial part: flipping the batch axis here would trade codes
    between images, which the reference never does."""
    left_out = d.below(3)
    return [k + 1 for k in (1, 2) if k != left_out]  # (batch, H, W) dims 1, 2 → latent dims 2, 3


def _cae_latent(op: int, d: Draws, c: int, info: dict[str, Any]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Activation distortion of the forward (`option = np.random.choice(range(9))`)."""
    if op == 0:
        # reference: encoded · (3 + 2u·(2*torch.rand_like(encoded − 1))) = (3 + 4u·U[0,1)), as computed
        u = d.uniform()
        return {"code": lambda e: e * (3 + 2 * u * (2 * d.rand(e.shape)))}
    if op == 1:
        return {"latent": lambda z: z * (d.rand(z.shape[-2:]) > 0.2).float()}
    if op == 2:
        return {"latent": lambda z: z * ((d.rand(z.shape[-2:]) > 0.1).float() * 2 - 1)}
    if op == 3:
        perm = torch.randperm(10, generator=d.gen, device=d.gen.device).tolist() + list(range(10, c))
        info["perm"] = perm
        return {"latent": lambda z: z[:, perm]}
    if op in (4, 5):
        dims = _flip_dims(d)
        info["flip"] = dims
        if op == 5:
            # every channel over the same dims (the reference swaps the two dims half-way through the
            # channels, which does not change a flip)
            return {"latent": lambda z: z.flip(dims)}
        chans = [d.below(c) for _ in range(5)]
        info["channels"] = chans

        def flip_some(z: torch.Tensor) -> torch.Tensor:
            z = z.clone()
            for ch in chans:  # in turn: a channel drawn twice is flipped back
                z[:, ch] = z[:, ch].flip([k - 1 for k in dims])
            return z
        return {"latent": flip_some}
    # ops 6-8: a c→c 3×3 convolution of the code, near the identity
    kernel = _identity_kernel(c, d.device)
    if op == 6:
        kernel = kernel + (d.rand(kernel.shape) - 0.5) * 0.2
    elif op == 7:
        for j in range(c):
            if d.uniform() < 0.5:  # an extra tap on a random channel and offset (−1 indexes as 2)
                kernel[j, d.randint(0, c - 1), d.randint(-1, 1), d.randint(-1, 1)] = 1
    else:  # each channel shifted by an offset that is re-drawn with probability 0.2 per channel
        kernel = torch.zeros_like(kernel)
        sx, sy = d.below(3), d.below(3)
        for j in range(c):
            if d.uniform() < 0.2:
                sx, sy = d.below(3), d.below(3)
            kernel[j, j, sx, sy] = 1
    info["kernel"] = kernel
    return {"latent": lambda z: F.conv2d(z, kernel, padding=1)}


@torch.no_grad()
def sample_cae(net: CAE, gen: torch.Generator, weight_op: int | None = None, latent_op: int | None = None) -> Distortion:
    """One CAE distortion: a weight op ∈ U{0..7} on a layer of its range and a latent op ∈ U{0..8}."""
    d = Draws(gen, _device(net))
    weight_op = d.below(len(CAE_OP_LAYERS)) if weight_op is None else weight_op
    latent_op = d.below(9) if latent_op is None else latent_op
    if weight_op not in CAE_OP_LAYERS or not 0 <= latent_op <= 8:
        raise ValueError(f"CAE distortion out of range: weight op {weight_op} (0-7), latent op {latent_op} (0-8)")
    params = dict(net.named_parameters())
    w = dict(params)
    info: dict[str, Any] = {"weight_op": weight_op, "latent_op": latent_op}
    info["layers"] = _cae_weights(weight_op, w, d)
    # the binarisation gets a stream of its own, so what the latent hooks draw does not shift it (and
    # the undistorted network can be run on the same bits)
    bits = torch.Generator(device=d.device).manual_seed(d.seed())
    hooks: dict[str, Any] = {"gen": bits, **_cae_latent(latent_op, d, net.e_conv_3[0].out_channels, info)}
    return Distortion({k: v for k, v in w.items() if v is not params[k]}, hooks, info)


@torch.no_grad()
def run_cae(net: CAE, images: torch.Tensor, gen: torch.Generator | None,
            distortion: Distortion | None = None) -> torch.Tensor:
    """The CAE (optionally distorted) on [0, 1] images, output clamped to [0, 1] as in the reference.
    `gen` drives the binarisation of an undistorted pass (a distortion brings its own). Sizes that are
    not multiples of 4 are edge-padded and cropped back (the reference works at 512 px)."""
    if gen is None and distortion is None:
        raise ValueError("run_cae: the undistorted CAE needs a generator for its stochastic binarisation")
    h, w = images.shape[-2:]
    x = F.pad(images.float(), (0, -w % 4, 0, -h % 4), mode="replicate")
    out = _call(net, x, distortion, gen=gen)[..., :h, :w]
    return out.clamp(0, 1).to(images.dtype)


# ===================================================================================== batch API
class DeepAugment:
    """A DeepAugment transform for batches: `DeepAugment(kind, weights)(images, gen)`.

    `kind` is `noise2net` (no weights; the default), `edsr` or `cae` (weights required: EDSR-PyTorch's
    `edsr_baseline_x4-6b446fab.pt`, the reference's `CAE_Weights/model_final.state`, or safetensors
    with the same keys). Each call draws one freshly perturbed network and applies it to the whole
    batch under `torch.no_grad()`; images are float (B, 3, H, W) in [0, 1] and come back the same."""

    def __init__(self, kind: str = "noise2net", weights: PathLike | None = None, max_eps: float = 0.75,
                 res_scale: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"deepaugment kind must be one of {KINDS}, got '{kind}'")
        if kind == "noise2net" and weights is not None:
            raise ValueError(f"deepaugment kind 'noise2net' uses random networks and takes no weights (got {weights})")
        if kind != "noise2net" and weights is None:
            raise ValueError(f"deepaugment kind '{kind}' needs pretrained {kind.upper()} weights: pass weights=<path>; "
                             "without weights use kind='noise2net'")
        if max_eps < 0:
            raise ValueError(f"deepaugment max_eps must be >= 0, got {max_eps}")
        self.kind, self.weights, self.max_eps = kind, weights, float(max_eps)
        self.net: nn.Module | None = None
        if kind == "edsr":
            self.net = load_edsr(weights, res_scale=res_scale)
        elif kind == "cae":
            self.net = load_cae(weights)

    @property
    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "weights": None if self.weights is None else str(self.weights),
                "max_eps": self.max_eps}

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"deepaugment: expected float images (B, 3, H, W), got {tuple(images.shape)} {images.dtype}")
        with torch.no_grad():
            if self.kind == "noise2net":
                return noise2net(images, gen, self.max_eps)
            if _device(self.net) != images.device:
                self.net.to(images.device)  # moves, never changes, the weights
            if self.kind == "edsr":
                return run_edsr(self.net, images, sample_edsr(self.net, gen))
            return run_cae(self.net, images, gen, sample_cae(self.net, gen))
