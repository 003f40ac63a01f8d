"""The three-head distillation loss (paper Eqs. 3–5), its baselines' losses and batch mixing."""

from __future__ import annotations

import math

import pytest
import torch

from robustify.methods.distill.losses import (
    HEADS,
    VARIANTS,
    apt_loss,
    combined_head_loss,
    distill_loss,
    kd_loss,
    mix_batch,
    only_kd_loss,
    single_teacher_loss,
    teacher_masks,
    three_head_loss,
)

# ------------------------------------------------------------------ hand arithmetic (pure Python)


def softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def ce(z: list[float], y: int) -> float:
    return -z[y] + math.log(sum(math.exp(v) for v in z))


def kl(teacher: list[float], student: list[float], t: float = 1.0) -> float:
    """T² · Σ p_t (log p_t − log p_s) of the softened distributions."""
    pt, ps = softmax(teacher, t), softmax(student, t)
    return t * t * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))


# ----------------------------------------------------------------------------- the hand batch
# 4 samples, 3 classes; samples 0, 2 clean and 1, 3 augmented (interleaved on purpose)
AUG = [False, True, False, True]
Y = [0, 2, 1, 1]
HC = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 2.0]]
HU = [[0.0, 0.0, 0.0], [1.0, 0.0, 3.0], [2.0, 2.0, 2.0], [0.0, 2.0, -1.0]]
HM = [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]
TC_FULL = [[3.0, 0.0, 0.0], [0.5, -2.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, -3.0]]  # T_clean on every row
TR_FULL = [[-1.0, 2.0, 0.0], [0.0, 1.0, 2.0], [1.5, 0.0, 0.5], [1.0, 2.0, 0.0]]   # T_robust on every row


def batch(requires_grad: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    heads = {h: torch.tensor(z, requires_grad=requires_grad) for h, z in zip(HEADS, (HC, HU, HM))}
    return heads, torch.tensor(Y), torch.tensor(AUG)


def compact(full: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor(full)[mask]


def three_head_by_hand() -> float:
    clean_0 = ce(HC[0], 0) + kl(TC_FULL[0], HC[0]) + ce(HM[0], 0) + kl(TC_FULL[0], HM[0])
    aug_1 = ce(HU[1], 2) + kl(TR_FULL[1], HU[1]) + ce(HM[1], 2) + kl(TR_FULL[1], HM[1])
    clean_2 = ce(HC[2], 1) + kl(TC_FULL[2], HC[2]) + ce(HM[2], 1) + kl(TC_FULL[2], HM[2])
    aug_3 = ce(HU[3], 1) + kl(TR_FULL[3], HU[3]) + ce(HM[3], 1) + kl(TR_FULL[3], HM[3])
    return (clean_0 + aug_1 + clean_2 + aug_3) / 4


def run_three_head(tc_full=TC_FULL, tr_full=TR_FULL, temperature: float = 1.0):
    heads, y, aug = batch()
    loss, parts = three_head_loss(heads, y, aug, compact(tc_full, ~aug), compact(tr_full, aug), temperature)
    return heads, loss, parts


# ------------------------------------------------------------------------------------ kd_loss


def test_kd_loss_zero_when_student_equals_teacher():
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 3.0, 3.0]])
    for t in (1.0, 2.0, 4.0):
        assert torch.equal(kd_loss(z, z.clone(), t), torch.zeros(2))


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_kd_loss_equals_hand_kl_with_t_squared(t):
    s = [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]
    te = [[0.0, 1.0, 3.0], [2.0, -1.0, 0.5]]
    per = kd_loss(torch.tensor(s), torch.tensor(te), temperature=t)
    expected = [kl(te[0], s[0], t), kl(te[1], s[1], t)]
    assert per.shape == (2,)
    assert per.tolist() == pytest.approx(expected, rel=1e-5)
    assert float(kd_loss(torch.tensor(s), torch.tensor(te), t, reduction="mean")) == \
        pytest.approx(sum(expected) / 2, rel=1e-5)
    # the T² factor, spelled out: the loss is T² times the plain KL of the softened distributions
    plain = sum(a * math.log(a / b) for a, b in zip(softmax(te[0], t), softmax(s[0], t)))
    assert float(per[0]) == pytest.approx(t * t * plain, rel=1e-5)


