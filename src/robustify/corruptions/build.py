"""Corrupted-dataset builder: `<dataset>-C` from any prepared dataset, ImageNet-C protocol (SPEC §5).

Per source image: RGB (the dataset's own loader: ObjectNet crops its border) → Resize(256) →
CenterCrop(224) → corrupt → JPEG quality 85 → `<corruption>/<severity>/<class>/<stem>.jpg`
(`resize`/`crop` null keep the native resolution, as the mini-world does at 32 px).

Work is split into shards (corruption × severity × shard `k` of `n`: items `k::n` of the source
order), each a Snakemake job whose shard manifest is written last, atomically: an interrupted build
reruns only the shards without one. Every image gets its own seed, derived from (seed, dataset,
image, corruption, severity), and every file is written atomically, so a rebuilt or resumed build is
byte-identical. Unreadable or odd inputs never stop a shard: CMYK/greyscale/16-bit/alpha/palette
images are converted (`source_mode` records what they were), and truncated, zero-byte, undecodable or
decompression-bomb-sized files become reject rows with the reason. `merge` joins the shards into the
dataset's `manifest.parquet` + `rejects.parquet` + `dataset.json`.

Decoding and resizing a source costs more than corrupting and encoding it (over half of the 5 ms per
ImageNet image; ObjectNet's photos are far larger), and every source feeds 15 corruptions x 5 severities. So
`build_sources` decodes a shard's sources once into `sources/<shard>.npy` (the prepared uint8 pixels,
concatenated, memory-mapped by readers) + `.parquet` (offset, size, source mode or reject reason per
item), and `build_shard(..., sources=)` reads them instead of decoding again: same arrays, same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from robustify.corruptions.names import corruption_names
from robustify.data.registry import Dataset
from robustify.io import atomic_path, derive_seed, read_json, write_bytes, write_json, write_parquet

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb warning limit: larger files are rejected unread
JPEG_QUALITY = 85  # ImageNet-C's (make_imagenet_c.py saves quality=85, optimize=True)
SHARD_COLUMNS = ("path", "source", "label", "split", "corruption", "severity", "seed", "sha256", "source_mode",
                 "reject_reason")
SOURCE_COLUMNS = ("source", "offset", "height", "width", "source_mode", "reject_reason")


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """One corrupted set: which source items, which corruptions/severities, how images are made."""

    dataset: str  # the source dataset's key: part of every image seed, recorded as provenance
    split: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    domain: str | None = None
    resize: int | None = 256  # short side before the crop; null with crop null = native resolution
    crop: int | None = 224
    quality: int = JPEG_QUALITY
    engine: str = "fast"
    max_images: int | None = None  # a seeded subset of the source items (None = all)
    max_pixels: int = MAX_PIXELS
    seed: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        if (self.resize is None) != (self.crop is None):
            raise ValueError("corrupt: resize and crop are both set (ImageNet-C protocol) or both null (native size)")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"corrupt: quality must be in 1..95, got {self.quality}")
        if self.shards < 1:
            raise ValueError(f"corrupt: shards must be >= 1, got {self.shards}")


def spec_from_params(params: dict[str, Any], where: str, seed: int) -> BuildSpec:
    """`corrupt.<name>` from params.yaml → BuildSpec; `corruptions: common|all` name the ImageNet-C lists."""
    return typed_spec(BuildSpec, params, where, seed, "corruptions", corruption_names,
                      {"severities": tuple(params.get("severities", ()))})


def typed_spec(cls: Any, params: dict[str, Any], where: str, seed: int, names_key: str, resolve: Any,
               extra: dict[str, Any] | None = None) -> Any:
    """A build spec dataclass from its params section, every error naming the params key."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"seed"}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(fields)})")
    try:
        names = resolve(params.get(names_key, "common"))
        return cls(**{**params, names_key: names, **(extra or {}), "seed": seed})
    except ValueError as e:
        raise ValueError(f"{where}.{e}" if str(e).startswith(names_key) else f"{where}: {e}") from None


def source_items(dataset: Dataset, spec: BuildSpec) -> pd.DataFrame:
    """The source rows to corrupt, in manifest order; `max_images` keeps a seeded subset (same order)."""
    items = dataset.select(spec.split, spec.domain)
    if spec.max_images is not None and spec.max_images < len(items):
        rng = np.random.default_rng(derive_seed(spec.seed, "corrupt-subset", spec.dataset, spec.split, spec.domain or ""))
        keep = np.sort(rng.choice(len(items), size=spec.max_images, replace=False))
        items = items.iloc[keep].reset_index(drop=True)
    items = items.copy()
    items["source"] = [str(Path(p).relative_to(dataset.root)) if Path(p).is_relative_to(dataset.root) else p
                       for p in items["path"]]
    # output name `<class>/<stem>`; sources that would collide (same stem and class in two domains or
    # folders) get a short hash of their source path, so no output ever overwrites another
    names = [f"{class_folder(row)}/{Path(row.source).stem}" for row in items.itertuples(index=False)]
    taken = pd.Series(names).duplicated(keep=False).to_numpy()
    items["out_name"] = [f"{n}-{hashlib.sha1(src.encode()).hexdigest()[:8]}" if dup else n
                         for n, src, dup in zip(names, items["source"], taken)]
    return items


