"""Contrastive pre-training: it learns, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from robustify.config import ModelSpec, PretrainConfig
from robustify.methods.pretrain_clip import PairData, batch_indices, pretrain
from robustify.models.clip import create_clip, tokenizer

CFG = PretrainConfig(
    model="t", dataset="miniworld", steps=6, batch_size=8, lr=2e-3, weight_decay=0.1,
    warmup_steps=2, shift_px=2, checkpoint_every=3,
)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _data() -> PairData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    words = ["circle", "square", "star", "heart"]
    tokens = tokenizer("tinyclip-rn32")([f"a photo of a {words[i % 4]}." for i in range(40)])
    return PairData(images, tokens)


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return create_clip(ModelSpec("open_clip", "tinyclip-rn32", None))


def test_batches_cover_each_epoch_without_replacement():
    per_epoch = 40 // 8
    seen = torch.cat([batch_indices(0, s, 40, 8) for s in range(per_epoch)])
    assert sorted(seen.tolist()) == list(range(40))
    assert not torch.equal(batch_indices(0, 0, 40, 8), batch_indices(0, per_epoch, 40, 8))


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    data = _data()
    full = _model()
    pretrain(full, data, CFG, seed=0, mean=MEAN, std=STD)

    # Crash right after the step-3 checkpoint (while scheduling step 4), then restart.
    import robustify.methods.pretrain_clip as mod

    class Crash(Exception):
        pass

    schedule = mod.warmup_cosine

    def crashing_schedule(step, *args):
        if step == 3:
            raise Crash
        return schedule(step, *args)

    resume = tmp_path / "resume.pt"
    monkeypatch.setattr(mod, "warmup_cosine", crashing_schedule)
    with pytest.raises(Crash):
        pretrain(_model(), data, CFG, seed=0, mean=MEAN, std=STD, resume_path=resume, fingerprint="f")
    monkeypatch.setattr(mod, "warmup_cosine", schedule)
    assert resume.exists()

    resumed = _model()
    summary = pretrain(resumed, data, CFG, seed=0, mean=MEAN, std=STD, resume_path=resume, fingerprint="f")
    assert summary["steps_run"] == 3 and not resume.exists()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resume_state_of_other_params_is_ignored(tmp_path):
    data = _data()
    resume = tmp_path / "resume.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 5, "fingerprint": "other"}, resume)
    summary = pretrain(_model(), data, CFG, seed=0, mean=MEAN, std=STD, resume_path=resume, fingerprint="mine")
    assert summary["steps_run"] == CFG.steps


def test_loss_decreases_on_learnable_pairs():
    # Images whose colour determines the caption: a few dozen steps must beat the initial loss.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 4
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.uint8)
    images = colours[labels][:, :, None, None].expand(64, 3, 32, 32).clone()
    images = (images.int() + torch.randint(-20, 20, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    words = ["red", "green", "blue", "yellow"]
    tokens = tokenizer("tinyclip-rn32")([f"a {words[i]} image" for i in labels.tolist()])
    cfg = dataclasses.replace(CFG, steps=60, batch_size=16, warmup_steps=5, checkpoint_every=1000)
    losses = []
    pretrain(_model(), PairData(images, tokens), cfg, seed=0, mean=MEAN, std=STD,
             log_metrics=lambda m, s: losses.append(m["loss"]))
    # An untrained model sits at ln(batch) = 2.77; with four captions the floor is ln(4) = 1.39.
    assert losses[-1] < 0.75 * math.log(16)
