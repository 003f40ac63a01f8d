"""ImageNet-P-style perturbation-sequence sets (`<dataset>-P`) from any prepared dataset (SPEC §5).

Per source image: RGB (the dataset's loader) → Resize(256) → `make_sequence(..., crop=224)` (geometric
perturbations act before the crop, as in make_imagenet_p.py; `resize`/`crop` null keep the native size)
→ one JPEG "filmstrip" per sequence, the T frames stacked vertically, quality 85 →
`<perturbation>/<class>/<stem>.jpg`. The original stored H.264 videos; a JPEG strip keeps one file per
sequence with ImageNet-C's compression, and frame boundaries fall on JPEG block rows whenever the
frame height is a multiple of 16 (224 and 32 are). Sharding, seeds, atomic outputs and rejects work as
for the -C builder (`build.py`); the manifest's `frames` column says how to cut each strip.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from robustify.corruptions.build import (
    JPEG_QUALITY,
    MAX_PIXELS,
    as_uint8,
    encode_jpeg,
    load_source,
    merge_shards,
    resize_short_side,
    source_items,
    typed_spec,
    with_source_columns,
)
from robustify.corruptions.names import ALL_PERTURBATIONS, perturbation_names
from robustify.corruptions.sequences import DIFFICULTIES, make_sequence
from robustify.data.registry import Dataset
from robustify.io import derive_seed, write_bytes, write_parquet

SHARD_COLUMNS = ("path", "source", "label", "split", "perturbation", "difficulty", "frames", "seed", "sha256",
                 "source_mode", "reject_reason")


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
    """One perturbation-sequence set (the fields mirror `BuildSpec` where they mean the same)."""

    dataset: str
    split: str
    perturbations: tuple[str, ...]
    difficulty: int = 1
    domain: str | None = None
    resize: int | None = 256
    crop: int | None = 224
    quality: int = JPEG_QUALITY
    max_images: int | None = None
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if (self.resize is None) != (self.crop is None):
            raise ValueError("perturb: resize and crop are both set (ImageNet-P: 256, 224) or both null (native)")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"perturb: difficulty must be one of {DIFFICULTIES}, got {self.difficulty}")
        unknown = [p for p in self.perturbations if p not in ALL_PERTURBATIONS]
        if unknown:
            raise ValueError(f"perturb: unknown perturbation(s) {unknown} (known: {list(ALL_PERTURBATIONS)})")


def sequence_spec_from_params(params: dict[str, Any], where: str, seed: int) -> SequenceSpec:
    """`perturb.<name>` → SequenceSpec; `perturbations: common|all` = the 10 test ones | + 4 validation."""
    return typed_spec(SequenceSpec, params, where, seed, "perturbations", perturbation_names)


def sequence_shard_path(out_root: str | Path, perturbation: str, shard: int) -> Path:
    return Path(out_root) / "shards" / perturbation / f"{shard}.parquet"


def filmstrip(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) → (T·H, W, 3): frame t is rows t·H .. (t+1)·H."""
    t, h, w, c = frames.shape
    return frames.reshape(t * h, w, c)


def split_filmstrip(strip: np.ndarray, frames: int) -> np.ndarray:
    """Inverse of `filmstrip`, checking that the strip holds whole frames."""
    if strip.shape[0] % frames:
        raise ValueError(f"a filmstrip of height {strip.shape[0]} does not hold {frames} equal frames")
    return strip.reshape(frames, strip.shape[0] // frames, *strip.shape[1:])


def build_sequence_shard(
    dataset: Dataset, spec: SequenceSpec, perturbation: str, shard: int, out_root: str | Path, progress: bool = True,
) -> pd.DataFrame:
    """Sequences of items `shard::spec.shards` under `perturbation`; the shard manifest is written last."""
    if perturbation not in spec.perturbations:
        raise ValueError(f"perturb: {perturbation} is not part of this build ({list(spec.perturbations)})")
    if not 0 <= shard < spec.shards:
        raise ValueError(f"perturb: shard {shard} outside 0..{spec.shards - 1}")
    out_root = Path(out_root)
    items = source_items(dataset, spec).iloc[shard::spec.shards]  # type: ignore[arg-type]
    rows = []
    for row in tqdm(items.itertuples(index=False), total=len(items), desc=f"{perturbation} [{shard}]",
                    disable=not progress, mininterval=5):
        seed = derive_seed(spec.seed, "perturb", spec.dataset, row.source, perturbation, spec.difficulty) % (1 << 32)
        rel = f"{perturbation}/{row.out_name}.jpg"
        base = {"source": row.source, "label": int(row.label), "split": row.split, "perturbation": perturbation,
                "difficulty": spec.difficulty, "seed": seed}
        try:
            image, mode = load_source(dataset, row.path, spec.max_pixels)
            if spec.resize is not None:
                image = resize_short_side(image, spec.resize)
            frames = make_sequence(as_uint8(image), perturbation, seed, spec.difficulty, crop=spec.crop)
        except ValueError as e:
            rows.append({**base, "path": None, "frames": None, "sha256": None, "source_mode": None,
                         "reject_reason": str(e)})
            continue
        data = encode_jpeg(filmstrip(frames), spec.quality)
        write_bytes(out_root / rel, data)
        rows.append({**base, "path": rel, "frames": len(frames), "sha256": hashlib.sha256(data).hexdigest(),
                     "source_mode": mode, "reject_reason": None})
    frame = with_source_columns(pd.DataFrame(rows, columns=list(SHARD_COLUMNS)), items)
    for col in ("seed", "difficulty"):
        frame[col] = frame[col].astype("int64")
    frame["frames"] = frame["frames"].astype("Int64")
    write_parquet(sequence_shard_path(out_root, perturbation, shard), frame)
    return frame


def merge_sequences(
    out_root: str | Path, spec: SequenceSpec, source_root: str | Path, shard_files: list[str | Path]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    expected = [sequence_shard_path(out_root, p, k) for p in spec.perturbations for k in range(spec.shards)]
    order = {p: i for i, p in enumerate(spec.perturbations)}
    return merge_shards(out_root, expected, shard_files, lambda df: (df["perturbation"].map(order),),
                        source_root, "perturbed", dataclasses.asdict(spec))


def load_sequence(path: str, frames: int) -> list[Image.Image]:
    """The frames of one stored sequence, as RGB PIL images (what an eval transform takes)."""
    with Image.open(path) as im:
        strip = np.asarray(im.convert("RGB"))
    return [Image.fromarray(f) for f in split_filmstrip(strip, frames)]
