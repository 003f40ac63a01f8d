"""Evaluation throughput: end-to-end (JPEG files → loader → logits) against the pure forward pass.

Generates a deterministic folder of JPEGs (sizes 300-500 px, smooth content with texture, closer to
photos than noise) in a temp dir, then evaluates a random-init timm `resnet18` (eval mode, CPU) with
timm's eval transform (bicubic resize 256, centre crop 224) through
`robustify.eval.loader.make_eval_loader`. The pure-forward reference runs the same model on the same
batches, decoded beforehand and held in memory. Passes alternate (forward, end-to-end, ...) and each
side reports its best pass, as `timeit` does: on a shared machine other processes only ever slow a
pass down, so the fastest pass is the closest estimate of the code's own speed. Each pass also shows
the CPU share other processes took and the decode workers' CPU per image (robust to that noise).

Settings (2 cores): torch keeps 2 threads (1 thread halves the forward: the ratio rises, the
throughput falls); 1 decode worker (0, 1 and 2 measure the same — see eval/loader.py for why);
batch 32; prefetch 4; no pinned memory on CPU. `--reference` adds the unfused transform's pass.
Target: end-to-end / pure-forward >= 0.85. Last line: `RESULT eval_efficiency <r> x`.

    python benchmarks/eval_throughput.py [--images 512] [--batch-size 32] [--workers N] [--threads N] [--reference]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from robustify.config import ModelSpec
from robustify.eval.loader import EvalLoader, default_eval_workers, make_eval_loader
from robustify.models.timm_models import create_timm, timm_transform


def make_images(root: Path, n: int, seed: int = 0, classes: int = 10) -> pd.DataFrame:
    """`n` JPEGs (quality 90) under `root/<class>/`; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(300, 501, size=2))
        coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        texture = rng.normal(0.0, 10.0, size=(h, w, 1)).astype(np.float32)
        image = Image.fromarray(np.clip(smooth + texture, 0, 255).astype(np.uint8))
        label = i % classes
        path = root / f"class_{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=90)
        rows.append({"path": str(path), "label": label})
    return pd.DataFrame(rows)


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class LoadMeter:
    """CPU accounting of one pass. `foreign`: share of the machine that other processes used, from
    /proc/stat minus our own and our reaped workers' rusage — on a shared machine it tells a clean
    pass from a competed one. `workers`: CPU seconds of the DataLoader workers (reaped at the end of
    a pass), which unlike wall time barely depends on what else runs."""

    def __enter__(self) -> LoadMeter:
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, main, workers = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        cores = os.cpu_count() or 1
        self.workers = workers
        self.foreign = max(0.0, (busy - main - workers) / (wall * cores)) if wall > 0 else float("nan")

    @staticmethod
    def _sample() -> tuple[float, float, float, float]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        except (OSError, ValueError):
            busy = float("nan")
        return time.perf_counter(), busy, _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)


@torch.inference_mode()
def forward_all(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in batches:
        model(x)
    return time.perf_counter() - start


@torch.inference_mode()
def end_to_end(model: torch.nn.Module, loader: EvalLoader) -> float:
    start = time.perf_counter()  # worker start-up is part of the cost of an evaluation
    for x, _ in loader:
        model(x)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: make_eval_loader's choice)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the main process (default: torch's)")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also time the unfused reference transform end to end")
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    workers = default_eval_workers("cpu") if a.workers is None else a.workers

    with tempfile.TemporaryDirectory(prefix="eval-throughput-") as tmp:
        t0 = time.perf_counter()
        frame = make_images(Path(tmp), a.images)
        print(f"generated {len(frame)} JPEGs in {time.perf_counter() - t0:.1f} s")
        model = create_timm(ModelSpec("timm", "resnet18"), init_seed=0)
        transform = timm_transform(model, crop_pct=0.875)

        def loader(fuse: bool = True) -> EvalLoader:
            return make_eval_loader(frame, transform, a.batch_size, workers, prefetch_factor=a.prefetch, fuse=fuse)

        batches, worst, differing = [], 0.0, 0
        to_levels = torch.as_tensor(transform.transforms[-1].std).view(1, 3, 1, 1) * 255  # normalised → 1/255 steps
        for (x, _), (ref, _) in zip(loader(), loader(fuse=False), strict=True):
            batches.append(x)
            diff = (x - ref).abs() * to_levels
            worst, differing = max(worst, diff.max().item()), differing + int((diff > 0.01).sum())
        print(f"fused vs reference transform: max |diff| {worst:.2f}/255, on {differing / (len(frame) * 3 * 224 * 224):.4%} of values")
        forward_all(model, batches[:1])  # warm-up: oneDNN primitive creation, allocator
        print(f"torch threads {torch.get_num_threads()}, workers {workers}, batch {a.batch_size}, prefetch {a.prefetch}")
        runs: dict[str, list[float]] = {"pure forward": [], "end-to-end": []} | ({"end-to-end, reference transform": []} if a.reference else {})
        for r in range(a.repeats):
            line = []
            for name, times in runs.items():
                with LoadMeter() as load:
                    seconds = forward_all(model, batches) if name == "pure forward" else end_to_end(model, loader(fuse=name == "end-to-end"))
                times.append(len(frame) / seconds)
                decode = f", workers {load.workers / len(frame) * 1e3:.1f} ms CPU/img" if name != "pure forward" else ""
                line.append(f"{name} {times[-1]:.1f} img/s (others {load.foreign:.0%} CPU{decode})")
            print(f"  repeat {r}: " + ", ".join(line))
    for name, times in runs.items():
        print(f"{name}: {max(times):.1f} img/s (best of {a.repeats}; median {statistics.median(times):.1f})")
    ratio = max(runs["end-to-end"]) / max(runs["pure forward"])
    print(f"RESULT eval_efficiency {ratio:.3f} x")


if __name__ == "__main__":
    main()
