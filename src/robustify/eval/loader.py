"""The evaluation input pipeline: little CPU per image in the workers, the rest once per batch.

On a CPU with few cores the forward pass and the decode workers share the cores, and the forward's
OpenMP threads split each op statically: while a worker holds a core, the forward waits for it. The
decode work is therefore not hidden behind the forward but added to it (benchmarks/eval_throughput.py
on 2 cores: 0, 1 or 2 workers measure the same), so what decoding costs is its CPU per image. On a
GPU the decode workers are the bottleneck outright. Hence, as timm's `PrefetchLoader` does:
- workers produce uint8 tensors; float conversion and normalisation run once per batch on the
  evaluation device (on a GPU that also moves 4x fewer bytes to it);
- a standard eval transform (Resize(short side) → CenterCrop → ToTensor → Normalize, as timm and
  open_clip build it) is fused: PIL's two resampling passes are run by hand, each only over the
  crop's source span, so the ~40% of the resized image that the crop discards is never computed.
  PIL takes the source box as float32, which moves a filter weight by an ulp now and then: a pixel
  differs by 1/255 from the reference pipeline on ~0.01% of values. (One `resize(box=...)` with
  both offsets fractional disagrees with resize-then-crop on portrait images in Pillow 13 — by up to
  3/255 on photos, 20/255 on noise —, hence two calls.) `fuse=False`, or any other transform, keeps
  the transform as given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader

from robustify.data.loading import ManifestImages, load_rgb

TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's, and timm's/open_clip's tensor-passthrough variant
CONVERT_MODE = ("MaybeConvertMode",)  # open_clip: PIL .convert(mode)


def default_eval_workers(device: str | torch.device) -> int:
    """One decode worker on CPU (it overlaps file reads with the forward; more only preempt the
    forward's threads), up to 8 on an accelerator, where the CPU does nothing but decode."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.device(device).type == "cpu":
        return 1 if cores > 1 else 0
    return max(1, min(8, cores - 1))


def resized_size(width: int, height: int, size: int | Sequence[int]) -> tuple[int, int]:
    """(w, h) that torchvision's `Resize(size)` gives: an int sets the short side, the long side is truncated."""
    if not isinstance(size, int) and len(size) == 2:
        return int(size[1]), int(size[0])
    short = size if isinstance(size, int) else int(size[0])
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


@dataclass(frozen=True)
class ResizeCropUint8:
    """Resize → CenterCrop → RGB uint8 C×H×W tensor, with the crop folded into the resize.

    `fallback` (the reference PIL transform up to the crop) serves the cases the fused path does not
    reproduce: a crop larger than the resized image, which torchvision zero-pads.
    """

    size: int | tuple[int, ...]
    crop: tuple[int, int]  # (h, w), torchvision's order
    resample: int
    mode: str | None
    fallback: Callable[[Image.Image], Image.Image]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        nw, nh = resized_size(w, h, self.size)
        ch, cw = self.crop
        if ch > nh or cw > nw:
            out = self.fallback(image)
        else:  # PIL's two passes (horizontal, then vertical), each only over the crop's source span;
            # an axis PIL would not resample (same size) is just cropped, as PIL's resize leaves it
            top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            sx, sy = w / nw, h / nh
            out = (image.crop((left, 0, left + cw, h)) if nw == w
                   else image.resize((cw, h), self.resample, box=(left * sx, 0, (left + cw) * sx, h)))
            out = (out.crop((0, top, cw, top + ch)) if nh == h
                   else out.resize((cw, ch), self.resample, box=(0, top * sy, cw, (top + ch) * sy)))
        if self.mode is not None and out.mode != self.mode:  # after the crop, where open_clip converts
            out = out.convert(self.mode)
        return torch.from_numpy(np.array(out, dtype=np.uint8, copy=True).reshape(out.size[1], out.size[0], -1)).permute(2, 0, 1)


@dataclass(frozen=True)
class BatchNormalize:
    """uint8 N×C×H×W → float32 `(x/255 - mean) / std`, as one multiply-add on the batch."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        return torch.addcmul(-mean / std, x.float(), 1.0 / (255.0 * std))


def split_eval_transform(transform: Any) -> tuple[ResizeCropUint8, BatchNormalize] | None:
    """(per-image uint8 part, per-batch normalisation) equivalent to a standard eval `transform`,
    or None when it is anything else (the caller then applies it unchanged)."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 4 or not isinstance(steps[0], T.Resize) or not isinstance(steps[1], T.CenterCrop):
        return None
    mode = None
    rest = steps[2:]
    if type(rest[0]).__name__ in CONVERT_MODE:
        mode, rest = getattr(rest[0], "mode", "RGB"), rest[1:]
    if len(rest) != 2 or type(rest[0]).__name__ not in TO_TENSOR or not isinstance(rest[1], T.Normalize):
        return None
    resize, crop, norm = steps[0], steps[1], rest[1]
    if resize.max_size is not None or resize.interpolation not in TF.pil_modes_mapping or not resize.antialias:
        return None
    size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
    if not isinstance(size, int) and len(size) not in (1, 2):
        return None
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
    if len(mean) != 3 or len(std) != 3 or norm.inplace:
        return None
    fallback = T.Compose(steps[:2])
    return ResizeCropUint8(size, tuple(crop.size), TF.pil_modes_mapping[resize.interpolation], mode, fallback), BatchNormalize(mean, std)


class EvalLoader:
    """Batches `(x, y)` on `device`, `x` float and normalised, in manifest order."""

    def __init__(self, loader: DataLoader[Any], device: torch.device, normalize: BatchNormalize | None) -> None:
        self.loader, self.device, self.normalize = loader, device, normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=non_blocking)
            yield (self.normalize(x) if self.normalize is not None else x), y


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # DataLoader does this too; kept explicit since the cores are shared


def make_eval_loader(
    frame: pd.DataFrame,
    transform: Any,
    batch_size: int,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    load_image: Callable[[str], Image.Image] = load_rgb,
    prefetch_factor: int = 4,
    persistent_workers: bool = False,
    fuse: bool = True,
) -> EvalLoader:
    """In-order evaluation batches of `frame`'s `path`/`label` rows through `transform`.

    `workers=None` picks `default_eval_workers(device)`. `fuse=False` keeps the reference transform
    bit for bit (float tensors built in the workers). Batches are pinned only for CUDA; a deep
    prefetch absorbs slow files; `persistent_workers` only pays when the loader is iterated again.
    """
    device = torch.device(device)
    if workers is None:
        workers = default_eval_workers(device)
    parts = split_eval_transform(transform) if fuse else None
    per_image, normalize = parts if parts is not None else (transform, None)
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers, "worker_init_fn": _single_threaded_worker}
    loader = DataLoader(
        ManifestImages(frame, per_image, load_image), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", **options,
    )
    return EvalLoader(loader, device, normalize)
