"""Training data for the fine-tuning loop: an in-memory split, or one streamed from image files.

The loop (`methods.finetune`) draws the batch of step t as `batch_indices(seed, t, n, batch_size)`
(a DDP rank takes its slice), normalises it on the device and augments it there. Both sources here
give it exactly that batch as uint8 images, so a run is the same function of (seed, step) whichever
source feeds it, and a resumed run continues with the same batches:

- `ImageData` holds the split as one N×3×H×W uint8 tensor (the mini-world's 6000 32-px images are
  18 MB); a step's batch is an index into it.
- `StreamingImages` keeps only the paths and labels; DataLoader worker processes decode, resize
  (shortest side) and centre-crop each image to `size` as uint8 — open_clip's eval preprocessing
  without its float conversion — and a batch sampler over the steps [start, stop) hands them each
  step's indices. ImageNet's 1.28M 224-px images (193 GB as uint8) cannot be held; streamed, the
  workers overlap decoding with the accelerator's step.

`make_train_data` picks one by the bytes the split would take decoded. Both implement `TrainSource`,
the only view the loop has of its data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from robustify.data.images import load_rgb
from robustify.methods.schedules import batch_indices

DEFAULT_MAX_MEMORY = 8 << 30  # bytes of decoded uint8 images held in memory before streaming instead
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


def rank_batch(seed: int, step: int, n: int, batch_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The indices of step `step`'s batch that DDP rank `rank` of `world` trains on (its contiguous
    slice of the global batch, the same on resume)."""
    idx = batch_indices(seed, step, n, batch_size)
    per_rank = batch_size // world
    return idx[rank * per_rank:(rank + 1) * per_rank]


