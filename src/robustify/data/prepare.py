"""The `prepare` stage: a dataset's official source layout → `manifest.parquet` in our data dir.

Every image is opened and fully decoded once, so a truncated or unreadable file is found here — listed
in `rejects.parquet` with the reason — and never crashes an evaluation halfway (DESIGN §6). Odd but
usable files (CMYK, greyscale, 16-bit, alpha, palette) stay in the manifest; `load_rgb` converts them
and the manifest's `source_mode` column records what they were. The manifest is written last, so an
interrupted prepare never leaves a manifest that lists files it did not check.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from robustify.data.registry import dataset_class
from robustify.io import write_json, write_parquet

MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit: larger files are rejected, not decoded


def check_image(path: str) -> tuple[str | None, str | None]:
    """(source mode, None) if the file decodes completely, else (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode = im.mode
                if im.width * im.height > MAX_PIXELS:
                    return None, f"too large ({im.width}x{im.height} px)"
                im.load()  # full decode: catches truncation that `verify` misses for JPEG
        return mode, None
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, f"unreadable: {type(e).__name__}: {e}"


def prepare(
    name: str, source: str | Path, out_dir: str | Path, options: Mapping[str, Any] | None = None, workers: int = 8
) -> pd.DataFrame:
    """Enumerate `source` with dataset `name`'s layout, check every image, write the manifest."""
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"dataset '{name}': source folder not found: {source}")
    cls = dataset_class(name)
    found = cls.enumerate(source, dict(options or {}))
    items = found.items.copy()
    missing = [c for c in ("path", "label", "split") if c not in items.columns]
    if missing:
        raise ValueError(f"dataset '{name}': enumeration lacks column(s) {missing}")
    if items.empty:
        raise ValueError(f"dataset '{name}': no images found under {source}")
    items["path"] = [str(p if Path(p).is_absolute() else source / p) for p in items["path"]]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
        checked = list(pool.map(check_image, items["path"]))
    items["source_mode"] = [mode for mode, _ in checked]
    bad = [reason is not None for _, reason in checked]
    rejects = items.loc[bad, ["path"]].assign(reason=[r for _, r in checked if r is not None])
    manifest = items.loc[[not b for b in bad]].reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.parquet").unlink(missing_ok=True)
    write_parquet(out_dir / "rejects.parquet", rejects.reset_index(drop=True))
    write_json(out_dir / "dataset.json", {
        "name": name, "classes": found.classnames, "source": str(source.resolve()),
        "options": dict(options or {}), "items": len(manifest), "rejected": len(rejects), **found.info,
    })
    write_parquet(out_dir / "manifest.parquet", manifest)
    return manifest
