"""ImageNet-C corruption speed: the `fast` engine against the `reference` engine (bethgelab's fork).

Single core, as a dataset build runs one process per core: OpenCV, numba and the BLAS/OpenMP pools are
pinned to one thread before anything imports them. Images are `--images` deterministic synthetic
photos-like RGB images of `--size` x `--size` (smooth gradients, shapes, texture — content matters
for shot noise, whose Poisson sampler cost grows with brightness). For every corruption and severity
each engine runs once per image to warm up (numba JIT, texture caches), then `--repeats` timed passes
over the images; a cell is the median pass divided by the number of images (ms/image). Engines
alternate within a pass so that machine noise hits both alike. A row averages the 5 severities.

Speed-up = total reference time over the 15 ImageNet-C corruptions x 5 severities / total fast time
over the same cells (the 4 extra corruptions are listed for information but not in the total).
Then the end-to-end build throughput: `build_shard` (decode the source JPEG, Resize 256, CenterCrop 224,
corrupt, JPEG-encode quality 85, hash, write atomically, manifest) over `--build-images` ImageNet-like
500x375 JPEG sources, every corruption at severity 3, against the JPEG-encode-only bound: encoding
the very same output arrays from memory (what any builder must at least spend). Also printed: the
same build with the decode/resize of the source excluded (the part a builder controls), and the
build as the pipeline runs it: `build_sources` decodes the shard once (timed separately), the 15
shards read that cache; its cost is amortised over the 15 x 5 cells of a full build (cache time /
(images x 75) added per output image).
Last line: `RESULT corruption_speedup <x> x`.

    python benchmarks/corruptions.py [--repeats 5] [--size 224] [--images 3] [--extras]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from robustify.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES  # noqa: E402
from robustify.corruptions.engine import engine_functions  # noqa: E402

cv2.setNumThreads(1)


def make_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`n` deterministic (size, size, 3) uint8 images: low-frequency colour field + discs + grain."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = rng.integers(0, 256, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3), dtype=np.uint8)
        img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(8):
            cy, cx, r = rng.random(3) * [size, size, size / 5]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (r + 4) ** 2] = rng.integers(0, 256, 3)
        img += rng.normal(0.0, 8.0, size=(size, size, 1)).astype(np.float32)
        images.append(np.clip(cv2.GaussianBlur(img, (0, 0), 0.7), 0, 255).astype(np.uint8))
    return images


def time_cell(fns: dict[str, callable], images: list[np.ndarray], severity: int, repeats: int) -> dict[str, float]:
    """Median ms/image per engine for one (corruption, severity)."""
    for fn in fns.values():  # warm-up: JIT compilation, caches
        for i, img in enumerate(images):
            fn(img, severity, i)
    passes: dict[str, list[float]] = {engine: [] for engine in fns}
    for r in range(repeats):
        for engine, fn in fns.items():
            start = time.perf_counter()
            for i, img in enumerate(images):
                fn(img, severity, 1000 * r + i)
            passes[engine].append((time.perf_counter() - start) / len(images) * 1e3)
    return {engine: statistics.median(times) for engine, times in passes.items()}


def build_throughput(n: int, tmp: Path) -> None:
    """ms/image of the real builder vs encoding its outputs only (see the module docstring)."""
    import pandas as pd
    from PIL import Image

    from robustify.corruptions.build import (
        BuildSpec,
        build_shard,
        build_sources,
        encode_jpeg,
        protocol_image,
        sources_paths,
    )
    from robustify.data.registry import get_dataset
    from robustify.io import write_json, write_parquet

    src = tmp / "src"
    rows = []
    for i, img in enumerate(make_images(n, 500)):
        rel = f"c{i % 10}/{i:04d}.JPEG"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:375]).save(src / rel, quality=90)
        rows.append({"path": rel, "label": i % 10, "split": "val"})
    write_parquet(src / "manifest.parquet", pd.DataFrame(rows))
    write_json(src / "dataset.json", {"classes": [f"c{k}" for k in range(10)]})
    dataset = get_dataset("imagefolder", src)
    spec = BuildSpec(dataset="bench", split="val", corruptions=CORRUPTIONS, severities=(3,))
    build_shard(dataset, spec, "fog", 3, 0, tmp / "warm", progress=False)  # numba caches, imports
    start = time.perf_counter()
    uncached = [build_shard(dataset, spec, name, 3, 0, tmp / "out", progress=False) for name in CORRUPTIONS]
    build = (time.perf_counter() - start) / (n * len(CORRUPTIONS)) * 1e3
    # the pipeline's way: decode the shard once, then every cell reads the cache
    start = time.perf_counter()
    build_sources(dataset, spec, 0, tmp / "cached", progress=False)
    cache_s = time.perf_counter() - start
    start = time.perf_counter()
    cached = [build_shard(dataset, spec, name, 3, 0, tmp / "cached", progress=False,
                          sources=sources_paths(tmp / "cached", 0)[0]) for name in CORRUPTIONS]
    from_cache = (time.perf_counter() - start) / (n * len(CORRUPTIONS)) * 1e3
    if not all(a.equals(b) for a, b in zip(uncached, cached)):
        raise SystemExit("build from the sources cache differs from the uncached build")
    amortised = cache_s / (n * len(CORRUPTIONS) * len(SEVERITIES)) * 1e3
    # the builder's share without the source decode/resize: corrupt + encode + hash + write
    from robustify.corruptions.engine import corrupt

    prepared = [protocol_image(dataset, p, spec)[0] for p in dataset.select("val")["path"]]
    start = time.perf_counter()
    outputs = [corrupt(img, name, 3, i) for name in CORRUPTIONS for i, img in enumerate(prepared)]
    corrupt_ms = (time.perf_counter() - start) / len(outputs) * 1e3
    start = time.perf_counter()
    for arr in outputs:
        encode_jpeg(arr, spec.quality)
    encode = (time.perf_counter() - start) / len(outputs) * 1e3
    decode = build - corrupt_ms - encode  # the rest: decode + resize + hash + write + manifest
    print(f"build end to end: {build:.2f} ms/image ({n} 500x375 JPEGs x 15 corruptions, severity 3); "
          f"JPEG-encode-only bound {encode:.2f} ms/image -> {build / encode:.2f}x the bound")
    print(f"  of which corrupt {corrupt_ms:.2f} ms, encode {encode:.2f} ms, decode+resize+write {decode:.2f} ms; "
          f"without the source decode/resize: {(corrupt_ms + encode) / encode:.2f}x the bound")
    cached_build = from_cache + amortised
    print(f"build with the sources cache: {cached_build:.2f} ms/image = {from_cache:.2f} ms from the cache + "
          f"{amortised:.3f} ms decoding once ({cache_s * 1e3 / n:.2f} ms/source over 15 x 5 cells) -> "
          f"{cached_build / encode:.2f}x the bound (uncached {build / encode:.2f}x; "
          f"{build / cached_build:.2f}x faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per cell (median taken)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--images", type=int, default=3, help="different images per pass")
    ap.add_argument("--extras", action="store_true", help="also time the 4 extra corruptions (not in the total)")
    ap.add_argument("--build-images", type=int, default=40, help="source images of the build-throughput run (0: skip)")
    a = ap.parse_args()
    images = make_images(a.images, a.size)
    engines = {engine: engine_functions(engine) for engine in ("reference", "fast")}
    names = CORRUPTIONS + (EXTRA_CORRUPTIONS if a.extras else ())
    print(f"{a.images} images {a.size}x{a.size}, {a.repeats} repeats, single thread; ms/image, mean over severities")
    print(f"{'corruption':<20}{'reference':>11}{'fast':>9}{'speed-up':>10}   fast per severity 1..5")
    totals = {"reference": 0.0, "fast": 0.0}
    for name in names:
        cells = [time_cell({e: fns[name] for e, fns in engines.items()}, images, s, a.repeats) for s in SEVERITIES]
        ref = statistics.fmean(c["reference"] for c in cells)
        fast = statistics.fmean(c["fast"] for c in cells)
        if name in CORRUPTIONS:
            totals["reference"] += sum(c["reference"] for c in cells)
            totals["fast"] += sum(c["fast"] for c in cells)
        per_sev = " ".join(f"{c['fast']:5.2f}" for c in cells)
        extra = "  (extra)" if name not in CORRUPTIONS else ""
        print(f"{name:<20}{ref:11.2f}{fast:9.2f}{ref / fast:9.1f}x   {per_sev}{extra}", flush=True)
    n_cells = len(CORRUPTIONS) * len(SEVERITIES)
    print(f"{'total (15 x 5)':<20}{totals['reference'] / len(SEVERITIES):11.2f}{totals['fast'] / len(SEVERITIES):9.2f}"
          f"   (ms per image through the 15 corruptions at one severity; {n_cells} cells)")
    if a.build_images:
        with tempfile.TemporaryDirectory() as tmp:
            build_throughput(a.build_images, Path(tmp))
    print(f"RESULT corruption_speedup {totals['reference'] / totals['fast']:.2f} x")


if __name__ == "__main__":
    main()