def _normalise(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               device: str | torch.device) -> torch.Tensor:
    x = images_uint8.to(device, non_blocking=True).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class TrainSource(Protocol):
    """What the loop needs of a split: its size and labels, per-step uint8 batches, normalisation on
    the device, and in-order normalised batches (validation, LP's cached features)."""

    labels: torch.Tensor  # N int64 labels, in memory (cheap even for ImageNet)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int: ...

    def normalise(self, images_uint8: torch.Tensor, device: str | torch.device) -> torch.Tensor: ...

    def step_batches(self, seed: int, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1,
                     device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of `rank_batch(seed, t, ...)` for t = start, ..., stop-1, on the CPU."""
        ...

    def batches(self, batch_size: int, device: str | torch.device, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) on `device`, in order over items rank, rank+world, ..."""
        ...


# ------------------------------------------------------------------------------------ in memory
@dataclass
class ImageData:
    """An in-memory split: N×3×H×W uint8 images and their labels, normalised per batch."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be an N×3×H×W uint8 tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def normalise(self, images_uint8: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        return _normalise(images_uint8, self.mean, self.std, device)

    def step_batches(self, seed: int, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1,
                     device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start, stop):
            idx = rank_batch(seed, step, len(self), batch_size, rank, world)
            yield self.images[idx], self.labels[idx]

    def batches(self, batch_size: int, device: str | torch.device, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if world == 1:  # plain slices: no index copy
            for i in range(0, len(self), batch_size):
                yield self.normalise(self.images[i:i + batch_size], device), self.labels[i:i + batch_size].to(device)
            return
        idx = torch.arange(rank, len(self), world)
        for i in range(0, len(idx), batch_size):
            sel = idx[i:i + batch_size]
            yield self.normalise(self.images[sel], device), self.labels[sel].to(device)


# ------------------------------------------------------------------------------------ streamed
@dataclass(frozen=True)
class ResizeCrop:
    """Decode → RGB → Resize(shortest side = size) → CenterCrop(size) → 3×size×size uint8 (open_clip's
    eval preprocessing up to, not including, the float conversion; torchvision's PIL ops)."""

    size: int
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got '{self.interpolation}'")

    def __call__(self, path: str) -> torch.Tensor:
        image = load_rgb(path)
        image = T.functional.resize(image, self.size, INTERPOLATIONS[self.interpolation])
        image = T.functional.center_crop(image, [self.size, self.size])
        array = np.asarray(image, dtype=np.uint8).reshape(self.size, self.size, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


class DecodedImages(Dataset):
    """(3×size×size uint8 image, label) of item i, decoded from its file (an unreadable file raises,
    naming it: the manifest's rejects were screened when the dataset was prepared).

    The paths are one numpy bytes array, not a list of str: forked workers read a list's objects and
    so touch their refcounts, copying the pages (~100 MB per worker for ImageNet's 1.28M paths)."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, decode: ResizeCrop) -> None:
        self.paths = np.array([os.fsencode(str(p)) for p in paths], dtype=np.bytes_)
        self.labels, self.decode = labels, decode

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.fsdecode(bytes(self.paths[i]))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.path(i)
        try:
            image = self.decode(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RuntimeError(f"{path}: cannot decode training image: {e}") from e
        return image, self.labels[i]


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler yielding the indices of the steps [start, stop) that one DDP rank trains on."""

    def __init__(self, seed: int, start: int, stop: int, n: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.seed, self.start, self.stop, self.n = seed, start, stop, n
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield rank_batch(self.seed, step, self.n, self.batch_size, self.rank, self.world).tolist()


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL's; torch threads in a worker would only contend


def _loader(dataset: DecodedImages, batch_sampler: Any, workers: int, device: str | torch.device,
            prefetch_factor: int = 2) -> DataLoader:
    """Batches of `dataset` in the order `batch_sampler` gives; pinned for a CUDA destination."""
    options: dict[str, Any] = {}
    if workers > 0:
        options = {"prefetch_factor": prefetch_factor, "worker_init_fn": _single_threaded_worker}
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda", **options)


class StreamingImages:
    """A split decoded from its files on the fly by `workers` DataLoader processes (0 = in this
    process); the same batches, normalisation and labels as the `ImageData` of the same files."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor | Sequence[int], size: int,
                 mean: Sequence[float], std: Sequence[float], workers: int = 4, interpolation: str = "bicubic",
                 prefetch_factor: int = 2) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(paths) != self.labels.shape[0]:
            raise ValueError(f"{len(paths)} paths but {self.labels.shape[0]} labels")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.size, self.workers, self.prefetch_factor = int(size), int(workers), int(prefetch_factor)
        self.dataset = DecodedImages(paths, self.labels, ResizeCrop(self.size, interpolation))

    def __len__(self) -> int:
        return len(self.dataset)

    def normalise(self, images_uint8: torch.Tensor, device: str | torch.device) -> torch.Tensor:
        return _normalise(images_uint8, self.mean, self.std, device)

    def step_batches(self, seed: int, start: int, stop: int, batch_size: int, rank: int = 0, world: int = 1,
                     device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One loader over all the steps: its workers decode ahead while the device trains."""
        sampler = StepSampler(seed, start, stop, len(self), batch_size, rank, world)
        yield from _loader(self.dataset, sampler, self.workers, device, self.prefetch_factor)

    def batches(self, batch_size: int, device: str | torch.device, rank: int = 0,
                world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = list(range(rank, len(self), world))
        chunks = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
        for images, labels in _loader(self.dataset, chunks, self.workers, device, self.prefetch_factor):
            yield self.normalise(images, device), labels.to(device)


def decode_all(paths: Sequence[str], size: int, workers: int = 0, interpolation: str = "bicubic",
               batch_size: int = 256) -> torch.Tensor:
    """N×3×size×size uint8 of `paths`, decoded exactly as `StreamingImages` decodes them (in parallel
    by `workers` processes)."""
    dataset = DecodedImages(paths, torch.zeros(len(paths), dtype=torch.long), ResizeCrop(size, interpolation))
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    i = 0
    chunks = [list(range(j, min(j + batch_size, len(paths)))) for j in range(0, len(paths), batch_size)]
    for images, _ in _loader(dataset, chunks, workers, "cpu"):
        out[i:i + len(images)] = images
        i += len(images)
    return out


def make_train_data(paths: Sequence[str], labels: torch.Tensor | Sequence[int], size: int, mean: Sequence[float],
                    std: Sequence[float], workers: int | None = None, max_memory_bytes: int = DEFAULT_MAX_MEMORY,
                    interpolation: str = "bicubic") -> ImageData | StreamingImages:
    """The split as `ImageData` when its decoded uint8 images (N·3·size² bytes) fit in
    `max_memory_bytes`, else as `StreamingImages`; both decode the files identically (resize the
    shortest side to `size`, centre-crop), so the choice changes memory, not a run's result. The
    in-memory split is decoded here, by the same worker processes.

    `workers` = decode processes (None: all cores but one, at most 8); `interpolation` = the model's
    preprocessing (`open_clip.get_model_preprocess_cfg(clip)["interpolation"]`).
    """
    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(0, min(8, cores - 1))
    labels = torch.tensor(np.asarray(labels), dtype=torch.long)  # a copy: pandas hands out read-only arrays
    if len(paths) * 3 * size * size <= max_memory_bytes:
        images = decode_all(paths, size, workers, interpolation)
        return ImageData(images, labels, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return StreamingImages(paths, labels, size, mean, std, workers, interpolation)
