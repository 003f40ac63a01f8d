"""Contrastive pre-training of a small open_clip model on image-caption pairs (the mini-world's CLIP).

The recipe follows open_clip's: symmetric InfoNCE (`open_clip.ClipLoss`) with a learnable
temperature clamped at 100, AdamW without weight decay on gains/biases/temperature, linear warm-up
+ cosine decay. Batches and augmentation draws are pure functions of (seed, step), so a run resumed
from its periodic checkpoint ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch import nn

from robustify.config import PretrainConfig
from robustify.io import atomic_path
from robustify.methods.schedules import batch_indices, step_generator, warmup_cosine

MetricsFn = Callable[[dict[str, float], int], None]


@dataclass
class PairData:
    images: torch.Tensor  # N×3×H×W uint8
    tokens: torch.Tensor  # N×L int64


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def random_shift(images: torch.Tensor, max_px: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_px pixels (reflect-padded), a cheap crop augmentation."""
    if max_px == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_px,) * 4, mode="reflect")
    off = torch.randint(0, 2 * max_px + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off.tolist())])


def pretrain(
    model: nn.Module,
    data: PairData,
    cfg: PretrainConfig,
    seed: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resume_path: Path | None = None,
    log_metrics: MetricsFn | None = None,
    device: str = "cpu",
    fingerprint: str = "",
) -> dict[str, float]:
    """Train `model` in place; returns a summary. Checkpoints to `resume_path` every N steps.

    A resume state is used only if its `fingerprint` (a hash of everything that defines the run)
    matches, so a state left by a run with other parameters is never continued.
    """
    torch.manual_seed(seed)
    # NCHW on purpose: NHWC (channels_last) trains this tower ~18% faster on CPU but rounds differently,
    # so it would change the mini-world's pre-trained weights and every number the README reports; a
    # run with NHWC turned the Lipsum-FT ≥ FT claim (a margin within seed noise) from PASS to FAIL.
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.ClipLoss()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    start = 0
    if resume_path is not None and resume_path.exists():
        state = torch.load(resume_path, map_location=device, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
        else:
            resume_path.unlink()
    n = data.images.shape[0]
    t0, losses = time.perf_counter(), []
    for step in range(start, cfg.steps):
        lr = warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(seed, step, n, cfg.batch_size)
        imgs = random_shift(data.images[idx].float().div_(255), cfg.shift_px, step_generator(seed, 2, step))
        imgs = (imgs.to(device) - mean_t) / std_t
        out = model(imgs, data.tokens[idx].to(device))
        img_f, txt_f, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else out[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        done = step + 1
        if log_metrics is not None and (done % 50 == 0 or done == cfg.steps):
            log_metrics({"loss": float(np.mean(losses[-50:])), "logit_scale": model.logit_scale.exp().item(), "lr": lr}, done)
        if resume_path is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            with atomic_path(resume_path) as tmp:
                torch.save(
                    {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done, "fingerprint": fingerprint},
                    tmp,
                )
    model.eval()
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    return {
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
        "logit_scale": model.logit_scale.exp().item(),
        "train_seconds": time.perf_counter() - t0,
        "steps_run": len(losses),
    }
