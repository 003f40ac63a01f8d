"""Uncertainty-aware head selection (paper Eq. 6), its ablations, MC-dropout passes and F_correct."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from robustify.eval.head_selection import HeadSelectionTally, head_selection_rows, metric_names
from robustify.eval.schema import COLUMNS
from robustify.methods.distill.selection import (
    HEADS, RULES, MCStudent, expects_unclean, f_correct, kl_divergence, mc_dropout, mc_head_outputs, mc_predict,
    select_heads,
)

# --------------------------------------------------------------------------- constructed distributions


def passes(mean: Sequence[float], delta: Sequence[float]) -> torch.Tensor:
    """Two MC passes mean ± delta for one sample: (2, 1, classes); population std per class = |delta|."""
    m, d = torch.tensor(mean, dtype=torch.float64), torch.tensor(delta, dtype=torch.float64)
    return torch.stack([m + d, m - d])[:, None, :]


def sample(clean, unclean, combined) -> dict[str, torch.Tensor]:
    return {"clean": passes(*clean), "unclean": passes(*unclean), "combined": passes(*combined)}


def batch(*samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {h: torch.cat([s[h] for s in samples], dim=1) for h in HEADS}


# clean head certain and equal to the combined head, unclean head uncertain (true class 0)
CLEAN_CERTAIN = sample(([0.8, 0.1, 0.1], [0.01, -0.01, 0.0]), ([0.4, 0.3, 0.3], [0.2, -0.2, 0.0]),
                       ([0.8, 0.1, 0.1], [0.0, 0.0, 0.0]))
# the mirror: unclean certain and equal to combined, clean uncertain (true class 2; clean predicts 0)
UNCLEAN_CERTAIN = sample(([0.4, 0.3, 0.3], [0.2, -0.2, 0.0]), ([0.1, 0.1, 0.8], [0.0, 0.01, -0.01]),
                         ([0.1, 0.1, 0.8], [0.0, 0.0, 0.0]))
# paper §4.3.2: the clean head breaks down — confidently wrong (class 1), far from the combined head —
# while the unclean head is less certain but close to combined (true class 0)
BREAKDOWN = sample(([0.02, 0.96, 0.02], [0.005, -0.005, 0.0]), ([0.7, 0.2, 0.1], [0.05, -0.05, 0.0]),
                   ([0.8, 0.1, 0.1], [0.0, 0.0, 0.0]))


def test_clean_certain_and_agreeing_selects_clean_under_every_rule():
    for rule in RULES:
        assert select_heads(CLEAN_CERTAIN, rule).choice.tolist() == [0], rule


def test_mirror_case_selects_unclean_under_every_rule():
    for rule in RULES:
        assert select_heads(UNCLEAN_CERTAIN, rule).choice.tolist() == [1], rule


def test_clean_breakdown_eq6_picks_unclean_but_uncertainty_alone_picks_clean():
    ours = select_heads(BREAKDOWN, "ours")
    assert ours.choice.tolist() == [1]
    assert ours.U["clean"].item() < ours.U["unclean"].item()  # the clean head is the more certain one
    assert ours.KL["clean"].item() > 50 * ours.KL["unclean"].item()
    assert select_heads(BREAKDOWN, "no_kl").choice.tolist() == [0]
    assert select_heads(BREAKDOWN, "no_uncertainty").choice.tolist() == [1]
    assert select_heads(BREAKDOWN, "max_logit").choice.tolist() == [0]  # 0.96 > 0.7: confidence is fooled
    torch.testing.assert_close(ours.probs, torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_hand_computed_two_class_statistics():
    # clean passes (0.95, 0.05), (0.65, 0.35): mean (0.8, 0.2), std 0.15 in both classes → U_c = 0.15
    # unclean passes (0.5, 0.5), (0.3, 0.7): mean (0.4, 0.6), std 0.1 → U_u = 0.1
    # combined passes both (0.7, 0.3)
    probs = sample(([0.8, 0.2], [0.15, -0.15]), ([0.4, 0.6], [0.1, -0.1]), ([0.7, 0.3], [0.0, 0.0]))
    kl_c = 0.7 * math.log(0.7 / 0.8) + 0.3 * math.log(0.3 / 0.2)
    kl_u = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert kl_c == pytest.approx(0.0281676, abs=1e-7) and kl_u == pytest.approx(0.1837869, abs=1e-7)
    sel = select_heads(probs, "ours")
    assert sel.U["clean"].item() == pytest.approx(0.15, abs=1e-12)
    assert sel.U["unclean"].item() == pytest.approx(0.1, abs=1e-12)
    assert sel.KL["clean"].item() == pytest.approx(kl_c, abs=1e-12)
    assert sel.KL["unclean"].item() == pytest.approx(kl_u, abs=1e-12)
    # 0.15·0.02817 = 0.00423 < 0.1·0.18379 = 0.01838 → clean; U alone (0.1 < 0.15) → unclean
    assert sel.choice.tolist() == [0]
    assert select_heads(probs, "no_kl").choice.tolist() == [1]
    assert select_heads(probs, "no_uncertainty").choice.tolist() == [0]
    assert select_heads(probs, "max_logit").choice.tolist() == [0]  # 0.8 > 0.6
    torch.testing.assert_close(sel.probs, torch.tensor([[0.8, 0.2]], dtype=torch.float64), rtol=0, atol=1e-15)


def test_batch_mixes_choices_per_sample_and_ties_go_to_clean():
    tie = sample(([0.5, 0.3, 0.2], [0.1, -0.1, 0.0]), ([0.5, 0.3, 0.2], [0.1, -0.1, 0.0]),
                 ([0.5, 0.3, 0.2], [0.1, -0.1, 0.0]))
    probs = batch(CLEAN_CERTAIN, BREAKDOWN, tie, UNCLEAN_CERTAIN)
    sel = select_heads(probs, "ours")
    assert sel.choice.dtype == torch.int64 and sel.choice.tolist() == [0, 1, 0, 1]
    assert sel.U["clean"].shape == (4,) and sel.KL["unclean"].shape == (4,)
    means = {h: probs[h].mean(0) for h in HEADS}
    torch.testing.assert_close(sel.probs, torch.stack([means["clean"][0], means["unclean"][1],
                                                       means["clean"][2], means["unclean"][3]]))
    for rule in RULES:
        assert select_heads(tie, rule).choice.tolist() == [0], rule


def test_kl_divergence_zero_probabilities_stay_finite():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    kl = kl_divergence(p, q)
    assert kl[0].item() == 0.0  # 0·log(0/0) = 0
    assert math.isfinite(kl[1].item()) and kl[1].item() > 300  # q = 0 where p > 0: floored, huge, finite


def test_select_heads_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown rule 'entropy'"):
        select_heads(CLEAN_CERTAIN, "entropy")
    with pytest.raises(ValueError, match=r"missing \['combined'\]"):
        select_heads({"clean": CLEAN_CERTAIN["clean"], "unclean": CLEAN_CERTAIN["unclean"]})
    with pytest.raises(ValueError, match="one shape"):
        select_heads({**CLEAN_CERTAIN, "combined": CLEAN_CERTAIN["combined"].repeat(2, 1, 1)})
    with pytest.raises(ValueError, match="not logits"):
        select_heads({**CLEAN_CERTAIN, "unclean": torch.log(CLEAN_CERTAIN["unclean"])})
    one_pass = {h: v[:1] for h, v in CLEAN_CERTAIN.items()}
    with pytest.raises(ValueError, match="needs >= 2 MC passes"):
        select_heads(one_pass, "ours")
    assert select_heads(one_pass, "no_uncertainty").choice.tolist() == [0]  # no U: one pass is enough


# --------------------------------------------------------------------------- F_correct


def test_f_correct_on_known_choices():
    choice = torch.tensor([0, 0, 1, 1, 1])
    assert f_correct(choice, expected_unclean=False) == 2 / 5
    assert f_correct(choice, expected_unclean=True) == 3 / 5
    assert f_correct(torch.tensor([True, False, True, True]), expected_unclean=True) == 3 / 4
    with pytest.raises(ValueError, match="no samples"):
        f_correct(torch.tensor([], dtype=torch.long), True)


def test_expected_head_from_shift_type():
    assert expects_unclean("reference") is False
    assert expects_unclean("corruption") is True and expects_unclean("domain") is True
    with pytest.raises(ValueError, match="shift_type"):
        expects_unclean(None)


# --------------------------------------------------------------------------- result rows


def three_samples() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # choices: ours/no_uncertainty [0, 1, 1]; no_kl/max_logit [0, 0, 1] (the breakdown sample)
    return torch.tensor([0, 0, 2]), batch(CLEAN_CERTAIN, BREAKDOWN, UNCLEAN_CERTAIN)


def test_rows_schema_names_and_values_on_a_shifted_set():
    labels, probs = three_samples()
    ctx = {"model_id": "m", "method": "distill", "eval_dataset": "miniworld-c", "corruption": None}
    df = head_selection_rows(ctx, labels, probs, shift_type="corruption")
    assert list(df.columns) == list(COLUMNS)
    assert df["metric"].tolist() == metric_names()
    assert set(df["shift_type"]) == {"corruption"} and set(df["n"]) == {3} and set(df["model_id"]) == {"m"}
    v = dict(zip(df["metric"], df["value"]))
    assert v == {
        "accuracy_select_ours": 1.0, "accuracy_select_no_kl": 2 / 3,
        "accuracy_select_no_uncertainty": 1.0, "accuracy_select_max_logit": 2 / 3,
        "f_correct_ours": 2 / 3, "f_correct_no_kl": 1 / 3,
        "f_correct_no_uncertainty": 2 / 3, "f_correct_max_logit": 1 / 3,
        "accuracy_head_clean": 1 / 3, "accuracy_head_unclean": 1.0, "accuracy_head_combined": 1.0,
    }


def test_rows_on_the_reference_set_count_clean_choices_and_batching_does_not_matter():
    labels, probs = three_samples()
    ctx = {"model_id": "m", "eval_dataset": "miniworld-photo", "shift_type": "reference"}
    whole = head_selection_rows(ctx, labels, probs, rules=("ours", "no_kl"))
    v = dict(zip(whole["metric"], whole["value"]))
    assert v["f_correct_ours"] == 1 / 3 and v["f_correct_no_kl"] == 2 / 3
    assert "accuracy_select_max_logit" not in v
    tally = HeadSelectionTally(("ours", "no_kl"))
    tally.update(labels[:2], {h: p[:, :2] for h, p in probs.items()})
    tally.update(labels[2:], {h: p[:, 2:] for h, p in probs.items()})
    split = tally.rows(ctx)
    assert split["value"].tolist() == whole["value"].tolist() and set(split["n"]) == {3}


def test_rows_reject_bad_input():
    labels, probs = three_samples()
    with pytest.raises(ValueError, match="disagrees"):
        head_selection_rows({"shift_type": "reference"}, labels, probs, shift_type="domain")
    with pytest.raises(ValueError, match="shift_type"):
        head_selection_rows({}, labels, probs)
    with pytest.raises(ValueError, match="rules must be"):
        HeadSelectionTally(("ours", "vote"))
    with pytest.raises(ValueError, match="batch 3, labels 2"):
        head_selection_rows({}, labels[:2], probs, shift_type="domain")


# --------------------------------------------------------------------------- MC passes


class TinyStudent(nn.Module):
    """Frozen Linear prefix (with a dropout that must stay off), shared Linear + BatchNorm + Dropout,
    three Linear heads; counts prefix and tunable calls."""

    def __init__(self, p: float = 0.5, prefix_p: float = 0.9, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.prefix = nn.Linear(4, dim)
        self.prefix_drop = nn.Dropout(prefix_p)
        self.shared = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Dropout(p))
        self.heads = nn.ModuleDict({h: nn.Linear(dim, classes) for h in HEADS})
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
        self.prefix.requires_grad_(False)
        self.prefix_calls = self.tunable_calls = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.prefix_calls += 1
        with torch.no_grad():
            return self.prefix_drop(self.prefix(x))

    def forward_from_features(self, features: torch.Tensor, heads: Sequence[str]) -> dict[str, torch.Tensor]:
        self.tunable_calls += 1
        z = self.shared(features)
        return {h: self.heads[h](z) for h in heads}


def inputs(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1))


def test_tiny_student_satisfies_the_protocol():
    assert isinstance(TinyStudent(), MCStudent)


def test_prefix_runs_once_and_tunable_part_n_passes_times():
    student = TinyStudent()
    out = mc_predict(student, inputs(), n_passes=7, gen=torch.Generator().manual_seed(0))
    assert (student.prefix_calls, student.tunable_calls) == (1, 7)
    assert set(out) == set(HEADS) and all(v.shape == (7, 6, 5) and v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["clean"].sum(-1), torch.ones(7, 6))


def test_passes_differ_with_dropout_and_are_identical_without():
    out = mc_predict(TinyStudent(p=0.5), inputs(), n_passes=4, gen=torch.Generator().manual_seed(0))
    for h in HEADS:
        assert not torch.equal(out[h][0], out[h][1]), h
    student = TinyStudent(p=0.0)
    out = mc_predict(student, inputs(), n_passes=4, gen=torch.Generator().manual_seed(0))
    student.eval()
    with torch.no_grad():  # deterministic output; also shows the prefix's dropout (p=0.9) was off
        expected = student.forward_from_features(student.prefix(inputs()), HEADS)
    for h in HEADS:
        assert all(torch.equal(out[h][i], out[h][0]) for i in range(4)), h
        assert torch.equal(out[h][0], expected[h].softmax(-1))


def test_same_generator_seed_gives_identical_outputs():
    student, x = TinyStudent(), inputs()
    a = mc_predict(student, x, n_passes=5, gen=torch.Generator().manual_seed(3))
    b = mc_predict(student, x, n_passes=5, gen=torch.Generator().manual_seed(3))
    c = mc_predict(student, x, n_passes=5, gen=torch.Generator().manual_seed(4))
    assert all(torch.equal(a[h], b[h]) for h in HEADS)
    assert not torch.equal(a["clean"], c["clean"])
    gen = torch.Generator().manual_seed(3)  # one draw per call: the next batch gets other masks
    first, second = (mc_predict(student, x, n_passes=5, gen=gen)["clean"] for _ in range(2))
    assert torch.equal(first, a["clean"]) and not torch.equal(first, second)


def test_global_rng_state_is_unchanged():
    student, x = TinyStudent(), inputs()  # nn.Linear's default init draws from the global RNG
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = mc_predict(student, x, n_passes=3, gen=torch.Generator().manual_seed(0))
    assert not torch.equal(out["clean"][0], out["clean"][1])  # dropout did draw random masks
    assert torch.equal(torch.get_rng_state(), before)


def test_modes_restored_and_batchnorm_statistics_untouched():
    student = TinyStudent()
    student.train()
    student.heads["clean"].eval()  # a mixed state must come back exactly
    modes = {name: m.training for name, m in student.named_modules()}
    bn = student.shared[1]
    running = bn.running_mean.clone()
    with mc_dropout(student):
        assert student.shared[3].training and student.prefix_drop.training
        assert not any(m.training for m in student.modules() if not isinstance(m, nn.Dropout))
    assert {name: m.training for name, m in student.named_modules()} == modes
    mc_head_outputs(student, torch.randn(6, 16, generator=torch.Generator().manual_seed(2)), 3,
                    gen=torch.Generator().manual_seed(0))
    mc_predict(student, inputs(), 3, gen=torch.Generator().manual_seed(0))
    assert {name: m.training for name, m in student.named_modules()} == modes
    assert torch.equal(bn.running_mean, running)  # BatchNorm ran in eval mode
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(student):
        raise RuntimeError("boom")
    assert {name: m.training for name, m in student.named_modules()} == modes


def test_mc_head_outputs_rejects_bad_input():
    student, f = TinyStudent(), torch.randn(6, 16)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="n_passes must be >= 1"):
        mc_head_outputs(student, f, 0, gen=gen)
    student.forward_from_features = lambda feats, heads: {"clean": torch.zeros(6, 5)}  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"missing \['unclean', 'combined'\]"):
        mc_head_outputs(student, f, 2, gen=gen)
    with pytest.raises(TypeError, match="nn.Module"):
        mc_head_outputs(object(), f, 2, gen=gen)  # type: ignore[arg-type]
