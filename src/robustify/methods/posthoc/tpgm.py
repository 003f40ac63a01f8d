"""TPGM and TPGM-C: learned per-tensor projection of the fine-tuned weights towards θ0 (SPEC §2).

For every projected parameter tensor l, with Δ_l = θ1_l − θ0_l and a learnable scalar radius γ_l:

    θ_l(γ) = θ0_l + clamp(γ_l / (‖Δ_l‖ + 1e-8), 0, 1) · Δ_l

so ‖θ_l − θ0_l‖ ≤ γ_l. Norms (ref PotatoTian/TPGM `utils/tpgm.py`, `norm_mode`):
- "l2": the Frobenius norm of the whole tensor (one ratio per tensor);
- "mars": per-row L1 — the sum of |Δ| over all but the first dimension (an output row / filter); a
  1-D tensor (bias, norm scale) is n rows of one entry each, as the reference's ResNet code writes
  explicitly (its ViT code sums over `dim=()`, which torch reads as *all* dims, i.e. one L1 norm for
  the whole vector — an accident of the idiom we do not copy). One γ per tensor still, so rows with
  a small change are kept whole and large ones are shrunk.

Details taken from the reference: γ_l starts at min(row norms)/2 (for "l2": ‖Δ_l‖/2) — we take the
minimum over rows that changed, since an unchanged row would start γ at 0; after every Adam step γ_l
is clipped to [1e-8, max(row norms)]; the +1e-8 in the denominator; Adam with lr 1e-2 on γ minimising
the cross-entropy of the projected model, whose forward runs in eval mode. The reference's ViT code
drops the clamp to [0, 1] for rows with norm < γ (which extrapolates past θ1); we keep the clamp, as
SPEC and the reference's ResNet code do. Unlike the reference, γ is fitted on held-out *validation*
batches, never the test split.

TPGM-C [SPEC choice] adds `reg · Σ_l r_l`, with r_l the mean over changed rows of the clamped ratio
(= γ_l/‖Δ_l‖ for "l2"): a pull towards θ0 that trades reference accuracy for robustness.

Only floating-point *parameters* with Δ ≠ 0 are projected (zero change has nothing to project and
its ratio would be 0/0). Buffers (BatchNorm running statistics, the head's logit scale) are taken
from θ1, as in the reference, which projects `named_parameters()` of a copy of the fine-tuned model:
running statistics are not weights on a path from θ0 to θ1, and θ1's are the ones estimated on the
fine-tuning distribution. The given module is only a template for `torch.func.functional_call`;
neither it nor the state dicts are modified.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from robustify.methods.posthoc.wise import State, check_same_keys

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
NORMS = ("l2", "mars")
EPS = 1e-8  # reference: ratio = γ / (norm + 1e-8)
MIN_RADIUS = 1e-8  # reference: γ clipped to [1e-8, max norm]


def delta_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """‖Δ‖ as a 0-d tensor ("l2") or per-row L1 norms shaped to broadcast against Δ ("mars")."""
    if norm == "l2":
        return torch.linalg.vector_norm(delta)
    if norm == "mars":
        if delta.dim() >= 2:
            return delta.abs().sum(dim=tuple(range(1, delta.dim())), keepdim=True)
        return delta.abs()
    raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")


def _batch_cycle(batches: Batches, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless pass over `batches`, reshuffled each pass by a seeded generator (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


class _Projection:
    """The projected tensors θ(γ) for the chosen parameters; γ is the only thing that learns."""

    def __init__(self, names: list[str], theta0: State, theta1: State, norm: str, device: torch.device) -> None:
        self.names: list[str] = []
        self.base: list[torch.Tensor] = []
        self.delta: list[torch.Tensor] = []
        self.inv: list[torch.Tensor] = []
        self.changed: list[torch.Tensor] = []  # rows with Δ ≠ 0 (all of it for "l2")
        init: list[float] = []
        hi: list[float] = []
        for name in names:
            t0 = theta0[name].detach().to(device, torch.promote_types(theta0[name].dtype, torch.float32))
            d = theta1[name].detach().to(device, t0.dtype) - t0
            n = delta_norms(d, norm)
            if not bool((n > 0).any()):
                continue  # unchanged tensor: nothing to project
            self.names.append(name)
            self.base.append(t0)
            self.delta.append(d)
            self.inv.append(1.0 / (n + EPS))
            self.changed.append(n > 0)
            init.append(n[n > 0].min().item() / 2)
            hi.append(n.max().item())
        self.lo = torch.full((len(hi),), MIN_RADIUS, device=device)
        self.hi = torch.tensor(hi, device=device)
        self.gamma = torch.tensor(init, device=device).clamp(self.lo, self.hi).requires_grad_(True)

    def ratios(self) -> list[torch.Tensor]:
        """Per tensor: clamp(γ/‖Δ‖, 0, 1), a scalar ("l2") or one value per row ("mars")."""
        return [(self.gamma[i] * inv).clamp(0.0, 1.0) for i, inv in enumerate(self.inv)]

    def mean_ratios(self) -> list[torch.Tensor]:
        """Per tensor: the mean clamped ratio over its changed rows (unchanged rows would count as 1)."""
        return [r[m].mean() for r, m in zip(self.ratios(), self.changed, strict=True)]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: b + r * d for n, b, r, d in zip(self.names, self.base, self.ratios(), self.delta, strict=True)}

    def clip_(self) -> None:
        with torch.no_grad():
            self.gamma.copy_(torch.maximum(torch.minimum(self.gamma, self.hi), self.lo))


def tpgm(
    model: nn.Module,
    theta0: State,
    theta1: State,
    batches: Batches,
    *,
    norm: str = "l2",
    reg: float = 0.0,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit the radii γ on `batches` (validation data) and return (projected state dict, info).

    `model` is a module with the architecture of the states (e.g. an `ImageClassifier`), on the
    device to run on; `exclude` names parameters to keep at θ1 (the reference's `exclude_list`).
    `reg > 0` gives TPGM-C. info: `gamma` and `ratio` (mean clamped γ/‖Δ‖) per projected tensor,
    `mean_ratio`, `last_step_loss` (objective of the last step) and `final_loss` (mean CE over all
    `batches` at the returned weights).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got '{norm}'")
    if not batches:
        raise ValueError("TPGM needs at least one validation batch")
    if steps < 0 or reg < 0:
        raise ValueError(f"steps and reg must be non-negative, got steps={steps}, reg={reg}")
    check_same_keys([theta0, theta1], ["theta0", "theta1"])
    primary = dict(model.named_parameters())
    all_params = dict(model.named_parameters(remove_duplicate=False))
    aliases = {a: next(n for n, p in primary.items() if p is q) for a, q in all_params.items() if a not in primary}
    missing = sorted(n for n in primary if n not in theta1)
    if missing:
        raise ValueError(f"the state dicts lack parameters of the model: {missing[:10]}")
    unknown = sorted(set(exclude) - primary.keys())
    if unknown:
        raise ValueError(f"exclude names no parameter of the model: {unknown[:10]}")
    device = next(iter(primary.values())).device if primary else torch.device("cpu")

    names = [n for n in primary if n not in exclude and theta1[n].is_floating_point()]
    proj = _Projection(names, theta0, theta1, norm, device)
    fixed = {k: v.detach().to(device) for k, v in theta1.items() if k not in proj.names and k not in aliases}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**fixed, **proj.tensors()}, (x.to(device),))

    opt = torch.optim.Adam([proj.gamma], lr=lr)
    data = _batch_cycle(batches, seed)
    last = float("nan")
    was_training = model.training
    model.eval()
    try:
        for x, y in itertools.islice(data, steps if proj.names else 0):  # nothing to fit without a Δ
            loss = F.cross_entropy(forward(x), y.to(device))
            if reg > 0:
                loss = loss + reg * torch.stack(proj.mean_ratios()).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            proj.clip_()
            last = loss.item()
        with torch.no_grad():
            total, count = 0.0, 0
            for x, y in batches:
                total += F.cross_entropy(forward(x), y.to(device), reduction="sum").item()
                count += len(y)
            projected = proj.tensors()
            ratios = [r.item() for r in proj.mean_ratios()]
    finally:
        model.train(was_training)

    out = {k: v.detach().clone() for k, v in theta1.items()}
    for name, value in projected.items():
        out[name] = value.to(theta1[name].device, theta1[name].dtype)
    for alias, name in aliases.items():
        if alias in out:
            out[alias] = out[name].clone()
    info = {
        "norm": norm, "reg": reg, "steps": steps, "lr": lr, "seed": seed,
        "gamma": dict(zip(proj.names, proj.gamma.detach().tolist(), strict=True)),
        "ratio": dict(zip(proj.names, ratios, strict=True)),
        "mean_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
        "last_step_loss": last, "final_loss": total / count,
    }
    return out, info


def tpgm_c(
    model: nn.Module, theta0: State, theta1: State, batches: Batches, *, reg: float, **kwargs: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """TPGM-C: TPGM with the radius penalty `reg · Σ_l γ_l/‖Δ_l‖` (reg must be given)."""
    return tpgm(model, theta0, theta1, batches, reg=reg, **kwargs)

