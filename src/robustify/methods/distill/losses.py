"""Training losses of the uncertainty-aware three-head distillation and its baselines (SPEC §3,
paper §4.3.1 Eqs. 3–5 and §5 "baselines").

A batch mixes clean and augmented samples (`mix_batch`, fraction `a` augmented). Every sample
contributes only its own branch (Eq. 5, β = 1 for clean and 0 for augmented samples):
    clean x:     Lc(h_c) + Ld(h_c ‖ T_clean)  + Lc(h_m) + Ld(h_m ‖ T_clean)        (Eq. 3)
    augmented x: Lc(h_u) + Ld(h_u ‖ T_robust) + Lc(h_m) + Ld(h_m ‖ T_robust)       (Eq. 4)
and the batch loss is the mean of these per-sample losses over the whole batch, so the clean head
gets gradient only from clean samples, the unclean head only from augmented ones and the combined
head from both. `T_clean` is a frozen copy of the initial large model (original head), `T_robust` the
small robust teacher; `Lc` is cross-entropy and `Ld` Hinton's KD (`kd_loss`).

Teacher-logit convention (one rule for every variant): a teacher's logits are passed only for the
samples whose terms use that teacher, in batch order — e.g. for the three-head loss
`clean_teacher_logits = T_clean(x[~augmented])` and `robust_teacher_logits = T_robust(x[augmented])`
— so the caller never runs a teacher on samples it does not supervise. `teacher_masks` says which
rows each variant needs; a teacher the variant does not use must be None (it would be wasted work).

All variants share one signature and live in the `VARIANTS` registry; the named functions
(`three_head_loss`, `single_teacher_loss`, `only_kd_loss`, `combined_head_loss`, `apt_loss`) are the
same routine with the variant fixed. Losses are computed in float32 whatever the logits' dtype (AMP):
bf16 keeps ~3 significant digits, too few for KL terms that are small differences of log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HEADS = ("clean", "unclean", "combined")
# which heads each branch trains in the three-head student (paper §4.3.1)
BRANCH_HEADS = {"clean": ("clean", "combined"), "aug": ("unclean", "combined")}
SINGLE_HEAD = "head"  # the name single-head variants use for their only head in `parts`
REDUCTIONS = ("none", "mean")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            reduction: str = "none") -> torch.Tensor:
    """Hinton KD: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) per sample (summed over classes).

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015), as the common
    reference implementations do (e.g. RepDistiller `DistillKL`). Unlike that reference, the teacher
    enters as log-probabilities (`log_target`, no log of an underflowed softmax) and is detached here
    rather than relying on the caller's no_grad, and the result can stay per sample (the routing needs it). `reduction="none"` gives one value per sample, `"mean"` their mean (= the
    `batchmean` KL; NaN for an empty batch, like every mean of nothing).
    """
    _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got '{reduction}'")
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same [N, C] shape")
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    per_sample = t * t * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return per_sample if reduction == "none" else per_sample.mean()


@dataclass(frozen=True)
class Variant:
    """A training loss: how many heads the student has and which teacher (`"clean"`, `"robust"` or
    None for no KD term) supervises the clean and the augmented samples."""

    name: str
    three_heads: bool
    clean_teacher: str | None
    aug_teacher: str | None

    def teacher_for(self, branch: str) -> str | None:
        return self.clean_teacher if branch == "clean" else self.aug_teacher


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("three-head", True, "clean", "robust"),        # ours (Eqs. 3–5)
    Variant("three-head-no-kd", True, None, None),         # App. A "Ours w/o K.D.": the heads and routing, CE only
    Variant("single-teacher", True, "robust", "robust"),   # three heads, T_robust everywhere
    Variant("only-kd", False, "robust", "robust"),         # one head, T_robust everywhere
    Variant("combined-head", False, "clean", "robust"),    # one head, both teachers
    Variant("apt", False, None, None),                     # one head, CE only
)}


def teacher_masks(variant: str, augmented: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """For each teacher ("clean", "robust"), the boolean mask of the batch rows whose logits the
    variant's loss expects (None: that teacher is not used, do not run it)."""
    spec = _variant(variant)
    _check_mask(augmented, None)
    out: dict[str, torch.Tensor | None] = {}
    for teacher in ("clean", "robust"):
        rows = [branch_mask for branch, branch_mask in (("clean", ~augmented), ("aug", augmented))
                if spec.teacher_for(branch) == teacher]
        out[teacher] = None if not rows else rows[0] if len(rows) == 1 else rows[0] | rows[1]
    return out


