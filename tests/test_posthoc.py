"""Post-hoc methods (SPEC §2): WiSE-FT, TPGM / TPGM-C, model soups, greedy ensemble."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustify.config import ModelSpec
from robustify.methods.posthoc import (
    POSTHOC, accuracy, alphas, greedy_ensemble, greedy_soup, interpolate, output_ensemble, tpgm, tpgm_c,
    uniform_soup,
)
from robustify.methods.posthoc.tpgm import delta_norms
from robustify.models.clip import create_clip
from robustify.models.zeroshot import ImageClassifier, ZeroShotHead

N_CLASSES = 5


pytestmark = pytest.mark.usefixtures("single_thread")


def random_head(seed: int, dim: int = 64) -> ZeroShotHead:
    gen = torch.Generator().manual_seed(seed)
    weight = F.normalize(torch.randn(dim, N_CLASSES, generator=gen), dim=0)
    return ZeroShotHead(weight, math.log(10.0))


@pytest.fixture(scope="module")
def visual() -> nn.Module:
    return create_clip(ModelSpec("open_clip", "tinyclip-rn32"), init_seed=0).visual


@pytest.fixture()
def clip_pair(visual):
    """θ0: tiny CLIP tower + zero-shot head; θ1: every weight and BN buffer moved, one tensor kept."""
    m0 = ImageClassifier(copy.deepcopy(visual), random_head(0)).eval()
    m1 = copy.deepcopy(m0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m1.named_parameters():
            if name != "encoder.bn1.bias":  # an unchanged parameter (Δ = 0)
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in m1.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1)
            elif name.endswith("running_var"):
                b.mul_(1.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(6)
    return m0, m1


def test_wise_endpoints_are_exact(clip_pair):
    m0, m1 = clip_pair
    t0, t1 = m0.state_dict(), m1.state_dict()
    assert not torch.equal(t0["encoder.bn1.running_var"], t1["encoder.bn1.running_var"])
    for alpha, ref in ((0.0, t0), (1.0, t1)):
        out = interpolate(t0, t1, alpha)
        assert out.keys() == ref.keys()
        for key in ref:
            assert out[key].dtype == ref[key].dtype, key
            assert torch.equal(out[key], ref[key]), (alpha, key)


def test_wise_midpoint_is_the_hand_average(clip_pair):
    m0, m1 = clip_pair
    t0, t1 = m0.state_dict(), m1.state_dict()
    out = interpolate(t0, t1, 0.5)
    for key in t0:
        if t0[key].is_floating_point():
            torch.testing.assert_close(out[key], 0.5 * t0[key] + 0.5 * t1[key], rtol=1e-6, atol=1e-7)
    assert out["head.weight"].shape == (64, N_CLASSES)  # the head is interpolated too
    assert int(out["encoder.bn1.num_batches_tracked"]) == 3  # (0 + 6) / 2, integer buffer stays int64
    assert out["encoder.bn1.num_batches_tracked"].dtype == torch.int64
    assert int(interpolate(t0, t1, 0.3)["encoder.bn1.num_batches_tracked"]) == 2  # round(1.8)


def test_wise_rejects_mismatched_states(clip_pair):
    m0, m1 = clip_pair
    t0, t1 = m0.state_dict(), m1.state_dict()
    del t1["head.logit_scale"]
    with pytest.raises(ValueError, match="head.logit_scale"):
        interpolate(t0, t1, 0.5)
    t1 = dict(m1.state_dict(), **{"head.weight": torch.zeros(64, 3)})
    with pytest.raises(ValueError, match="head.weight"):
        interpolate(t0, t1, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        interpolate(t0, m1.state_dict(), 1.5)


def test_alpha_sweep_is_exact_decimals():
    sweep = alphas()
    assert len(sweep) == 11 and sweep[0] == 0.0 and sweep[-1] == 1.0
    assert sweep[3] == 0.3 and sweep[7] == 0.7  # not 0.30000000000000004
    assert alphas(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        alphas(0.3)


def test_lc_wise_equals_output_ensemble(visual):
    """Same encoder, different linear heads: weight interpolation == output-space ensemble."""
    m0 = ImageClassifier(copy.deepcopy(visual), random_head(0)).eval()
    m1 = ImageClassifier(copy.deepcopy(visual), random_head(1)).eval()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mix = copy.deepcopy(m0)
    with torch.no_grad():
        z0, z1 = m0(x), m1(x)
        assert (z0 - z1).abs().max() > 0.1
        for alpha in (0.3, 0.5, 0.9):
            mix.load_state_dict(interpolate(m0.state_dict(), m1.state_dict(), alpha))
            torch.testing.assert_close(mix(x), output_ensemble(z0, z1, alpha), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- TPGM
def labelled_batches(model: nn.Module, seed: int, n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """Random images labelled by `model`'s own predictions (where that model is right)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, 3, 32, 32, generator=gen) for _ in range(n)]
    with torch.no_grad():
        return [(x, model(x).argmax(dim=1)) for x in xs]


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_tpgm_projection_respects_the_radii(clip_pair, norm):
    m0, m1 = clip_pair
    t0, t1 = m0.state_dict(), m1.state_dict()
    template = copy.deepcopy(m0).train()
    before = {k: v.clone() for k, v in template.state_dict().items()}
    out, info = tpgm(template, t0, t1, labelled_batches(m1, 3), norm=norm, steps=30)

    assert template.training  # mode restored, weights untouched
    assert all(torch.equal(before[k], v) for k, v in template.state_dict().items())
    assert out.keys() == t1.keys()
    assert "head.weight" in info["gamma"] and "encoder.bn1.bias" not in info["gamma"]
    assert torch.equal(out["encoder.bn1.bias"], t0["encoder.bn1.bias"])  # Δ = 0: not projected
    for key in ("encoder.bn1.running_var", "encoder.bn1.num_batches_tracked", "head.logit_scale"):
        assert torch.equal(out[key], t1[key])  # buffers come from θ1
    active = 0
    for name, gamma in info["gamma"].items():
        moved = delta_norms(out[name] - t0[name], norm)
        full = delta_norms(t1[name] - t0[name], norm)
        assert (moved <= gamma * (1 + 1e-5) + 1e-7).all(), name
        assert (moved <= full * (1 + 1e-5) + 1e-7).all(), name  # never past θ1
        active += bool((moved < 0.9 * full).any())
    assert active > 0
    assert math.isfinite(info["final_loss"]) and 0 < info["mean_ratio"] < 1