def class_folder(row: Any) -> str:
    """The class folder of an output: the wnid where the manifest has one (ImageNet, also for the flat val
    layout), ObjectNet's folder name, else the source's parent folder."""
    for col in ("wnid", "folder"):
        value = getattr(row, col, None)
        if isinstance(value, str) and value:
            return value
    return Path(row.source).parent.name or str(row.label)


def load_source(dataset: Dataset, path: str, max_pixels: int) -> tuple[Image.Image, str]:
    """(RGB image through the dataset's own loader, source mode). Raises ValueError with the reject reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # header only: refuse bombs before decoding them
                mode, (w, h) = im.mode, im.size
        if w * h > max_pixels:
            raise ValueError(f"too large ({w}x{h} px > max_pixels {max_pixels})")
        return dataset.load_image(path), mode
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except (OSError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None


def as_uint8(image: Image.Image, min_side: int = 32) -> np.ndarray:
    arr = np.asarray(image, dtype=np.uint8)
    if min(arr.shape[:2]) < min_side:  # the ImageNet-C/P ops' kernels and textures need 32 px
        raise ValueError(f"too small to corrupt ({arr.shape[1]}x{arr.shape[0]} px < {min_side})")
    return np.ascontiguousarray(arr)


def protocol_image(dataset: Dataset, path: str, spec: BuildSpec) -> tuple[np.ndarray, str]:
    """(H×W×3 uint8 image ready to corrupt, source mode). Raises ValueError with the reject reason."""
    image, mode = load_source(dataset, path, spec.max_pixels)
    if spec.resize is not None and spec.crop is not None:
        image = resize_center_crop(image, spec.resize, spec.crop)
    return as_uint8(image), mode


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size)` on PIL (short side, long side truncated, bilinear + antialias)."""
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return image if (nw, nh) == (w, h) else image.resize((nw, nh), Image.BILINEAR)


def resize_center_crop(image: Image.Image, size: int, crop: int) -> Image.Image:
    """torchvision's `Resize(size)` then `CenterCrop(crop)`, in PIL directly so a build job does not
    import torch."""
    image = resize_short_side(image, size)
    nw, nh = image.size
    if crop > min(nw, nh):
        raise ValueError(f"resized image {nw}x{nh} is smaller than the {crop}-px crop")
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    return image.crop((left, top, left + crop, top + crop))


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def image_seed(spec: BuildSpec, source: str, corruption: str, severity: int) -> int:
    """SPEC §5: a per-image seed from (dataset, image id, corruption, severity); 32 bits for NumPy."""
    return derive_seed(spec.seed, "corrupt", spec.dataset, source, corruption, severity) % (1 << 32)


