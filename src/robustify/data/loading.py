"""Manifest-backed image loading for training and evaluation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: 16/32-bit greyscale is rescaled (a plain convert would clip),
    alpha is composited on white, CMYK/P/L go through PIL's conversions."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        hi = 65535.0 if im.mode.startswith("I;16") else max(1.0, float(im.getextrema()[1]))
        im = im.convert("I").point(lambda v: v * (255.0 / hi)).convert("L")
    elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(im)


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
