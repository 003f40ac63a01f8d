"""The frozen prefix's features of every clean training image, computed once per run (paper §4.1: the
backbone is frozen, so they never change; SPEC §3 cost metrics).

Only clean rows read the cache: an augmented row is a new image every step (AugMix / DeepAugment
draws) and goes through the prefix. A clean row is the same image every epoch provided the loop
applies no random augmentation to it, which the method checks (`augment: none`).

Why fill it up front rather than on first sight: the features are then the same tensors whatever
the step, and a resumed run recomputes them in the same batches, so resume stays exact; it is also
what LP's cached features do in the loop (`finetune._cached_features`), and like those the one
pass is run time outside the per-step training cost. The pass costs one prefix forward per training
image, repaid after two epochs at a = 0.5.

The store is one tensor (N × feature shape, in the features' dtype) on `device`, CPU by default: a
ViT-L/14@224 prefix output is 257×1024 floats = 1 MB per image, so it suits training sets that fit
in memory (not ImageNet at that size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

Prefix = Callable[[torch.Tensor], torch.Tensor]


class PrefixCache:
    """Prefix features of dataset rows `0..n-1` (`store[i]` is row i's)."""

    def __init__(self, store: torch.Tensor) -> None:
        self.store = store

    @classmethod
    def fill(cls, prefix: Prefix, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int,
             device: str | torch.device = "cpu") -> PrefixCache:
        """Run `prefix` over `batches` (normalised images in dataset order, as `TrainSource.batches`
        yields them) and keep the outputs."""
        parts = [prefix(x).to(device) for x, _ in batches]
        store = torch.cat(parts) if parts else torch.empty(0)
        if store.shape[0] != n:
            raise ValueError(f"the training set has {n} rows but its batches gave {store.shape[0]} prefix outputs")
        return cls(store)

    def __len__(self) -> int:
        return int(self.store.shape[0])

    def nbytes(self) -> int:
        return self.store.numel() * self.store.element_size()

    def features(self, prefix: Prefix, images: torch.Tensor, indices: torch.Tensor,
                 cached: torch.Tensor) -> torch.Tensor:
        """The prefix output of every row: rows flagged `cached` (clean images) from the store, the
        others computed by `prefix` in one call."""
        indices, cached = indices.cpu(), cached.cpu()
        if indices.shape[0] != images.shape[0] or cached.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {indices.shape[0]} indices / {cached.shape[0]} flags")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ValueError(f"dataset indices must lie in [0, {len(self)}), got {int(indices.min())}..{int(indices.max())}")
        if not bool(cached.any()):
            return prefix(images)
        out = self.store[indices].to(images.device, non_blocking=True)
        rest = (~cached).nonzero().squeeze(1).to(images.device)
        if rest.numel():
            out[rest] = prefix(images[rest]).to(out.dtype)
        return out
