"""Manifest-backed image loading for training and evaluation (decoding itself: `data.images`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from robustify.data.images import load_rgb, to_rgb  # noqa: F401  (re-exported: the loaders' default)


class ManifestImages(torch.utils.data.Dataset):
    """(image tensor, label) pairs from the `path`/`label` columns of a manifest."""

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: Callable[[Image.Image], torch.Tensor],
        loader: Callable[[str], Image.Image] = load_rgb,
    ) -> None:
        self.paths = frame["path"].tolist()
        self.labels = frame["label"].to_numpy(dtype=np.int64)
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.loader(self.paths[i])), int(self.labels[i])


def load_uint8_stack(paths: list[str]) -> torch.Tensor:
    """Decode equally sized images into one N×3×H×W uint8 tensor (small worlds fit in memory)."""
    first = np.asarray(load_rgb(paths[0]))
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    for i, p in enumerate(paths):
        arr = np.asarray(load_rgb(p))
        if arr.shape != first.shape:
            raise ValueError(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}, expected {first.shape[1]}x{first.shape[0]}")
        out[i] = arr
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