def distill_loss(variant: str, logits: Mapping[str, torch.Tensor] | torch.Tensor, labels: torch.Tensor,
                 augmented: torch.Tensor, clean_teacher_logits: torch.Tensor | None = None,
                 robust_teacher_logits: torch.Tensor | None = None, temperature: float = 1.0,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch loss of `variant` (a key of `VARIANTS`) and its parts for logging.

    `logits`: {"clean", "unclean", "combined"} → [B, C] for three-head variants, one [B, C] tensor
    otherwise; `labels`: [B] class ids; `augmented`: [B] bool, True where the row is an augmented
    sample; teacher logits: rows as `teacher_masks(variant, augmented)` says, in batch order.

    Returns the mean over the B samples of each sample's branch loss, and `parts`: every term's
    contribution to that mean (`ce_<head>_on_<branch>`, `kd_<head>_on_<branch>`: the term summed over
    the branch's samples / B, so the terms add up to `loss`), `loss_clean` + `loss_aug` = `loss`, and
    the branch sizes `n_clean`, `n_aug`.
    """
    spec = _variant(variant)
    _check_temperature(temperature)
    heads = _heads(spec, logits)
    b, c = next(iter(heads.values())).shape
    if b == 0:
        raise ValueError(f"loss '{spec.name}': empty batch (logits have 0 rows); the mean over samples is undefined")
    _check_labels(labels, b)
    _check_mask(augmented, b)
    device = next(iter(heads.values())).device
    labels, augmented = labels.long().to(device), augmented.to(device)
    rows = {"clean": (~augmented).nonzero().squeeze(1), "aug": augmented.nonzero().squeeze(1)}
    given = {"clean": clean_teacher_logits, "robust": robust_teacher_logits}
    masks = teacher_masks(variant, augmented)
    teachers = {name: _teacher_rows(spec, name, given[name], masks[name], c, device) for name in given}

    terms: dict[str, torch.Tensor] = {}
    branch_sums: dict[str, torch.Tensor] = {}
    for branch, idx in rows.items():
        teacher = spec.teacher_for(branch)
        target = None if teacher is None else _branch_slice(teachers[teacher], masks[teacher], branch, augmented)
        names = BRANCH_HEADS[branch] if spec.three_heads else (SINGLE_HEAD,)
        branch_terms = []
        for head in names:
            z = heads[head].index_select(0, idx)
            ce = F.cross_entropy(z.float(), labels.index_select(0, idx), reduction="sum") / b
            terms[f"ce_{head}_on_{branch}"] = ce
            branch_terms.append(ce)
            if target is not None:
                kd = kd_loss(z, target, temperature).sum() / b
                terms[f"kd_{head}_on_{branch}"] = kd
                branch_terms.append(kd)
        branch_sums[branch] = torch.stack(branch_terms).sum()
    loss = branch_sums["clean"] + branch_sums["aug"]

    logged = {**terms, "loss_clean": branch_sums["clean"], "loss_aug": branch_sums["aug"], "loss": loss}
    values = torch.stack([v.detach() for v in logged.values()]).cpu().tolist()  # one device sync
    parts = dict(zip(logged, values))
    parts["n_clean"], parts["n_aug"] = float(rows["clean"].numel()), float(rows["aug"].numel())
    return loss, parts


def three_head_loss(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, augmented: torch.Tensor,
                    clean_teacher_logits: torch.Tensor | None, robust_teacher_logits: torch.Tensor | None,
                    temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Ours (Eqs. 3–5): clean samples train h_c and h_m against T_clean, augmented samples train h_u
    and h_m against T_robust. Teacher rows: T_clean on x[~augmented], T_robust on x[augmented]."""
    return distill_loss("three-head", logits, labels, augmented, clean_teacher_logits,
                        robust_teacher_logits, temperature)


def single_teacher_loss(logits: Mapping[str, torch.Tensor], labels: torch.Tensor, augmented: torch.Tensor,
                        robust_teacher_logits: torch.Tensor, temperature: float = 1.0,
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """Table 1's "Single-Teacher": the three-head student and routing of Eqs. 3–5, but every KD term
    uses the small robust teacher (T_robust on the whole batch, [B, C]); no copy of the initial model.

    Why this reading: §5 defines only "Only K.D." (single head, T_robust only) and "Combined head"
    (single head, both teachers), while Tables 1–2 list "Single-Teacher" and "Only K.D." under
    "K.D. from <small> teacher". The name says one teacher; the paper stresses that the *copy of the
    initial model* is what preserves clean accuracy, and the small teacher is the only one every
    baseline shares, so we drop T_clean and keep the heads — isolating the clean teacher's effect from
    the heads' (Only K.D. then isolates the heads). Caveat: the tables' latencies (Single-Teacher <
    Only K.D. < Ours) would also fit Single-Teacher = §5's "Only K.D." and the tables' "Only K.D." =
    §5's "Combined head"; both of those are available as `only_kd_loss` and `combined_head_loss`, so
    every reading can be run.
    """
    return distill_loss("single-teacher", logits, labels, augmented, None, robust_teacher_logits, temperature)


def only_kd_loss(logits: torch.Tensor, labels: torch.Tensor, augmented: torch.Tensor,
                 robust_teacher_logits: torch.Tensor, temperature: float = 1.0,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 "Only K.D.": one head, CE + KD from the small robust teacher on clean and augmented samples
    alike (T_robust on the whole batch, [B, C]); no multi-head student, no clean teacher."""
    return distill_loss("only-kd", logits, labels, augmented, None, robust_teacher_logits, temperature)


def combined_head_loss(logits: torch.Tensor, labels: torch.Tensor, augmented: torch.Tensor,
                       clean_teacher_logits: torch.Tensor | None, robust_teacher_logits: torch.Tensor | None,
                       temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 "Combined head": one head trained as h_m of Eqs. 3–5 — CE + KD from T_clean on clean samples
    and from T_robust on augmented ones (teacher rows as in `three_head_loss`)."""
    return distill_loss("combined-head", logits, labels, augmented, clean_teacher_logits,
                        robust_teacher_logits, temperature)


def apt_loss(logits: torch.Tensor, labels: torch.Tensor, augmented: torch.Tensor,
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """§5 APT: the same tunable layers, one head, plain CE on the mixed clean + augmented batch (the
    "augmentation based technique" of the teachers; Fig. 6 varies APT's augmented fraction too), no
    KD. `augmented` only splits the logged parts."""
    return distill_loss("apt", logits, labels, augmented)


def mix_batch(clean_x: torch.Tensor, augmented_x: torch.Tensor, a: float, gen: torch.Generator,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i of the result is `augmented_x[i]` where the returned mask is True, else `clean_x[i]`.

    The number of augmented rows is aB rounded *stochastically*: ⌊aB⌋, plus one with probability
    aB − ⌊aB⌋, so its expectation is exactly aB (a fixed rounding would bias `a` for every batch size
    that does not divide) and it is exact whenever aB is an integer (a = 0, a = 1, a = 0.5 with even B).
    Which rows are augmented is a uniform random subset. Every draw comes from `gen` (one uniform,
    then one permutation, whatever `a`), so the same generator state gives the same batch.
    """
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"mix_batch: gen must be a torch.Generator, got {type(gen).__name__}")
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not 0.0 <= float(a) <= 1.0:
        raise ValueError(f"mix_batch: a (fraction of augmented samples) must be a number in [0, 1], got {a!r}")
    if clean_x.shape != augmented_x.shape or clean_x.dtype != augmented_x.dtype:
        raise ValueError(f"mix_batch: clean_x {tuple(clean_x.shape)} {clean_x.dtype} and augmented_x "
                         f"{tuple(augmented_x.shape)} {augmented_x.dtype} must match in shape and dtype")
    if clean_x.dim() < 1 or clean_x.device != augmented_x.device:
        raise ValueError(f"mix_batch: clean_x and augmented_x must be batched [B, ...] tensors on one device, "
                         f"got {clean_x.dim()}-D on {clean_x.device} and {augmented_x.device}")
    b = clean_x.shape[0]
    exact = float(a) * b
    low = math.floor(exact + 1e-9)  # 1e-9: a float product such as 0.29·100 = 28.999… is 29
    u = float(torch.rand((), generator=gen, device=gen.device))
    n = low + int(exact - low > 1e-9 and u < exact - low)
    perm = torch.randperm(b, generator=gen, device=gen.device)
    mask = torch.zeros(b, dtype=torch.bool, device=gen.device)
    mask[perm[:n]] = True
    mask = mask.to(clean_x.device)
    x = torch.where(mask.view(b, *([1] * (clean_x.dim() - 1))), augmented_x, clean_x)
    return x, mask


# ----------------------------------------------------------------------------------------- checks


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown distillation loss '{name}'; known: {sorted(VARIANTS)}")
    return VARIANTS[name]


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"KD temperature must be a finite number > 0, got {temperature!r}")


def _check_logits(name: str, z: object) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or not z.is_floating_point():
        what = f"{z.dim()}-D {z.dtype} tensor" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a floating [N, C] tensor of logits, got a {what}")


def _heads(spec: Variant, logits: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, torch.Tensor]:
    if not spec.three_heads:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"loss '{spec.name}' trains a single head: pass its [B, C] logits tensor, "
                            f"got {type(logits).__name__}")
        _check_logits(f"logits ({spec.name})", logits)
        return {SINGLE_HEAD: logits}
    if not isinstance(logits, Mapping):
        raise TypeError(f"loss '{spec.name}' trains three heads: pass a mapping {list(HEADS)} → [B, C] logits, "
                        f"got {type(logits).__name__}")
    missing = [h for h in HEADS if h not in logits]
    unexpected = sorted(str(k) for k in logits if k not in HEADS)
    if missing or unexpected:
        raise ValueError(f"loss '{spec.name}': logits must have exactly the heads {list(HEADS)}; "
                         f"missing {missing}, unexpected {unexpected}")
    for h in HEADS:
        _check_logits(f"logits['{h}']", logits[h])
    shapes = {h: tuple(logits[h].shape) for h in HEADS}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"loss '{spec.name}': the three heads' logits must share one [B, C] shape, got {shapes}")
    return {h: logits[h] for h in HEADS}


def _check_labels(labels: object, b: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != (b,) or labels.is_floating_point() \
            or labels.dtype == torch.bool:
        what = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape ({b},) (one class id per logits row), got {what}")


def _check_mask(augmented: object, b: int | None) -> None:
    """`b`: the batch size the mask must match (None: any 1-D mask)."""
    if not isinstance(augmented, torch.Tensor) or augmented.dtype != torch.bool:
        what = augmented.dtype if isinstance(augmented, torch.Tensor) else type(augmented).__name__
        raise TypeError(f"augmented must be a bool tensor (True = augmented sample), got {what}")
    if augmented.dim() != 1 or (b is not None and augmented.shape[0] != b):
        expected = f"({b},) (one flag per logits row)" if b is not None else "(B,)"
        raise ValueError(f"augmented must have shape {expected}, got {tuple(augmented.shape)}")


def _teacher_rows(spec: Variant, name: str, z: torch.Tensor | None, mask: torch.Tensor | None,
                  c: int, device: torch.device) -> torch.Tensor | None:
    """Validate one teacher's logits against the rows `mask` selects; None for an unused teacher and
    an empty [0, C] tensor for a used one that supervises no row of this batch (None accepted then)."""
    arg = f"{name}_teacher_logits"
    if mask is None:
        if z is not None:
            raise ValueError(f"loss '{spec.name}' uses no {name} teacher: pass {arg}=None (do not run it)")
        return None
    n = int(mask.sum())
    if z is None:
        if n == 0:
            return torch.zeros(0, c, device=device)
        raise ValueError(f"loss '{spec.name}' needs {arg} for its {n} supervised row(s), got None")
    _check_logits(arg, z)
    if tuple(z.shape) != (n, c):
        raise ValueError(f"loss '{spec.name}': {arg} must have shape ({n}, {c}) — one row per sample this teacher "
                         f"supervises, in batch order (see teacher_masks) — got {tuple(z.shape)}")
    return z


def _branch_slice(z: torch.Tensor, teacher_mask: torch.Tensor, branch: str,
                  augmented: torch.Tensor) -> torch.Tensor:
    """The rows of a teacher's compact logits (one per row of `teacher_mask`) that belong to `branch`,
    in batch order."""
    branch_mask = augmented if branch == "aug" else ~augmented
    return z[branch_mask[teacher_mask].to(z.device)]
