"""Uncertainty-aware head selection at inference (SPEC §3, paper §4.3.2, Eq. 6) and its ablations.

The three-head student predicts with the clean head `c` or the unclean (robust) head `u`, chosen per
sample. N MC-dropout passes run through the tunable part only: the frozen prefix's features are
computed once (dropout off), because its output does not change between passes and it is most of the
cost. For k ∈ {c, u}, from the passes' softmax outputs:

- `U_k` = mean over classes of the std across passes [SPEC choice; population std, 1/N — the MC
  estimate of the predictive std; the 1/(N−1) version only rescales both heads' U by the same factor,
  so no rule's choice depends on it];
- `KL_k = KL(p̄_m ‖ p̄_k)`, p̄ = the mean over passes (the MC predictive distribution), m = combined;
- Eq. 6 ("ours"): `argmin_k U_k · KL_k`. Ablations [paper App. A]: "no_kl" `argmin U_k`,
  "no_uncertainty" `argmin KL_k`, "max_logit" the head with the larger max of p̄_k.

"max_logit" compares max softmax *probabilities*, not raw logits: the paper describes it as selection
by "predictive confidence", and the two heads are trained separately, so their logits have no common
offset (adding a constant to all of one head's logits changes neither its prediction nor its
probabilities, but would flip a raw-logit comparison). It uses the same MC mean p̄_k as the other
rules so the ablation changes the criterion only.

Ties go to the clean head (the original model's behaviour is the default when nothing says otherwise).
The predicted distribution of a sample is p̄ of its chosen head.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

HEADS: tuple[str, ...] = ("clean", "unclean", "combined")
RULES: tuple[str, ...] = ("ours", "no_kl", "no_uncertainty", "max_logit")
CLEAN, UNCLEAN = 0, 1  # values of HeadSelection.choice

# Every torch dropout flavour; DropPath (stochastic depth) is not MC dropout and stays off.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_USES_U = ("ours", "no_kl")


@runtime_checkable
class MCStudent(Protocol):
    """What head selection needs from the three-head student (an nn.Module).

    `features` runs the frozen prefix (no grad); `forward_from_features` runs the tunable part (shared
    section + the named heads) and returns their logits; its dropout layers are active in train mode.
    """

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_from_features(self, features: torch.Tensor, heads: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> nn.Module: ...


@contextmanager
def _modes_restored(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag on exit (a model may be in a mixed state, e.g. a
    frozen backbone kept in eval while the tunable part trains; `module.train(old)` would flatten it)."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


@contextmanager
def mc_dropout(module: nn.Module, types: tuple[type[nn.Module], ...] = DROPOUT_TYPES) -> Iterator[nn.Module]:
    """Only dropout layers (of `types`) in train mode, everything else eval (BatchNorm uses and keeps its
    running statistics), for MC-dropout passes; the previous per-module modes are restored afterwards,
    also on error. `types=()` puts everything in eval."""
    _require_module(module)
    with _modes_restored(module):
        module.eval()
        for m in module.modules():
            if isinstance(m, types):
                m.train()
        yield module


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode (dropout off), previous per-module modes restored afterwards."""
    _require_module(module)
    with _modes_restored(module):
        module.eval()
        yield module


@contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the RNG that dropout on `device` draws from (CPU: the default generator; an accelerator:
    that device's default generator, plus the CPU one) inside `fork_rng`, so the caller's global
    state is the same afterwards. Dropout has no generator argument, hence the fork."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    backend = torch.get_device_module(device.type)
    index = device.index if device.index is not None else backend.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if hasattr(backend, "device"):  # cuda/xpu: seed exactly this device's generator
            with backend.device(index):
                backend.manual_seed(seed)
        else:  # single-device backends (mps)
            backend.manual_seed(seed)
        yield


def mc_head_outputs(
    student: MCStudent,
    features: torch.Tensor,
    n_passes: int = 10,
    *,
    gen: torch.Generator,
    heads: Sequence[str] = HEADS,
) -> dict[str, torch.Tensor]:
    """Softmax probabilities (float32) per head, shape (n_passes, batch, classes), from `n_passes`
    MC-dropout passes of the tunable part on cached `features`.

    The passes' dropout masks come from one seed drawn from `gen` (one draw per call, so successive
    batches with the same generator get different masks); the global torch RNG is forked around the
    passes and left unchanged. Same generator state, same batch and device → identical outputs. All
    heads of one pass share that pass's mask in the shared section (one forward per pass, as at
    training time).
    """
    if n_passes < 1:
        raise ValueError(f"mc_head_outputs: n_passes must be >= 1, got {n_passes}")
    heads = tuple(heads)
    if not heads:
        raise ValueError("mc_head_outputs: no heads requested")
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=gen, device=gen.device).item())
    passes: dict[str, list[torch.Tensor]] = {h: [] for h in heads}
    with torch.no_grad(), mc_dropout(student), _seeded_rng(features.device, seed):
        for _ in range(n_passes):
            logits = student.forward_from_features(features, heads)
            missing = [h for h in heads if h not in logits]
            if missing:
                raise ValueError(f"forward_from_features returned heads {sorted(logits)}, missing {missing}")
            for h in heads:
                passes[h].append(logits[h].float().softmax(dim=-1))
    out = {h: torch.stack(v) for h, v in passes.items()}
    shapes = {h: tuple(p.shape) for h, p in out.items()}
    if len(set(shapes.values())) != 1 or out[heads[0]].ndim != 3 or out[heads[0]].shape[1] != features.shape[0]:
        raise ValueError(f"head logits must all be (batch={features.shape[0]}, classes); got passes×{shapes}")
    return out