def test_tpgm_initial_radius_follows_the_reference():
    """steps=0 exposes the init: γ = min(row norms of Δ)/2 over changed rows ("l2": ‖Δ‖/2)."""
    m0 = nn.Linear(3, 3)
    t0 = {k: v.clone() for k, v in m0.state_dict().items()}
    delta = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [4.0, 0.0, 0.0]])  # row L1 norms 0, 2, 4
    t1 = {"weight": t0["weight"] + delta, "bias": t0["bias"].clone()}
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))]
    out, info = tpgm(m0, t0, t1, batches, norm="mars", steps=0)
    assert info["gamma"] == {"weight": pytest.approx(1.0)}  # bias unchanged: not projected
    expected = t0["weight"] + delta * torch.tensor([[1.0], [0.5], [0.25]])
    torch.testing.assert_close(out["weight"], expected)
    out, info = tpgm(m0, t0, t1, batches, norm="l2", steps=0)
    assert info["gamma"]["weight"] == pytest.approx(delta.norm().item() / 2)
    torch.testing.assert_close(out["weight"], t0["weight"] + 0.5 * delta)
    assert info["ratio"]["weight"] == pytest.approx(0.5)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def mlp_setup():
    """θ1 = θ0 + a large random Δ; 'right' labels = θ1's predictions, 'wrong' = θ0's."""
    torch.manual_seed(0)
    m0 = mlp().eval()
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(0.5 * torch.randn_like(p))
        m1[1].running_mean.add_(0.1)
    xs = torch.randn(4, 32, 8)
    with torch.no_grad():
        right = [(x, m1(x).argmax(1)) for x in xs]
        wrong = [(x, m0(x).argmax(1)) for x in xs]
    disagree = sum((a[1] != b[1]).float().mean().item() for a, b in zip(right, wrong, strict=True)) / 4
    assert disagree > 0.3
    return m0, m1, right, wrong


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_tpgm_radii_follow_the_given_batches(mlp_setup, norm):
    """Only the validation batches steer γ: where θ1 is right it stays far, where θ0 is right it shrinks."""
    m0, m1, right, wrong = mlp_setup
    t0, t1 = m0.state_dict(), m1.state_dict()
    _, info_right = tpgm(m0, t0, t1, right, norm=norm)
    _, info_wrong = tpgm(m0, t0, t1, wrong, norm=norm)
    assert info_right["mean_ratio"] > info_wrong["mean_ratio"] + 0.2
    assert info_right["mean_ratio"] > 0.8


