"""DeepAugment (SPEC §3): Noise2Net, and EDSR / CAE with randomly perturbed weights and activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustify.augment import deepaugment as da
from robustify.augment.cae import CAE, LAYERS, load_cae
from robustify.augment.edsr import EDSR, load_edsr
from robustify.augment.noise2net import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Bottleneck,
    apply_noise2net,
    bottleneck,
    noise2net,
    sample_bottleneck,
    sample_noise2net,
)
from robustify.io import save_safetensors

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=gen(seed))


def randomize(net: nn.Module, seed: int) -> nn.Module:
    """Random weights at PyTorch-init scale (the mean shifts are constants and stay)."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "mean" not in name:
                fan_in = p[0].numel() if p.ndim > 1 else 100
                p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)
    return net.eval()


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_unchanged(net: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ================================================================================== Noise2Net
class RefBottle2neck(nn.Module):
    """The reference's Bottle2neck for ONE image, with ordinary (ungrouped) layers and BatchNorm in
    training mode, loaded with that image's slice of a sampled block: an independent re-computation
    of the grouped-conv implementation."""

    def __init__(self, blk: Bottleneck, img: int) -> None:
        super().__init__()
        hid, self.scale = blk.hidden, blk.scale
        self.width = hid
        full = hid * blk.scale
        self.conv1 = nn.Conv2d(3, full, 1, bias=False)
        self.conv1.weight.data = blk.conv1[img * full:(img + 1) * full]
        self.bn1 = nn.BatchNorm2d(full)
        self.convs, self.bns = nn.ModuleList(), nn.ModuleList()
        for c in blk.convs:
            k = c.weight.shape[-1]
            conv = nn.Conv2d(hid, hid, k, padding=(k - 1) // 2 * c.dilation, dilation=c.dilation)
            conv.weight.data = c.weight[img * hid:(img + 1) * hid]
            conv.bias.data = c.bias[img * hid:(img + 1) * hid]
            self.convs.append(conv)
            self.bns.append(nn.BatchNorm2d(hid))
        self.conv3 = nn.Conv2d(full, 3, 1, bias=False)
        self.conv3.weight.data = blk.conv3[img * 3:(img + 1) * 3]
        self.bn3 = nn.BatchNorm2d(3)
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        spx = torch.split(out, self.width, 1)
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            out = sp if i == 0 else torch.cat((out, sp), 1)
        out = torch.cat((out, spx[len(self.convs)]), 1)
        return self.bn3(self.conv3(out))


def test_noise2net_shape_dtype_range():
    x = images()
    y = noise2net(x, gen(0))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.02  # a visible distortion, not a no-op
    y64 = noise2net(x.double(), gen(0))
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y, atol=1e-6)


def test_noise2net_seeded_and_redrawn_per_call():
    x = images()
    a, b = noise2net(x, gen(3)), noise2net(x, gen(3))
    assert torch.equal(a, b)
    g = gen(3)
    first, second = noise2net(x, g), noise2net(x, g)
    assert torch.equal(first, a)
    assert (first - second).abs().max() > 0.05  # a new network on the second call


def test_noise2net_is_residual_of_sampled_blocks():
    """out = clamp(denormalise(z4)), z_{k+1} = z_k + ε·block_k(z_k), ε ∈ [max_eps/2, max_eps]."""
    x, max_eps = images(1), 0.6
    sample = sample_noise2net(2, gen(5), max_eps=max_eps)
    out = noise2net(x, gen(5), max_eps=max_eps)
    assert torch.equal(out, apply_noise2net(x, sample))
    assert max_eps / 2 <= sample.eps <= max_eps and len(sample.blocks) == 4
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        for img in range(2):
            z = (x[img:img + 1] - mean) / std
            for blk in sample.blocks:
                z = z + sample.eps * RefBottle2neck(blk, img)(z)
            expected = (z * std + mean).clamp(0, 1)
            assert torch.allclose(out[img:img + 1], expected, atol=1e-5)


def test_noise2net_eps_is_uniform_in_half_range():
    g = gen(11)
    eps = [sample_noise2net(1, g, max_eps=0.6, hidden=1, scale=1, blocks=1).eps for _ in range(60)]
    assert all(0.3 <= e <= 0.6 for e in eps)
    assert min(eps) < 0.33 and max(eps) > 0.57  # spans the range


def test_noise2net_block_ends_normalised():
    """The block ends in a training-mode BatchNorm on a batch of one: every (image, channel) of its
    output has mean 0 and variance v/(v + 1e-5) over H×W."""
    z = torch.randn(2, 3, 16, 16, generator=gen(2))
    out = bottleneck(z, sample_bottleneck(2, gen(4)))
    assert torch.allclose(out.mean((2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(out.var((2, 3), unbiased=False), torch.ones(2, 3), atol=1e-3)


def test_noise2net_zero_eps_is_identity_and_images_get_own_networks():
    x = images(2)
    assert torch.equal(noise2net(x, gen(0), max_eps=0.0), x)
    twins = x[:1].repeat(2, 1, 1, 1)
    out = noise2net(twins, gen(0))
    assert (out[0] - out[1]).abs().max() > 0.05  # grouped convs: per-image random weights


def test_noise2net_rejects_bad_input():
    with pytest.raises(ValueError, match="max_eps"):
        noise2net(images(), gen(0), max_eps=-0.1)
    with pytest.raises(ValueError, match="batch size"):
        apply_noise2net(images(), sample_noise2net(3, gen(0)))


# ======================================================================================= EDSR
@pytest.fixture()
def edsr(tmp_path):
    net = randomize(EDSR(n_feats=8, scale=2), 0)
    path = tmp_path / "edsr_tiny_x2.pt"
    torch.save(net.state_dict(), path)
    return net, path


def test_edsr_checkpoint_roundtrip(edsr, tmp_path):
    net, path = edsr
    lr = images(1, 16) * 255
    loaded = load_edsr(path)
    assert (loaded.n_resblocks, loaded.n_feats, loaded.scale) == (16, 8, 2)
    with torch.no_grad():
        assert torch.equal(loaded(lr), net(lr))
        assert net(lr).shape == (2, 3, 32, 32)
    # safetensors, and an export without the constant mean-shift convs
    state = {k: v for k, v in net.state_dict().items() if "mean" not in k}
    save_safetensors(tmp_path / "edsr.safetensors", state)
    with torch.no_grad():
        assert torch.equal(load_edsr(tmp_path / "edsr.safetensors")(lr), net(lr))


def test_edsr_refuses_wrong_checkpoints(edsr, tmp_path):
    net, _ = edsr
    state = net.state_dict()
    torch.save({k: v for k, v in state.items() if k != "body.3.body.2.bias"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"missing keys \['body\.3\.body\.2\.bias'\]"):
        load_edsr(tmp_path / "a.pt")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra\.weight'\]"):
        load_edsr(tmp_path / "b.pt")
    torch.save({**state, "body.0.body.0.weight": torch.zeros(8, 8, 5, 5)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"body\.0\.body\.0\.weight: \(8, 8, 5, 5\) \(expected \(8, 8, 3, 3\)\)"):
        load_edsr(tmp_path / "c.pt")
    torch.save([1, 2], tmp_path / "d.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_edsr(tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="nowhere/edsr.pt"):
        load_edsr(tmp_path / "nowhere" / "edsr.pt")


def test_edsr_distortion_is_seeded_and_functional(edsr):
    net, _ = edsr
    x, before = images(), snapshot(net)
    with torch.no_grad():
        a = da.run_edsr(net, x, da.sample_edsr(net, gen(7)))
        b = da.run_edsr(net, x, da.sample_edsr(net, gen(7)))
        c = da.run_edsr(net, x, da.sample_edsr(net, gen(8)))
        plain = da.run_edsr(net, x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - plain).abs().max() > 1e-3
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert_unchanged(net, before)


@pytest.mark.parametrize("op", range(17))
def test_edsr_every_weight_op_changes_output_not_net(edsr, op):
    net, _ = edsr
    x, before = images(), snapshot(net)
    d = da.sample_edsr(net, gen(op), weight_ops=[op], pre=4, body=5)
    assert d.weights and all(k.startswith("body.") for k in d.weights)
    with torch.no_grad():
        assert not torch.equal(da.run_edsr(net, x, d), da.run_edsr(net, x))
    assert_unchanged(net, before)


@pytest.mark.parametrize(("pre", "body"), [(1, 5), (2, 5), (3, 5), (4, 1), (4, 2), (4, 3), (4, 4)])
def test_edsr_every_activation_op_changes_output(edsr, pre, body):
    net, _ = edsr
    x = images()
    d = da.sample_edsr(net, gen(pre * 10 + body), weight_ops=[], pre=pre, body=body)
    assert d.weights == {}
    with torch.no_grad():
        assert not torch.equal(da.run_edsr(net, x, d), da.run_edsr(net, x))


def test_edsr_weight_ops_do_what_the_reference_does(edsr):
    net, _ = edsr
    w = dict(net.named_parameters())
    key = "body.{}.body.{}.{}".format
    d = da.sample_edsr(net, gen(0), weight_ops=[1])  # negate block i's first conv, i ∈ {1, 4, 7}
    (i,), = d.info["blocks"]
    assert i in (1, 4, 7) and set(d.weights) == {key(i, 0, "weight"), key(i, 0, "bias")}
    assert torch.equal(d.weights[key(i, 0, "weight")], -w[key(i, 0, "weight")])
    d = da.sample_edsr(net, gen(0), weight_ops=[4])  # × the Laplacian kernel
    (i,), = d.info["blocks"]
    new, old = d.weights[key(i, 0, "weight")], w[key(i, 0, "weight")]
    assert torch.equal(new[..., 0, 0], torch.zeros(8, 8)) and torch.equal(new[..., 1, 1], -4 * old[..., 1, 1])
    assert torch.equal(new[..., 0, 1], old[..., 0, 1])
    d = da.sample_edsr(net, gen(0), weight_ops=[0])  # flip both convs' output channels
    (i,), = d.info["blocks"]
    assert i in (0, 3, 6, 9) and len(d.weights) == 4
    assert torch.equal(d.weights[key(i, 2, "bias")], w[key(i, 2, "bias")].flip(0))
    d = da.sample_edsr(net, gen(1), weight_ops=[15])  # negate up to F/2 whole filters, 5 convs drawn
    (blocks,) = d.info["blocks"]
    for k, v in d.weights.items():
        sign = (v / w[k]).flatten(1)  # ±1, constant over each filter
        assert torch.equal(sign.abs(), torch.ones_like(sign)) and torch.equal(sign, sign[:, :1].expand_as(sign))
        assert int((sign[:, 0] < 0).sum()) <= 4 * blocks.count(int(k.split(".")[1]))
    assert any(not torch.equal(v, w[k]) for k, v in d.weights.items())
    d = da.sample_edsr(net, gen(2), weight_ops=[16])  # keep only each kernel's largest tap
    for v in d.weights.values():
        assert int((v.flatten(2) != 0).sum(-1).max()) <= 1


def test_edsr_activation_ops_do_what_the_reference_does(edsr):
    net, _ = edsr
    d = da.sample_edsr(net, gen(3), weight_ops=[], pre=1, body=5)
    t = torch.arange(8.0).view(1, 8, 1, 1).repeat(2, 1, 4, 4)
    expected = t.clone()
    for c1, c2 in d.info["copies"]:  # the reference's tuple "swap" of two views
        expected[:, c1], expected[:, c2] = expected[:, c2], expected[:, c1]
    assert torch.equal(d.hooks["pre"](t), expected)
    ones = torch.ones(1, 8, 64, 64)
    kept = da.sample_edsr(net, gen(4), weight_ops=[], pre=2, body=5).hooks["pre"](ones)
    assert set(kept.unique().tolist()) == {0.0, 1.0} and abs(kept.mean().item() - 0.95) < 0.01
    signs = da.sample_edsr(net, gen(5), weight_ops=[], pre=3, body=5).hooks["pre"](ones)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs((signs > 0).float().mean().item() - 0.975) < 0.01
    # body 4: the reference feeds x to every non-skipped layer, so the last kept one alone counts
    lr = images(6, 16) * 255
    d = da.sample_edsr(net, gen(9), weight_ops=[], pre=4, body=4)
    last = max(i for i in range(17) if i not in d.info["skip"])
    with torch.no_grad():
        h = net.head(net.sub_mean(lr))
        expected = net.add_mean(net.tail(net.body[last](h) + h))
        assert torch.allclose(net(lr, body=d.hooks["body"]), expected, atol=1e-4)
        negated = net.add_mean(net.tail(net.body[5:](-net.body[:5](h)) + h))
        d = da.sample_edsr(net, gen(9), weight_ops=[], pre=4, body=1)
        assert torch.allclose(net(lr, body=d.hooks["body"]), negated, atol=1e-4)


def test_edsr_distortions_need_the_reference_depth():
    with pytest.raises(ValueError, match="blocks 0-15"):
        da.sample_edsr(EDSR(n_resblocks=4, n_feats=8, scale=2), gen(0))
    with pytest.raises(ValueError, match="out of range"):
        da.sample_edsr(EDSR(n_feats=8, scale=2), gen(0), weight_ops=[17])


# ======================================================================================== CAE
@pytest.fixture(scope="module")
def cae_net():
    return randomize(CAE(), 1)


@pytest.fixture()
def cae(cae_net, tmp_path):
    path = tmp_path / "model_final.state"
    torch.save(cae_net.state_dict(), path)
    return cae_net, path


def test_cae_checkpoint_roundtrip(cae):
    net, path = cae
    x = images()
    loaded = load_cae(path)
    assert set(loaded.state_dict()) == {f"{layer}.{t}" for layer in LAYERS for t in ("weight", "bias")}
    with torch.no_grad():
        out = loaded(x, gen(0))
        assert out.shape == x.shape and torch.equal(out, net(x, gen(0)))
        assert not torch.equal(out, net(x, gen(1)))  # the binarisation draws from the generator


def test_cae_refuses_wrong_checkpoints(cae, tmp_path):
    net, _ = cae
    torch.save({k: v for k, v in net.state_dict().items() if k != "d_block_2.4.bias"}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"missing keys \['d_block_2\.4\.bias'\]"):
        load_cae(tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="no/model_final.state"):
        load_cae(tmp_path / "no" / "model_final.state")


def _cae_pair(net: CAE, x: torch.Tensor, d: da.Distortion) -> tuple[torch.Tensor, torch.Tensor]:
    """(distorted, undistorted) outputs with the same binarisation bits."""
    bits = torch.Generator()
    bits.set_state(d.hooks["gen"].get_state())
    with torch.no_grad():
        return da.run_cae(net, x, None, d), da.run_cae(net, x, bits)


def test_cae_distortion_is_seeded_and_functional(cae_net):
    x, before = images(), snapshot(cae_net)
    with torch.no_grad():
        a = da.run_cae(cae_net, x, None, da.sample_cae(cae_net, gen(7)))
        b = da.run_cae(cae_net, x, None, da.sample_cae(cae_net, gen(7)))
        c = da.run_cae(cae_net, x, None, da.sample_cae(cae_net, gen(8)))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert_unchanged(cae_net, before)


@pytest.mark.parametrize("op", range(8))
def test_cae_every_weight_op_changes_output_not_net(cae_net, op):
    x, before = images(), snapshot(cae_net)
    d = da.sample_cae(cae_net, gen(op), weight_op=op, latent_op=8)
    d.hooks.pop("latent")  # isolate the weight distortion
    assert d.weights and all(i in da.CAE_OP_LAYERS[op] for i in d.info["layers"])
    distorted, plain = _cae_pair(cae_net, x, d)
    assert not torch.equal(distorted, plain)
    assert_unchanged(cae_net, before)


@pytest.mark.parametrize("op", range(9))
def test_cae_every_latent_op_changes_output(cae_net, op):
    x = images()
    d = da.sample_cae(cae_net, gen(op), weight_op=0, latent_op=op)
    d.weights.clear()  # isolate the activation distortion
    distorted, plain = _cae_pair(cae_net, x, d)
    assert not torch.equal(distorted, plain)


def test_cae_weight_ops_do_what_the_reference_does(cae_net):
    w = dict(cae_net.named_parameters())
    d = da.sample_cae(cae_net, gen(0), weight_op=0)  # layer i flipped; the reference's j is a no-op
    (i,) = d.info["layers"]
    name = LAYERS[i]
    assert set(d.weights) == {f"{name}.weight", f"{name}.bias"}
    assert torch.equal(d.weights[f"{name}.bias"], w[f"{name}.bias"].flip(0))
    d = da.sample_cae(cae_net, gen(1), weight_op=7)  # negate ≤ out/5 distinct filters
    ((key, v),) = d.weights.items()
    negated = (v.flatten(1) != w[key].flatten(1)).any(1)
    assert torch.equal(v[negated], -w[key][negated]) and 1 <= int(negated.sum()) <= w[key].shape[0] // 5
    d = da.sample_cae(cae_net, gen(2), weight_op=6)  # rot90 of the kernels
    ((key, v),) = d.weights.items()
    assert any(torch.equal(v, torch.rot90(w[key], k, (2, 3))) for k in (1, 2, 3))


def test_cae_latent_ops_do_what_the_reference_does(cae_net):
    def hook(op, seed=0):
        d = da.sample_cae(cae_net, gen(seed), weight_op=0, latent_op=op)
        return d, d.hooks.get("latent")

    ones = torch.ones(2, 32, 64, 64)
    _, h = hook(1)  # one spatial mask for every image and channel, 80 % kept
    m = h(ones)
    assert torch.equal(m, m[:1, :1].expand_as(m)) and abs(m.mean().item() - 0.8) < 0.03
    _, h = hook(2)  # ±1, 90 % +1
    m = h(ones)
    assert torch.equal(m, m[:1, :1].expand_as(m)) and abs((m > 0).float().mean().item() - 0.9) < 0.03
    t = torch.arange(32.0).view(1, 32, 1, 1).repeat(2, 1, 3, 3)
    _, h = hook(3)  # permute the first ten channels
    out = h(t)
    assert sorted(out[0, :10, 0, 0].tolist()) == list(range(10)) and torch.equal(out[:, 10:], t[:, 10:])
    z = torch.randn(2, 32, 6, 6, generator=gen(1))
    d, h = hook(5)  # every channel flipped over H, W or both
    assert d.info["flip"] in ([2], [3], [2, 3]) and torch.equal(h(z), z.flip(d.info["flip"]))
    d, h = hook(4)  # five channel draws, flipped in turn
    expected = z.clone()
    for ch in d.info["channels"]:
        expected[:, ch] = expected[:, ch].flip([k - 1 for k in d.info["flip"]])
    assert torch.equal(h(z), expected)
    eye = torch.zeros(32, 32, 3, 3)
    eye[range(32), range(32), 1, 1] = 1
    d, _ = hook(6)  # identity conv + U(±0.1) noise
    assert (d.info["kernel"] - eye).abs().max() <= 0.1 and not torch.equal(d.info["kernel"], eye)
    d, _ = hook(8)  # each channel shifted by one of the 3×3 offsets
    k = d.info["kernel"]
    assert torch.equal(k.sum((1, 2, 3)), torch.ones(32)) and torch.equal(k[range(32), range(32)].sum((1, 2)), torch.ones(32))
    d, _ = hook(7)  # identity plus, for about half the channels, a 1 tapping a random channel
    k = d.info["kernel"]
    assert torch.equal(k[range(32), range(32), 1, 1], torch.ones(32)) and set(k.unique().tolist()) == {0.0, 1.0}
    assert 32 < int(k.sum()) <= 64
    d = da.sample_cae(cae_net, gen(0), weight_op=0, latent_op=0)  # code scaled by 3 + 4u·U[0,1)
    scaled = d.hooks["code"](ones)
    assert scaled.min() >= 3 and scaled.max() < 7


# ================================================================================ batch API
def test_deepaugment_defaults_to_noise2net():
    x = images()
    aug = da.DeepAugment()
    assert aug.params == {"kind": "noise2net", "weights": None, "max_eps": 0.75}
    assert torch.equal(aug(x, gen(0)), noise2net(x, gen(0)))


def test_deepaugment_with_weights(edsr, cae):
    (enet, epath), (cnet, cpath) = edsr, cae
    x = images(3, 30)  # 30 is a multiple of neither EDSR's ×2 nor the CAE's 4
    aug = da.DeepAugment("edsr", epath)
    out = aug(x, gen(2))
    assert out.shape == x.shape and torch.equal(out, aug(x, gen(2)))
    with torch.no_grad():
        assert torch.equal(out, da.run_edsr(enet, x, da.sample_edsr(enet, gen(2))))
    aug = da.DeepAugment("cae", cpath)
    out = aug(x, gen(2))
    assert out.shape == x.shape and torch.equal(out, aug(x, gen(2)))
    with torch.no_grad():
        assert torch.equal(out, da.run_cae(cnet, x, None, da.sample_cae(cnet, gen(2))))


def test_deepaugment_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="one of"):
        da.DeepAugment("pixmix")
    with pytest.raises(ValueError, match="needs pretrained EDSR weights"):
        da.DeepAugment("edsr")
    with pytest.raises(ValueError, match="takes no weights"):
        da.DeepAugment("noise2net", tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="cae.state"):
        da.DeepAugment("cae", tmp_path / "cae.state")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        da.DeepAugment()(torch.rand(3, 8, 8), gen(0))
    with pytest.raises(ValueError, match="generator"):
        da.run_cae(CAE(), images(), None)
