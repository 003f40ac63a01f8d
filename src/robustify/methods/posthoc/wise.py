"""WiSE-FT: weight-space interpolation between the zero-shot and the fine-tuned model (SPEC §2).

`θ_α = (1−α)·θ0 + α·θ1` over *every* state-dict entry — image tower, head (zero-shot ↔ fine-tuned)
and buffers (BatchNorm running statistics) — as wise-ft's `wise_ft` does. The same weighted average
serves the model soups (`soups.py`).

Arithmetic: each entry is computed as `Σ_i w_i · θ_i` in (at least) float32 and cast back to the
entry's dtype; terms with weight 0 are skipped. With weights (1, 0) or (0, 1) that leaves `1·x`,
which is bit-exactly `x` (even -0.0, inf, nan), so α = 0 and α = 1 reproduce the endpoints exactly.
(`torch.lerp` is exact at the endpoints too, but at α = ½ it computes `θ1 − ½Δ`, not the average.)

Integer buffers (BatchNorm's `num_batches_tracked`): equal values are copied; differing ones are
averaged with the same weights in float64 and rounded to the nearest integer, so the endpoints stay
exact and a soup gets the mean count (the count only matters for BatchNorm with `momentum=None`).
Boolean buffers take the value of the endpoint with the largest weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def check_same_keys(states: Sequence[State], names: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the keys (and shapes/dtypes) that differ between state dicts.

    Averaging dicts with different keys would silently drop or invent weights.
    """
    if not states:
        raise ValueError("need at least one state dict")
    names = list(names) if names is not None else [f"state {i}" for i in range(len(states))]
    ref = set(states[0])
    for name, state in zip(names[1:], states[1:], strict=True):
        if set(state) != ref:
            only_ref, only_this = sorted(ref - set(state)), sorted(set(state) - ref)
            raise ValueError(
                f"state dicts differ in keys: only in {names[0]}: {only_ref[:10]}, only in {name}: {only_this[:10]}"
            )
        for key in state:
            a, b = states[0][key], state[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"state dicts differ at '{key}': {names[0]} {tuple(a.shape)} {a.dtype}, "
                    f"{name} {tuple(b.shape)} {b.dtype}"
                )


def _average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i·t_i for one entry, with the integer/bool rules of the module docstring."""
    first = tensors[0]
    if first.dtype == torch.bool:
        return tensors[max(range(len(weights)), key=lambda i: weights[i])].clone()
    if not (first.is_floating_point() or first.is_complex()):
        if all(torch.equal(first, t) for t in tensors[1:]):
            return first.clone()
        acc = sum(w * t.to(torch.float64) for w, t in zip(weights, tensors, strict=True))
        return acc.round().to(first.dtype)
    work = torch.promote_types(first.dtype, torch.float32)
    acc = torch.zeros_like(first, dtype=work)
    terms = [(w, t) for w, t in zip(weights, tensors, strict=True) if w != 0]
    for k, (w, t) in enumerate(terms):
        term = w * t.to(work)
        acc = term if k == 0 else acc + term
    return acc.to(first.dtype)


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Entry-wise Σ_i w_i·θ_i over state dicts with identical keys, shapes and dtypes."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} state dicts but {len(weights)} weights")
    check_same_keys(states)
    with torch.no_grad():
        return {key: _average([s[key].detach() for s in states], weights) for key in states[0]}


def interpolate(theta0: State, theta1: State, alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT `θ_α = (1−α)·θ0 + α·θ1` over every parameter and buffer; exact at α ∈ {0, 1}."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    check_same_keys([theta0, theta1], ["theta0", "theta1"])
    return weighted_average([theta0, theta1], [1.0 - alpha, alpha])


def alphas(step: float = 0.1) -> list[float]:
    """The sweep 0, step, …, 1 as exact decimals (0.3, not 0.30000000000000004) for stable run names."""
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must lie in (0, 1], got {step}")
    n = round(1.0 / step)
    if abs(n * step - 1.0) > 1e-9:
        raise ValueError(f"step {step} does not divide [0, 1] into equal parts")
    return [round(i / n, 10) for i in range(n + 1)]


def output_ensemble(logits0: torch.Tensor, logits1: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1−α)·z0 + α·z1. For linear-probe ("LC") models — same encoder, different linear heads —
    this equals the logits of the weight-interpolated model, because the head is linear in W."""
    return (1.0 - alpha) * logits0 + alpha * logits1