@pytest.mark.parametrize("norm", ["l2", "mars"])
def test_tpgm_c_penalty_shrinks_the_radii(mlp_setup, norm):
    m0, m1, right, _ = mlp_setup
    t0, t1 = m0.state_dict(), m1.state_dict()
    _, plain = tpgm(m0, t0, t1, right, norm=norm)
    out, constrained = tpgm_c(m0, t0, t1, right, reg=1.0, norm=norm)
    assert constrained["mean_ratio"] < plain["mean_ratio"] - 0.5
    assert constrained["final_loss"] > plain["final_loss"]  # the price in validation CE
    assert torch.equal(out["1.running_mean"], t1["1.running_mean"])


def test_tpgm_is_deterministic_given_the_seed(mlp_setup):
    m0, m1, right, _ = mlp_setup
    t0, t1 = m0.state_dict(), m1.state_dict()
    a, info_a = tpgm(m0, t0, t1, right, steps=20, seed=5)
    b, info_b = tpgm(m0, t0, t1, right, steps=20, seed=5)
    assert info_a["gamma"] == info_b["gamma"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="norm"):
        tpgm(m0, t0, t1, right, norm="linf")


# ---------------------------------------------------------------------------- soups
def test_uniform_soup_is_the_mean():
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=gen), "n": torch.tensor(v)} for v in (1, 2, 4)]
    soup = uniform_soup(states)
    torch.testing.assert_close(soup["w"], torch.stack([s["w"] for s in states]).mean(0))
    assert soup["n"].dtype == torch.int64 and int(soup["n"]) == 2  # round(7/3)


def test_greedy_soup_adds_only_strict_improvements():
    # Individual accuracies rank the ingredients 1, 3, 2, 0; every average has a distinct value of w.
    states = [{"w": torch.tensor([v])} for v in (0.0, 10.0, 100.0, 1000.0)]
    table = {0.0: 0.5, 10.0: 0.8, 100.0: 0.6, 1000.0: 0.7,
             505.0: 0.8,  # {1, 3}: ties the best → rejected
             55.0: 0.85,  # {1, 2}: strictly better → added
             110.0 / 3: 0.84}  # {1, 2, 0}: worse → rejected
    calls = []

    def heldout_accuracy(state):
        w = float(state["w"])
        calls.append(w)
        (key,) = [k for k in table if abs(k - w) < 1e-4]
        return table[key]

    soup, chosen, trace = greedy_soup(states, heldout_accuracy)
    assert chosen == [1, 2]
    assert float(soup["w"]) == pytest.approx(55.0)
    candidates = [t for t in trace if t["step"] == "candidate"]
    assert [t["index"] for t in candidates] == [3, 2, 0]
    assert [t["added"] for t in candidates] == [False, True, False]
    assert [t["accuracy"] for t in candidates] == [0.8, 0.85, 0.84]
    assert len(calls) == 4 + 3


def test_greedy_ensemble_on_constructed_logits():
    labels = torch.tensor([0, 1, 0, 1])
    a = torch.tensor([[2.0, 0], [0, 2], [2, 0], [1, 0]])  # acc 0.75
    b = torch.tensor([[0.0, 1], [0, 1], [0, 1], [0, 1]])  # acc 0.5; a+b: 0.75 (tie) → rejected
    c = torch.tensor([[0.0, 0.1], [1, 0], [1, 0], [0, 3]])  # acc 0.5; a+c: 1.0 → added
    assert [accuracy(z, labels) for z in (a, b, c)] == [0.75, 0.5, 0.5]
    assert accuracy((a + b) / 2, labels) == 0.75 and accuracy((a + c) / 2, labels) == 1.0
    assert greedy_ensemble([b, c, a], labels) == [2, 1]
    assert greedy_ensemble([b, a], labels) == [1]


def test_registry_names_the_methods():
    assert set(POSTHOC) == {"wise", "tpgm", "tpgm-c", "uniform-soup", "greedy-soup", "greedy-ensemble"}
    assert POSTHOC["wise"] is interpolate and POSTHOC["tpgm-c"] is tpgm_c