def with_source_columns(frame: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Carry the source manifest's own columns (domain, wnid, caption, ...) over, so the built set is read
    by the source's dataset class like the source itself."""
    for col in items.columns:
        if col not in frame.columns and col not in ("path", "out_name"):
            frame[col] = items[col].to_numpy()
    return frame


def shard_path(out_root: str | Path, corruption: str, severity: int, shard: int) -> Path:
    return Path(out_root) / "shards" / corruption / str(severity) / f"{shard}.parquet"


def sources_paths(out_root: str | Path, shard: int) -> tuple[Path, Path]:
    """(pixels .npy, index .parquet) of a shard's decoded-source cache."""
    base = Path(out_root) / "sources"
    return base / f"{shard}.npy", base / f"{shard}.parquet"


def shard_items(dataset: Dataset, spec: BuildSpec, shard: int) -> pd.DataFrame:
    if not 0 <= shard < spec.shards:
        raise ValueError(f"corrupt: shard {shard} outside 0..{spec.shards - 1}")
    return source_items(dataset, spec).iloc[shard::spec.shards]


Prepared = tuple[np.ndarray | None, str | None, str | None]  # (image, source mode, reject reason)


def decoded(dataset: Dataset, spec: BuildSpec, items: pd.DataFrame) -> Iterator[Prepared]:
    """Each item through `protocol_image`; a ValueError becomes its reject reason."""
    for path in items["path"]:
        try:
            image, mode = protocol_image(dataset, path, spec)
        except ValueError as e:
            yield None, None, str(e)
            continue
        yield image, mode, None


def protocol_key(dataset: Dataset, spec: BuildSpec) -> dict[str, Any]:
    """What decides a cached source's pixels besides its path: the loader and the geometry."""
    return {"loader": type(dataset).__name__, "resize": spec.resize, "crop": spec.crop,
            "max_pixels": spec.max_pixels}


def build_sources(
    dataset: Dataset, spec: BuildSpec, shard: int, out_root: str | Path, progress: bool = True
) -> pd.DataFrame:
    """Decode and resize the shard's sources once for all its corruption x severity jobs: the pixels go,
    one image at a time, into one flat uint8 .npy, then (last, so its presence means the cache is
    complete) the index .parquet, one row per item. Returns the index."""
    items = shard_items(dataset, spec, shard)
    npy, index_path = sources_paths(out_root, shard)
    index_path.unlink(missing_ok=True)  # a new .npy must never be paired with a stale index
    rows, offset = [], 0
    header = np.lib.format.write_array_header_1_0
    bar = tqdm(decoded(dataset, spec, items), total=len(items), desc=f"sources [{shard}]", disable=not progress,
               mininterval=5)
    with atomic_path(npy) as tmp, open(tmp, "wb") as f:
        # the header's shape is patched once the size is known; NumPy leaves room for it to grow
        header(f, {"descr": "|u1", "fortran_order": False, "shape": (0,)})
        start = f.tell()
        for source, (image, mode, reason) in zip(items["source"], bar):
            h, w = image.shape[:2] if image is not None else (0, 0)
            rows.append({"source": source, "offset": offset, "height": h, "width": w, "source_mode": mode,
                         "reject_reason": reason})
            if image is not None:
                f.write(image.data)  # C-contiguous (as_uint8): no copy
                offset += image.size
        f.seek(0)
        header(f, {"descr": "|u1", "fortran_order": False, "shape": (offset,)})
        if f.tell() != start:
            raise RuntimeError(f"{npy}: the .npy header grew when its size was filled in")
    index = pd.DataFrame(rows, columns=list(SOURCE_COLUMNS))
    for col in ("offset", "height", "width"):
        index[col] = index[col].astype("int64")
    index.attrs["protocol"] = protocol_key(dataset, spec)
    write_parquet(index_path, index)
    return index


def cached(path: str | Path, dataset: Dataset, spec: BuildSpec, items: pd.DataFrame) -> Iterator[Prepared]:
    """The shard's prepared images from its decoded-source cache. Checked before the first image: a cache
    made for other items or another protocol would silently give other pixels than a fresh decode."""
    npy = Path(path)
    index_path = npy.with_suffix(".parquet")
    if not index_path.is_file():
        raise ValueError(f"{npy}: decoded-source cache has no index {index_path.name} (incomplete build?)")
    index = pd.read_parquet(index_path)
    pixels = np.load(npy, mmap_mode="r")
    cached_sources, sources = index["source"].tolist(), items["source"].tolist()
    problem = None
    if cached_sources != sources:
        i = next((i for i, (a, b) in enumerate(zip(cached_sources, sources)) if a != b),
                 min(len(cached_sources), len(sources)))
        got, want = (xs[i] if i < len(xs) else "(none)" for xs in (cached_sources, sources))
        problem = (f"{len(cached_sources)} cached items vs {len(sources)} in the shard; item {i} is {got!r}, "
                   f"expected {want!r}")
    elif index.attrs.get("protocol") != protocol_key(dataset, spec):
        problem = f"built with {index.attrs.get('protocol')}, this build has {protocol_key(dataset, spec)}"
    elif pixels.dtype != np.uint8 or pixels.shape != (3 * int((index["height"] * index["width"]).sum()),):
        problem = f"pixel file is {pixels.dtype} {pixels.shape}, its index describes another size"
    if problem:
        raise ValueError(f"{npy}: decoded-source cache does not match this shard ({problem}); "
                         "rebuild it with `robustify corrupt-sources` and the same params")

    def images() -> Iterator[Prepared]:
        for row in index.itertuples(index=False):
            if isinstance(row.reject_reason, str):
                yield None, None, row.reject_reason
                continue
            flat = pixels[row.offset:row.offset + row.height * row.width * 3]
            yield np.array(flat).reshape(row.height, row.width, 3), row.source_mode, None  # a writable copy

    return images()


def build_shard(
    dataset: Dataset, spec: BuildSpec, corruption: str, severity: int, shard: int, out_root: str | Path,
    progress: bool = True, sources: str | Path | None = None,
) -> pd.DataFrame:
    """Corrupt items `shard::spec.shards` at (corruption, severity); write the images and, last, the
    shard manifest (one row per item: output or reject reason). Returns that manifest. `sources` (a
    `build_sources` .npy) supplies the prepared images instead of decoding each source again."""
    from robustify.corruptions.engine import corrupt  # the engine pulls in numba/OpenCV: only when building

    if corruption not in spec.corruptions or severity not in spec.severities:
        raise ValueError(f"corrupt: {corruption}/{severity} is not part of this build "
                         f"(corruptions {list(spec.corruptions)}, severities {list(spec.severities)})")
    out_root = Path(out_root)
    items = shard_items(dataset, spec, shard)
    images = decoded(dataset, spec, items) if sources is None else cached(sources, dataset, spec, items)
    rows = []
    bar = tqdm(zip(items.itertuples(index=False), images), total=len(items),
               desc=f"{corruption}/{severity} [{shard}]", disable=not progress, mininterval=5)
    for row, (image, mode, reason) in bar:
        seed = image_seed(spec, row.source, corruption, severity)
        rel = f"{corruption}/{severity}/{row.out_name}.jpg"
        base = {"source": row.source, "label": int(row.label), "split": row.split, "corruption": corruption,
                "severity": severity, "seed": seed}
        if image is None:
            rows.append({**base, "path": None, "sha256": None, "source_mode": None, "reject_reason": reason})
            continue
        data = encode_jpeg(corrupt(image, corruption, severity, seed, engine=spec.engine), spec.quality)
        write_bytes(out_root / rel, data)
        rows.append({**base, "path": rel, "sha256": hashlib.sha256(data).hexdigest(), "source_mode": mode,
                     "reject_reason": None})
    frame = with_source_columns(pd.DataFrame(rows, columns=list(SHARD_COLUMNS)), items)
    frame["seed"] = frame["seed"].astype("int64")
    frame["severity"] = frame["severity"].astype("int64")
    write_parquet(shard_path(out_root, corruption, severity, shard), frame)
    return frame


def merge(
    out_root: str | Path, spec: BuildSpec, source_root: str | Path, shard_files: Sequence[str | Path]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shard manifests → `manifest.parquet` (outputs, in corruption/severity/source order), `rejects.parquet`
    (each rejected source once, with its reason) and `dataset.json` (the source's class names and
    protocol info, plus how this set was made). Refuses to merge an incomplete set of shards."""
    expected = [shard_path(out_root, c, s, k) for c in spec.corruptions for s in spec.severities
                for k in range(spec.shards)]
    order = {c: i for i, c in enumerate(spec.corruptions)}
    return merge_shards(out_root, expected, shard_files, lambda df: (df["corruption"].map(order), df["severity"]),
                        source_root, "corrupted", dataclasses.asdict(spec))


def merge_shards(
    out_root: str | Path, expected: Sequence[Path], shard_files: Sequence[str | Path], sort_keys: Any,
    source_root: str | Path, info_key: str, provenance: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The merge shared by corrupted (-C) and perturbation-sequence (-P) sets; rows are sorted by
    `sort_keys(df)` then source, so the manifest never depends on which shard finished first."""
    out_root = Path(out_root)
    given = {Path(p) for p in shard_files}
    if given != set(expected):
        missing = sorted(str(p) for p in set(expected) - given)[:5]
        raise ValueError(f"merge: shard files do not match the build spec; missing e.g. {missing}")
    df = pd.concat([pd.read_parquet(p) for p in sorted(given)], ignore_index=True)
    keys = [k.rename(f"_k{i}") for i, k in enumerate(sort_keys(df))]
    df = pd.concat([df, *keys], axis=1).sort_values([k.name for k in keys] + ["source"], kind="stable")
    df = df.drop(columns=[k.name for k in keys]).reset_index(drop=True)
    ok = df["reject_reason"].isna()
    manifest = df[ok].drop(columns="reject_reason").reset_index(drop=True)
    rejects = (df[~ok].drop_duplicates("source")[["source", "label", "split", "reject_reason"]]
               .rename(columns={"reject_reason": "reason"}).reset_index(drop=True))
    info = read_json(Path(source_root) / "dataset.json")
    info[info_key] = {**provenance, "source_root": str(source_root), "items": int(ok.sum()),
                      "rejected_sources": len(rejects)}
    write_parquet(out_root / "rejects.parquet", rejects)
    write_json(out_root / "dataset.json", info)
    write_parquet(out_root / "manifest.parquet", manifest)  # last: its presence means the set is complete
    return manifest, rejects