def mc_predict(
    student: MCStudent,
    x: torch.Tensor,
    n_passes: int = 10,
    *,
    gen: torch.Generator,
    heads: Sequence[str] = HEADS,
) -> dict[str, torch.Tensor]:
    """`mc_head_outputs` from inputs: the frozen prefix runs once, with every module in eval mode (a
    dropout layer inside the frozen backbone is not part of the MC sample), then the MC passes."""
    with torch.no_grad(), eval_mode(student):
        features = student.features(x)
    return mc_head_outputs(student, features, n_passes, gen=gen, heads=heads)


@dataclass(frozen=True)
class HeadSelection:
    """Per-sample choice (int64, CLEAN=0 / UNCLEAN=1), the chosen heads' mean distributions
    (batch, classes), and U and KL per head ("clean", "unclean"; float64, shape (batch,))."""

    choice: torch.Tensor
    probs: torch.Tensor
    U: dict[str, torch.Tensor]
    KL: dict[str, torch.Tensor]


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis, 0·log 0 = 0. q is floored at the dtype's smallest normal number so
    a class that underflowed to 0 in q gives a large finite KL instead of inf (inf · U = nan when U = 0);
    a rounding-negative result is clamped to 0 so it cannot make a product negative."""
    q = q.clamp_min(torch.finfo(q.dtype).tiny)
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1).clamp_min(0.0)


def _check_probs(probs: Mapping[str, torch.Tensor], rule: str) -> None:
    missing = [h for h in HEADS if h not in probs]
    if missing:
        raise ValueError(f"select_heads: probs needs heads {list(HEADS)}, missing {missing}")
    shapes = {h: tuple(probs[h].shape) for h in HEADS}
    if len(set(shapes.values())) != 1 or probs["clean"].ndim != 3:
        raise ValueError(f"select_heads: probs must all be (passes, batch, classes) of one shape, got {shapes}")
    for h in HEADS:
        p = probs[h]
        if not p.is_floating_point() or p.min() < 0 or (p.sum(dim=-1) - 1).abs().max() > 1e-3:
            raise ValueError(f"select_heads: probs['{h}'] must be softmax probabilities (>= 0, rows sum to 1), "
                             "not logits")
    if rule in _USES_U and probs["clean"].shape[0] < 2:
        raise ValueError(f"select_heads: rule '{rule}' needs >= 2 MC passes for the uncertainty, got 1")


def select_heads(probs: Mapping[str, torch.Tensor], rule: str = "ours") -> HeadSelection:
    """Choose clean or unclean per sample by `rule` (one of RULES) from MC probabilities per head
    (passes, batch, classes) for "clean", "unclean", "combined". Statistics are computed in float64."""
    if rule not in RULES:
        raise ValueError(f"select_heads: unknown rule '{rule}', expected one of {list(RULES)}")
    _check_probs(probs, rule)
    p = {h: probs[h].double() for h in HEADS}
    mean = {h: v.mean(dim=0) for h, v in p.items()}
    pair = ("clean", "unclean")
    U = {h: p[h].std(dim=0, correction=0).mean(dim=-1) for h in pair}
    KL = {h: kl_divergence(mean["combined"], mean[h]) for h in pair}
    if rule == "max_logit":
        # larger confidence wins: minimise its negative
        score = {h: -mean[h].max(dim=-1).values for h in pair}
    elif rule == "ours":
        score = {h: U[h] * KL[h] for h in pair}
    elif rule == "no_kl":
        score = U
    else:  # no_uncertainty
        score = KL
    unclean = score["unclean"] < score["clean"]  # strict: ties stay with the clean head
    chosen = torch.where(unclean[:, None], mean["unclean"], mean["clean"]).to(probs["clean"].dtype)
    return HeadSelection(choice=unclean.long(), probs=chosen, U=U, KL=KL)


def expects_unclean(shift_type: str | None) -> bool:
    """The "right" head for an eval set: clean for in-distribution (shift_type "reference", see
    params.yaml eval_sets), unclean for every shifted set."""
    if not shift_type:
        raise ValueError("head selection: the eval set's shift_type is needed for F_correct, got none")
    return shift_type != "reference"


def correct_count(choice: torch.Tensor, expected_unclean: bool) -> int:
    """Number of samples routed to the expected head."""
    if choice.ndim != 1:
        raise ValueError(f"choice must be one value per sample (1-D), got shape {tuple(choice.shape)}")
    return int((choice.long() == int(expected_unclean)).sum().item())


def f_correct(choice: torch.Tensor, expected_unclean: bool) -> float:
    """F_correct [paper App. A]: fraction of samples routed to the right head (`choice` 0=clean,
    1=unclean, bool or int)."""
    if choice.numel() == 0:
        raise ValueError("f_correct: no samples")
    return correct_count(choice, expected_unclean) / choice.numel()


def _require_module(module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"head selection needs the student as a torch nn.Module, got {type(module).__name__}")
