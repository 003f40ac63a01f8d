"""Generic class-folder datasets (`imagefolder`): Flowers, Cars, CIFAR-100 exported as folders, ...

Two layouts, told apart by structure (or forced with `layout:`):
  split: `<source>/<split>/<class>/<image>`  — every top-level folder is a split (train/val/test/...)
  flat:  `<source>/<class>/<image>`          — one split, named by option `split` (default `test`)
Images must sit directly in their class folder. Labels are the position of the class folder in the
sorted union of class folders over all splits (torchvision's ImageFolder order), except that when
every folder name is a decimal number they are sorted numerically — so a CIFAR-100 export named
`0..99` keeps labels 0..99 instead of string order `0, 1, 10, 11, ...`.

Options: `layout: auto|split|flat`, `splits` (list: keep only these split folders), `split` (name
of the single split of a flat layout), `classnames_file` (one name per line in label order, or a
JSON object folder → name, or a JSON list in label order). Without it, a class is named by its folder
with `_` replaced by a space (what a zero-shot prompt needs).

The helpers `list_images`/`subdirs` are shared by the other folder-based datasets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from robustify.data.registry import Dataset, Enumeration, register
from robustify.io import read_json

# torchvision's IMG_EXTENSIONS: what a class-folder dataset is expected to hold.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
LAYOUTS = ("auto", "split", "flat")


def _scan(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return list(it)


def is_image_name(name: str) -> bool:
    """Image by extension; hidden files (`.DS_Store`, AppleDouble `._x.jpg`) are never images."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name so enumeration order is reproducible."""
    return sorted(
        (Path(e.path) for e in _scan(folder) if e.is_file() and is_image_name(e.name)), key=lambda p: p.name
    )


def subdirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of `folder`, sorted by name."""
    dirs = (Path(e.path) for e in _scan(folder) if e.is_dir() and not e.name.startswith("."))
    return sorted(dirs, key=lambda p: p.name)


def sort_folders(names: Sequence[str]) -> list[str]:
    """Label order of class folders: numeric when all names are numbers, else plain string order."""
    unique = set(names)
    if unique and all(n.isdecimal() for n in unique):
        return sorted(unique, key=lambda n: (int(n), n))
    return sorted(unique)


def read_classnames(spec: str | Path, folders: Sequence[str], source: Path) -> list[str]:
    """Class names for `folders` (in label order) from a text or JSON file; see the module docstring."""
    path = Path(spec).expanduser()
    if not path.is_file() and not path.is_absolute() and (source / path).is_file():
        path = source / path
    if not path.is_file():
        raise FileNotFoundError(f"classnames_file not found: {spec} (looked in the working directory and {source})")
    if path.suffix.lower() == ".json":
        obj = read_json(path)
        if isinstance(obj, dict):
            missing = [f for f in folders if f not in obj]
            if missing:
                more = " ..." if len(missing) > 10 else ""
                raise ValueError(f"{path}: no name for class folder(s) {missing[:10]}{more}")
            names = [str(obj[f]) for f in folders]
        elif isinstance(obj, list):
            names = [str(n) for n in obj]
        else:
            kind = type(obj).__name__
            raise ValueError(f"{path}: expected a JSON object (folder -> name) or a list of names, got {kind}")
    else:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{path}: has {len(names)} class names but the dataset has {len(folders)} class folders")
    return names


def _has_images(folder: Path) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in _scan(folder))


def _detect_layout(source: Path, top: list[Path]) -> str:
    """`flat` if the top-level folders hold images, `split` if they hold only class folders."""
    direct = [d for d in top if _has_images(d)]
    nested = [d for d in top if not _has_images(d) and any(_has_images(c) for c in subdirs(d))]
    if direct and not nested:
        return "flat"
    if nested and not direct:
        return "split"
    if not direct and not nested:
        raise ValueError(f"imagefolder: no images found in {source}/<class>/ or {source}/<split>/<class>/")
    raise ValueError(
        f"imagefolder: {source} mixes class folders holding images ({direct[0].name}) and folders of class folders "
        f"({nested[0].name}); set option layout: split or layout: flat"
    )


@register
class ImageFolder(Dataset):
    """`<split>/<class>/<img>` or `<class>/<img>` datasets with labels in sorted folder order."""

    name = "imagefolder"

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        source = Path(source)
        layout = str(options.get("layout", "auto"))
        if layout not in LAYOUTS:
            raise ValueError(f"imagefolder: option layout must be one of {LAYOUTS}, got {layout!r}")
        stray = list_images(source)
        if stray:
            raise ValueError(
                f"imagefolder: images directly in {source} (e.g. {stray[0].name}); expected <class>/<image>"
            )
        top = subdirs(source)
        if not top:
            raise ValueError(f"imagefolder: no folders in {source}")
        if layout == "auto":
            layout = _detect_layout(source, top)
        if layout == "split":
            split_dirs = {d.name: d for d in top}
            wanted = options.get("splits")
            if wanted is not None:
                wanted = [wanted] if isinstance(wanted, str) else [str(s) for s in wanted]
                missing = [s for s in wanted if s not in split_dirs]
                if missing:
                    raise FileNotFoundError(
                        f"imagefolder: split folder(s) {missing} not in {source} (has {sorted(split_dirs)})"
                    )
                split_dirs = {s: split_dirs[s] for s in wanted}
        else:
            if options.get("splits") is not None:
                raise ValueError(
                    "imagefolder: option splits needs the <split>/<class>/<image> layout; use split: <name>"
                )
            split_dirs = {str(options.get("split", "test")): source}
        class_dirs = {split: subdirs(d) for split, d in split_dirs.items()}
        folders = sort_folders([c.name for dirs in class_dirs.values() for c in dirs])
        if not folders:
            raise ValueError(f"imagefolder: no class folders under {source}")
        label_of = {f: i for i, f in enumerate(folders)}
        rows = [
            (str(img.relative_to(source)), label_of[cdir.name], split, cdir.name)
            for split, dirs in class_dirs.items()
            for cdir in dirs
            for img in list_images(cdir)
        ]
        items = pd.DataFrame(rows, columns=["path", "label", "split", "folder"])
        spec = options.get("classnames_file")
        classnames = read_classnames(spec, folders, source) if spec else [f.replace("_", " ") for f in folders]
        return Enumeration(items, classnames, info={"imagefolder": {"layout": layout, "folders": folders}})