def test_kd_loss_matches_the_finetune_kd_term():
    """The same definition as the fine-tuning KD regulariser (methods/regularizers/distill.py)."""
    from robustify.methods.regularizers.distill import kd_term

    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (1.0, 3.0):
        assert float(kd_loss(s, te, t, "mean")) == pytest.approx(float(kd_term(s, te, t)), rel=1e-6)


def test_kd_loss_teacher_gets_no_gradient():
    s = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    te = torch.tensor([[0.0, 2.0, 0.0]], requires_grad=True)
    kd_loss(s, te, 2.0, "mean").backward()
    assert te.grad is None and s.grad is not None and float(s.grad.abs().sum()) > 0


def test_kd_loss_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="same"):
        kd_loss(z, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(z, z, reduction="sum")
    with pytest.raises(ValueError, match="student_logits"):
        kd_loss(torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------------------- three-head loss


def test_three_head_value_equals_hand_computation():
    _, loss, parts = run_three_head()
    assert loss.item() == pytest.approx(three_head_by_hand(), rel=1e-6)
    # each logged part is that term's share of the batch mean
    assert parts["kd_clean_on_clean"] == pytest.approx((kl(TC_FULL[0], HC[0]) + kl(TC_FULL[2], HC[2])) / 4, rel=1e-6)
    assert parts["ce_unclean_on_aug"] == pytest.approx((ce(HU[1], 2) + ce(HU[3], 1)) / 4, rel=1e-6)
    assert parts["kd_combined_on_aug"] == pytest.approx((kl(TR_FULL[1], HM[1]) + kl(TR_FULL[3], HM[3])) / 4, rel=1e-6)
    terms = [v for k, v in parts.items() if k.startswith(("ce_", "kd_"))]
    assert len(terms) == 8
    assert sum(terms) == pytest.approx(parts["loss"], rel=1e-6)
    assert parts["loss_clean"] + parts["loss_aug"] == pytest.approx(parts["loss"], rel=1e-6)
    assert (parts["n_clean"], parts["n_aug"]) == (2.0, 2.0)


def test_three_head_value_at_temperature_two():
    _, loss, _ = run_three_head(temperature=2.0)
    expected = sum(
        ce(h[i], Y[i]) + kl(t[i], h[i], 2.0)
        for i, pairs in ((0, ((HC, TC_FULL), (HM, TC_FULL))), (1, ((HU, TR_FULL), (HM, TR_FULL))),
                         (2, ((HC, TC_FULL), (HM, TC_FULL))), (3, ((HU, TR_FULL), (HM, TR_FULL))))
        for h, t in pairs) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_three_head_gradient_routing():
    heads, loss, _ = run_three_head()
    loss.backward()
    clean_rows, aug_rows = [0, 2], [1, 3]
    g = {h: heads[h].grad for h in HEADS}
    assert torch.equal(g["clean"][aug_rows], torch.zeros(2, 3))       # h_c: nothing from augmented x
    assert bool((g["clean"][clean_rows].abs().sum(1) > 0).all())
    assert torch.equal(g["unclean"][clean_rows], torch.zeros(2, 3))   # h_u: nothing from clean x
    assert bool((g["unclean"][aug_rows].abs().sum(1) > 0).all())
    assert bool((g["combined"].abs().sum(1) > 0).all())                # h_m: from both
    # the gradient of row i is that sample's own (CE + KD) gradient / B, e.g. h_c on sample 0:
    pc0, pt0 = softmax(HC[0]), softmax(TC_FULL[0])
    hand = [((pc0[k] - (k == 0)) + (pc0[k] - pt0[k])) / 4 for k in range(3)]
    assert g["clean"][0].tolist() == pytest.approx(hand, rel=1e-5)


def test_each_teacher_only_touches_its_own_samples():
    _, base, parts = run_three_head()
    clean_keys = [k for k in parts if k.endswith("_on_clean")]
    aug_keys = [k for k in parts if k.endswith("_on_aug")]
    aug = torch.tensor(AUG)
    masks = teacher_masks("three-head", aug)
    assert torch.equal(masks["clean"], ~aug) and torch.equal(masks["robust"], aug)

    # T_robust's output on a clean sample is never consumed: the loss is bit-identical
    tr = [row[:] for row in TR_FULL]
    tr[0] = [9.0, -9.0, 4.0]
    _, same, _ = run_three_head(tr_full=tr)
    assert torch.equal(same, base)
    # ... and on an augmented sample it changes only the augmented branch's KD terms
    tr = [row[:] for row in TR_FULL]
    tr[3] = [9.0, -9.0, 4.0]
    _, moved, moved_parts = run_three_head(tr_full=tr)
    assert moved.item() != pytest.approx(base.item())
    assert all(moved_parts[k] == parts[k] for k in clean_keys)
    assert moved_parts["kd_unclean_on_aug"] != parts["kd_unclean_on_aug"]
    assert moved_parts["ce_unclean_on_aug"] == parts["ce_unclean_on_aug"]

    # symmetrically for T_clean
    tc = [row[:] for row in TC_FULL]
    tc[1] = [9.0, -9.0, 4.0]
    _, same, _ = run_three_head(tc_full=tc)
    assert torch.equal(same, base)
    tc = [row[:] for row in TC_FULL]
    tc[2] = [9.0, -9.0, 4.0]
    _, moved, moved_parts = run_three_head(tc_full=tc)
    assert moved.item() != pytest.approx(base.item())
    assert all(moved_parts[k] == parts[k] for k in aug_keys)
    assert moved_parts["kd_combined_on_clean"] != parts["kd_combined_on_clean"]


def test_teacher_logits_get_no_gradient():
    heads, y, aug = batch()
    tc = compact(TC_FULL, ~aug).requires_grad_(True)
    tr = compact(TR_FULL, aug).requires_grad_(True)
    loss, _ = three_head_loss(heads, y, aug, tc, tr)
    loss.backward()
    assert tc.grad is None and tr.grad is None
    assert heads["combined"].grad is not None


def test_all_clean_and_all_augmented_batches():
    heads, y, _ = batch()
    for flag in (False, True):
        aug = torch.full((4,), flag)
        teacher = torch.tensor(TR_FULL if flag else TC_FULL)
        for missing in (None, torch.zeros(0, 3)):  # the idle branch's teacher: None or an empty [0, C] tensor
            tc, tr = (missing, teacher) if flag else (teacher, missing)
            for h in heads.values():
                h.grad = None
            loss, parts = three_head_loss(heads, y, aug, tc, tr)
            loss.backward()
            trained, idle = ("unclean", "clean") if flag else ("clean", "unclean")
            rows = [(HU if flag else HC)[i] for i in range(4)]
            expected = sum(ce(rows[i], Y[i]) + kl(teacher.tolist()[i], rows[i])
                           + ce(HM[i], Y[i]) + kl(teacher.tolist()[i], HM[i]) for i in range(4)) / 4
            assert loss.item() == pytest.approx(expected, rel=1e-6)
            assert torch.equal(heads[idle].grad, torch.zeros(4, 3))
            assert bool((heads[trained].grad.abs().sum(1) > 0).all())
            assert parts["loss_aug" if not flag else "loss_clean"] == 0.0
            assert (parts["n_clean"], parts["n_aug"]) == ((0.0, 4.0) if flag else (4.0, 0.0))


def test_three_head_errors_are_clear():
    heads, y, aug = batch(requires_grad=False)
    tc, tr = compact(TC_FULL, ~aug), compact(TR_FULL, aug)
    with pytest.raises(ValueError, match=r"missing \['unclean'\]"):
        three_head_loss({"clean": heads["clean"], "combined": heads["combined"]}, y, aug, tc, tr)
    with pytest.raises(ValueError, match=r"unexpected \['robust'\]"):
        three_head_loss({**heads, "robust": heads["clean"]}, y, aug, tc, tr)
    with pytest.raises(ValueError, match="share one"):
        three_head_loss({**heads, "unclean": torch.zeros(4, 5)}, y, aug, tc, tr)
    # the full-batch teacher where only the clean rows are expected
    with pytest.raises(ValueError, match=r"clean_teacher_logits must have shape \(2, 3\)"):
        three_head_loss(heads, y, aug, torch.tensor(TC_FULL), tr)
    with pytest.raises(ValueError, match=r"robust_teacher_logits must have shape \(2, 3\)"):
        three_head_loss(heads, y, aug, tc, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs robust_teacher_logits"):
        three_head_loss(heads, y, aug, tc, None)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor of shape \(4,\)"):
        three_head_loss(heads, y[:3], aug, tc, tr)
    with pytest.raises(ValueError, match="labels"):
        three_head_loss(heads, y.float(), aug, tc, tr)
    with pytest.raises(TypeError, match="augmented must be a bool tensor"):
        three_head_loss(heads, y, aug.long(), tc, tr)
    with pytest.raises(ValueError, match=r"augmented must have shape \(4,\)"):
        three_head_loss(heads, y, aug[:3], tc, tr)
    with pytest.raises(TypeError, match="three heads"):
        three_head_loss(heads["clean"], y, aug, tc, tr)
    with pytest.raises(ValueError, match="temperature"):
        three_head_loss(heads, y, aug, tc, tr, temperature=-1.0)
    with pytest.raises(ValueError, match="empty batch"):
        three_head_loss({h: torch.zeros(0, 3) for h in HEADS}, torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, dtype=torch.bool), None, None)
    with pytest.raises(ValueError, match="unknown distillation loss 'ours'"):
        distill_loss("ours", heads, y, aug, tc, tr)


# -------------------------------------------------------------------------------- baselines


def test_only_kd_loss_value_and_teachers():
    z = torch.tensor(HM, requires_grad=True)
    y, aug = torch.tensor(Y), torch.tensor(AUG)
    assert teacher_masks("only-kd", aug)["clean"] is None
    assert torch.equal(teacher_masks("only-kd", aug)["robust"], torch.ones(4, dtype=torch.bool))
    loss, parts = only_kd_loss(z, y, aug, torch.tensor(TR_FULL))
    expected = (ce(HM[0], 0) + kl(TR_FULL[0], HM[0]) + ce(HM[1], 2) + kl(TR_FULL[1], HM[1])
                + ce(HM[2], 1) + kl(TR_FULL[2], HM[2]) + ce(HM[3], 1) + kl(TR_FULL[3], HM[3])) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["kd_head_on_clean"] == pytest.approx((kl(TR_FULL[0], HM[0]) + kl(TR_FULL[2], HM[2])) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="uses no clean teacher"):
        distill_loss("only-kd", z, y, aug, torch.tensor(TC_FULL)[~aug], torch.tensor(TR_FULL))
    with pytest.raises(ValueError, match=r"robust_teacher_logits must have shape \(4, 3\)"):
        only_kd_loss(z, y, aug, torch.tensor(TR_FULL)[aug])
    with pytest.raises(TypeError, match="single head"):
        only_kd_loss({"combined": z}, y, aug, torch.tensor(TR_FULL))


def test_combined_head_loss_is_the_combined_head_of_eqs_3_4():
    z = torch.tensor(HM, requires_grad=True)
    y, aug = torch.tensor(Y), torch.tensor(AUG)
    loss, parts = combined_head_loss(z, y, aug, compact(TC_FULL, ~aug), compact(TR_FULL, aug))
    expected = (ce(HM[0], 0) + kl(TC_FULL[0], HM[0]) + ce(HM[1], 2) + kl(TR_FULL[1], HM[1])
                + ce(HM[2], 1) + kl(TC_FULL[2], HM[2]) + ce(HM[3], 1) + kl(TR_FULL[3], HM[3])) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    _, _, three = run_three_head()
    combined_terms = sum(v for k, v in three.items() if k.startswith(("ce_combined", "kd_combined")))
    assert loss.item() == pytest.approx(combined_terms, rel=1e-6)
    loss.backward()
    assert bool((z.grad.abs().sum(1) > 0).all())


def test_single_teacher_loss_uses_the_robust_teacher_everywhere():
    heads, y, aug = batch()
    tr = torch.tensor(TR_FULL)
    masks = teacher_masks("single-teacher", aug)
    assert masks["clean"] is None and bool(masks["robust"].all())
    loss, parts = single_teacher_loss(heads, y, aug, tr)
    # = the three-head loss with T_robust standing in for T_clean on the clean samples
    ref_heads, _, _ = batch()
    ref, ref_parts = three_head_loss(ref_heads, y, aug, tr[~aug], tr[aug])
    assert torch.equal(loss, ref) and parts == ref_parts
    clean_0 = ce(HC[0], 0) + kl(TR_FULL[0], HC[0]) + ce(HM[0], 0) + kl(TR_FULL[0], HM[0])
    clean_2 = ce(HC[2], 1) + kl(TR_FULL[2], HC[2]) + ce(HM[2], 1) + kl(TR_FULL[2], HM[2])
    assert parts["loss_clean"] == pytest.approx((clean_0 + clean_2) / 4, rel=1e-6)
    loss.backward()
    assert torch.equal(heads["clean"].grad[[1, 3]], torch.zeros(2, 3))
    assert torch.equal(heads["unclean"].grad[[0, 2]], torch.zeros(2, 3))


def test_apt_loss_is_plain_cross_entropy():
    z = torch.tensor(HC)
    y, aug = torch.tensor(Y), torch.tensor(AUG)
    loss, parts = apt_loss(z, y, aug)
    assert loss.item() == pytest.approx(sum(ce(HC[i], Y[i]) for i in range(4)) / 4, rel=1e-6)
    assert not any(k.startswith("kd_") for k in parts)
    assert parts["ce_head_on_aug"] == pytest.approx((ce(HC[1], 2) + ce(HC[3], 1)) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="uses no robust teacher"):
        distill_loss("apt", z, y, aug, None, torch.tensor(TR_FULL))


def test_variants_registry_and_teacher_masks_cover_every_loss():
    aug = torch.tensor(AUG)
    assert set(VARIANTS) == {"three-head", "three-head-no-kd", "single-teacher", "only-kd", "combined-head", "apt"}
    assert teacher_masks("apt", aug) == {"clean": None, "robust": None}
    assert teacher_masks("three-head-no-kd", aug) == {"clean": None, "robust": None}
    m = teacher_masks("combined-head", aug)
    assert torch.equal(m["clean"], ~aug) and torch.equal(m["robust"], aug)


def test_bf16_logits_are_scored_in_float32():
    heads, y, aug = batch(requires_grad=False)
    half = {h: z.to(torch.bfloat16) for h, z in heads.items()}  # these small integers are exact in bf16
    loss, _ = three_head_loss(half, y, aug, compact(TC_FULL, ~aug).bfloat16(), compact(TR_FULL, aug).bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(three_head_by_hand(), rel=1e-6)


# -------------------------------------------------------------------------------- mix_batch


def images(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.arange(b * 2 * 2 * 2, dtype=torch.float32).view(b, 2, 2, 2)
    return clean, -clean - 1  # every augmented value differs from every clean one


@pytest.mark.parametrize("b, a, n", [(10, 0.3, 3), (8, 0.5, 4), (100, 0.29, 29), (6, 1 / 3, 2),
                                     (5, 0.0, 0), (5, 1.0, 5)])
def test_mix_batch_takes_exactly_a_b_rows_when_a_b_is_whole(b, a, n):
    clean, augx = images(b)
    for seed in range(5):
        x, mask = mix_batch(clean, augx, a, torch.Generator().manual_seed(seed))
        assert mask.dtype == torch.bool and mask.shape == (b,)
        assert int(mask.sum()) == n
        assert torch.equal(x[mask], augx[mask]) and torch.equal(x[~mask], clean[~mask])
    if a == 0.0:
        assert torch.equal(x, clean)
    if a == 1.0:
        assert torch.equal(x, augx)


def test_mix_batch_rounds_stochastically_without_bias():
    clean, augx = images(3)
    gen = torch.Generator().manual_seed(0)
    counts = [int(mix_batch(clean, augx, 0.5, gen)[1].sum()) for _ in range(4000)]
    assert set(counts) == {1, 2}
    assert sum(counts) / len(counts) == pytest.approx(1.5, abs=0.05)  # E[n] = aB = 1.5


def test_mix_batch_is_seeded():
    clean, augx = images(16)
    x1, m1 = mix_batch(clean, augx, 0.5, torch.Generator().manual_seed(7))
    x2, m2 = mix_batch(clean, augx, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    masks = {tuple(mix_batch(clean, augx, 0.5, torch.Generator().manual_seed(s))[1].tolist()) for s in range(10)}
    assert len(masks) > 1  # the positions are drawn, not fixed
    # every position is chosen sometimes: a uniform subset, not a prefix
    gen = torch.Generator().manual_seed(1)
    hits = sum(mix_batch(clean, augx, 0.25, gen)[1].long() for _ in range(200))
    assert bool((hits > 0).all())


def test_mix_batch_bad_input():
    clean, augx = images(4)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"a \(fraction of augmented samples\) must be a number in \[0, 1\]"):
        mix_batch(clean, augx, 1.5, gen)
    with pytest.raises(ValueError, match="must match in shape"):
        mix_batch(clean, augx[:3], 0.5, gen)
    with pytest.raises(TypeError, match="torch.Generator"):
        mix_batch(clean, augx, 0.5, 0)
