"""ImageNet and its distribution-shift benchmarks (SPEC §5), each read from its official release layout.

Label space: every dataset here labels images by the standard ImageNet-1k order — the index of the
class's WordNet id (wnid) in the *sorted* list of the 1000 wnids (timm's `imagenet_synsets.txt`, the
order torchvision's ImageFolder, timm and open_clip use). Class names are open_clip's
`IMAGENET_CLASSNAMES` (the zero-shot names, in that same order). Nothing is hard-coded here but the
Hendrycks 200-class subsets, shipped as data in `protocols/hendrycks_200.json`.

| name            | split | source layout (`source` = the release folder, or its parent where named)      |
|-----------------|-------|-------------------------------------------------------------------------------|
| imagenet        | val   | `val/<wnid>/*.JPEG` (or `<wnid>/` at the top); flat `ILSVRC2012_val_*.JPEG`    |
|                 |       | + a labels file; Kaggle's `ILSVRC/Data/CLS-LOC/val` + `LOC_val_solution.csv`   |
| imagenet-v2     | test  | `imagenetv2-<variant>-format-val/<class index 0..999>/<hash>.jpeg`             |
| imagenet-sketch | test  | `sketch/<wnid>/*.JPEG`                                                         |
| imagenet-r, -a  | test  | `imagenet-r/<wnid>/*.jpg`, `imagenet-a/<wnid>/*.jpg` (200 wnids each)          |
| imagenet-c      | test  | `<corruption>/<severity>/<wnid>/*.JPEG` (optionally under noise/, blur/, ...)  |

`imagenet` is the ILSVRC2012 *validation* set, so its split is `val` (option `splits: [train, val]`
also reads `train/<wnid>/`); the shifted sets exist only to be tested on, so theirs is `test`.

ImageNet-R/A label scheme: `label` is 0..199, the position of the wnid in the sorted 200-wnid list of
the subset (Hendrycks' ImageFolder order); `label_1k` keeps the 1000-class index. `project_logits`
keeps the 1000-way logit columns `indices_in_1k` (Hendrycks' `output[:, indices_in_1k]`), so a
1000-way classifier's projected argmax is directly comparable with `label`.

Every wnid-folder layout is checked: a folder that is not one of the expected classes is an error
naming it; a class with no images is an error unless `require_all_classes: false` (for subsets).
Files inside class folders are all listed, so `prepare` rejects non-images with a reason instead of
dropping them silently; hidden files (`.DS_Store`, `._x.jpg`) are skipped.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from robustify.data.registry import Dataset, Enumeration, register

if TYPE_CHECKING:  # imported lazily: dataset classes serve torch-free builder jobs too
    import torch

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
NUM_CLASSES = 1000

# ImageNet-C folder names as released by hendrycks/robustness (15 test + 4 extra corruptions); the
# group folders are tolerated one level above them, since some copies keep the tarballs' grouping.
IMAGENET_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate",
)
IMAGENET_C_GROUPS: tuple[str, ...] = ("noise", "blur", "weather", "digital", "extra")
IMAGENET_C_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# ImageNetV2 release folders (imagenetv2-*.tar.gz extract to these names).
IMAGENET_V2_VARIANTS: dict[str, str] = {
    "matched-frequency": "imagenetv2-matched-frequency-format-val",
    "threshold0.7": "imagenetv2-threshold0.7-format-val",
    "top-images": "imagenetv2-top-images-format-val",
}

_WNID = re.compile(r"n\d{8}")
_SHOW = 5  # how many offending names an error message lists


# --------------------------------------------------------------------------- label space


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in sorted order (index = label), from timm's shipped synset list."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != NUM_CLASSES or list(wnids) != sorted(wnids):
        raise RuntimeError(f"timm's ImageNet-1k synset list is not 1000 sorted wnids ({len(wnids)} entries)")
    return wnids


@functools.cache
def imagenet_classnames() -> tuple[str, ...]:
    """open_clip's zero-shot class names, in sorted-wnid order."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if len(IMAGENET_CLASSNAMES) != NUM_CLASSES:
        raise RuntimeError(f"open_clip's IMAGENET_CLASSNAMES has {len(IMAGENET_CLASSNAMES)} names, expected 1000")
    return tuple(IMAGENET_CLASSNAMES)


@functools.cache
def wnid_to_label() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@functools.cache
def _hendrycks_subsets() -> dict[str, Any]:
    text = resources.files("robustify.data").joinpath("protocols", "hendrycks_200.json").read_text("utf-8")
    return json.loads(text)


def subset_wnids(subset: str) -> list[str]:
    """The 200 wnids of `imagenet-r` or `imagenet-a`, sorted (their position is the 200-way label)."""
    data = _hendrycks_subsets()
    if subset not in data or not isinstance(data[subset], dict):
        raise KeyError(f"no Hendrycks 200-class subset named {subset!r} (have: imagenet-r, imagenet-a)")
    wnids = list(data[subset]["wnids"])
    if len(wnids) != 200 or wnids != sorted(set(wnids)):
        raise RuntimeError(f"protocols/hendrycks_200.json: {subset} wnids are not 200 distinct sorted wnids")
    return wnids


def indices_in_1k(subset: str) -> list[int]:
    """The subset's logit columns in the 1000-way space, derived from its wnids and timm's sorted list.

    The stored Hendrycks list must agree: a mismatch means the data file or timm's synsets changed.
    """
    index = wnid_to_label()
    unknown = [w for w in subset_wnids(subset) if w not in index]
    if unknown:
        raise RuntimeError(f"{subset}: wnids not in ImageNet-1k: {unknown[:_SHOW]}")
    derived = [index[w] for w in subset_wnids(subset)]
    stored = list(_hendrycks_subsets()[subset]["indices_in_1k"])
    if derived != stored:
        raise RuntimeError(f"{subset}: mask derived from the wnids differs from Hendrycks' indices_in_1k")
    return derived


# --------------------------------------------------------------------------- options


def _options(name: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` overlaid with `options`; an unknown key is an error (a typo would otherwise be ignored)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"dataset '{name}': unknown option(s) {unknown}; allowed: {sorted(defaults)}")
    out = {**defaults, **options}
    if "require_all_classes" in out and not isinstance(out["require_all_classes"], bool):
        raise ValueError(f"dataset '{name}': option require_all_classes must be true or false")
    return out


def _as_list(name: str, key: str, value: Any) -> list[Any]:
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ValueError(f"dataset '{name}': option {key} must be a name or a list (got {value!r})")


# --------------------------------------------------------------------------- folder scanning


def _visible(entries: Iterable[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _files_under(folder: str, source: Path) -> list[str]:
    """Every visible file below `folder` (recursively, like ImageFolder), sorted, relative to `source`.

    One `relpath` per directory, not per file: ImageNet-C alone lists millions of files.
    """
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, source).replace(os.sep, "/")
        out.extend(f"{rel}/{f}" for f in sorted(filenames) if not f.startswith("."))
    return out


def _require_dir(path: Path, dataset: str, expected: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"dataset '{dataset}': folder not found: {path} (expected {expected})")


def _scan_class_folders(
    source: Path, folder: Path, labels: Mapping[str, int], dataset: str, what: str, require_all: bool,
) -> tuple[list[str], list[int], list[str]]:
    """(paths relative to `source`, labels, missing class folder names) of a `<class>/<files>` folder.

    Folders not in `labels` and images lying next to the class folders are errors; other top-level
    files (the releases' README.txt) are ignored.
    """
    _require_dir(folder, dataset, f"one folder per {what}")
    paths: list[str] = []
    targets: list[int] = []
    unknown: list[str] = []
    stray: list[str] = []
    present: set[str] = set()
    with os.scandir(folder) as it:
        entries = _visible(it)
    for entry in entries:
        if entry.is_dir():
            if entry.name not in labels:
                unknown.append(entry.name)
                continue
            files = _files_under(entry.path, source)
            if files:
                present.add(entry.name)
            paths.extend(files)
            targets.extend([labels[entry.name]] * len(files))
        elif _is_image_name(entry.name):
            stray.append(entry.name)
    if unknown:
        raise ValueError(
            f"dataset '{dataset}': {folder} holds {len(unknown)} unexpected folder(s) "
            f"{unknown[:_SHOW]}{' ...' if len(unknown) > _SHOW else ''}; expected one folder per {what}"
        )
    if stray:
        raise ValueError(
            f"dataset '{dataset}': {folder} holds {len(stray)} image(s) outside class folders "
            f"(e.g. {stray[:_SHOW]}); expected them inside one folder per {what}"
        )
    missing = [name for name in labels if name not in present]
    if missing and require_all:
        raise ValueError(
            f"dataset '{dataset}': {folder} lacks {len(missing)} of the {len(labels)} expected {what} folders "
            f"(or they are empty), e.g. {missing[:_SHOW]}; set option require_all_classes: false to prepare a subset"
        )
    return paths, targets, missing


def _frame(paths: list[str], labels: list[int], split: str, **columns: Any) -> pd.DataFrame:
    labels_arr = np.asarray(labels, dtype=np.int64)
    wnids = np.asarray(imagenet_wnids(), dtype=object)
    frame = pd.DataFrame({"path": paths, "label": labels_arr, "split": split})
    frame["wnid"] = wnids[labels_arr] if len(labels_arr) else []
    for key, value in columns.items():
        frame[key] = value
    return frame


def _pick_subfolder(source: Path, names: Sequence[str]) -> Path:
    """`source/<name>` for the first release folder name present, else `source` itself."""
    for name in names:
        if (source / name).is_dir():
            return source / name
    return source


# --------------------------------------------------------------------------- datasets


class _ImageNet1k(Dataset):
    """Shared eval protocol of the 1000-class sets: the classifier's logits are used as they are."""

    required_columns = ("path", "label", "split")

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != NUM_CLASSES:
            raise ValueError(f"dataset '{self.name}': expected 1000-way ImageNet logits, got {logits.shape[-1]}")
        return logits


@register
class ImageNet(_ImageNet1k):
    """ILSVRC2012 (ImageNet-1k), validation split by default.

    Layouts, looked for in `<source>/<split>`, `<source>/ILSVRC/Data/CLS-LOC/<split>` (Kaggle), or —
    for val only — `<source>` itself:
    - folders `<wnid>/*.JPEG` (the usual re-organised val, and the train split);
    - flat `ILSVRC2012_val_*.JPEG` (val only) with labels from option `labels_file` (relative to the
      source, or absolute), or `<source>/LOC_val_solution.csv` when present. Supported label files:
      Kaggle's `LOC_val_solution.csv` (`ImageId,PredictionString`, first token of the prediction string
      is the wnid) and text files with one `<filename> <wnid>` per line (`#` comments allowed). The
      devkit's `ILSVRC2012_validation_ground_truth.txt` is not accepted: its ILSVRC2012_IDs 1..1000 are
      not the sorted-wnid order and need the devkit's `meta.mat` to translate.
    Options: `splits` (default `[val]`; `train` is read from `train/<wnid>/`), `labels_file`,
    `require_all_classes` (default true).
    """

    name = "imagenet"
    _KAGGLE = Path("ILSVRC") / "Data" / "CLS-LOC"
    _DEFAULT_LABELS = "LOC_val_solution.csv"

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        opts = _options(cls.name, options, {"splits": ["val"], "labels_file": None, "require_all_classes": True})
        splits = _as_list(cls.name, "splits", opts["splits"])
        bad = [s for s in splits if s not in ("train", "val")]
        if bad or not splits or len(set(splits)) != len(splits):
            raise ValueError(
                f"dataset '{cls.name}': option splits must be distinct names from [train, val], got {splits}"
            )
        frames: list[pd.DataFrame] = []
        info: dict[str, Any] = {"wnids": list(imagenet_wnids()), "layout": {}}
        missing: dict[str, list[str]] = {}
        for split in splits:
            folder = cls._split_folder(source, split, alone=splits == ["val"])
            frame, info["layout"][split], extra = cls._enumerate_split(source, folder, split, opts)
            frames.append(frame)
            if absent := extra.pop("missing_classes", None):
                missing[split] = absent
            info.update(extra)
        if missing:
            info["missing_classes"] = missing
        return Enumeration(pd.concat(frames, ignore_index=True), list(imagenet_classnames()), info)

    @classmethod
    def _split_folder(cls, source: Path, split: str, alone: bool) -> Path:
        candidates = [source / split, source / cls._KAGGLE / split]
        for folder in candidates:
            if folder.is_dir():
                return folder
        if alone:
            return source
        raise FileNotFoundError(
            f"dataset '{cls.name}': no {split} folder under {source} (looked for {[str(c) for c in candidates]})"
        )

    @classmethod
    def _enumerate_split(
        cls, source: Path, folder: Path, split: str, opts: Mapping[str, Any]
    ) -> tuple[pd.DataFrame, str, dict[str, Any]]:
        with os.scandir(folder) as it:
            entries = _visible(it)
        has_wnid_dirs = any(e.is_dir() and _WNID.fullmatch(e.name) for e in entries)
        flat = [e.name for e in entries if e.is_file() and _is_image_name(e.name)]
        if has_wnid_dirs and flat:
            raise ValueError(
                f"dataset '{cls.name}': {folder} mixes <wnid>/ folders with {len(flat)} loose images "
                f"(e.g. {flat[:_SHOW]}); expected one layout"
            )
        if has_wnid_dirs:
            paths, labels, missing = _scan_class_folders(
                source, folder, wnid_to_label(), cls.name, "ImageNet-1k wnid", opts["require_all_classes"]
            )
            return _frame(paths, labels, split), "folders", {"missing_classes": missing} if missing else {}
        if flat and split == "val":
            return cls._enumerate_flat(source, folder, flat, opts)
        raise FileNotFoundError(
            f"dataset '{cls.name}': {folder} holds no ImageNet {split} images; expected <wnid>/*.JPEG folders"
            + (" or flat ILSVRC2012_val_*.JPEG files with a labels file" if split == "val" else "")
        )

    @classmethod
    def _enumerate_flat(
        cls, source: Path, folder: Path, files: list[str], opts: Mapping[str, Any]
    ) -> tuple[pd.DataFrame, str, dict[str, Any]]:
        labels_path = cls._labels_path(source, folder, opts["labels_file"])
        by_key = _read_val_labels(labels_path, cls.name)
        index = wnid_to_label()
        unlabelled = [f for f in files if _image_key(f) not in by_key]
        if unlabelled:
            raise ValueError(
                f"dataset '{cls.name}': {len(unlabelled)} image(s) in {folder} have no label in {labels_path} "
                f"(e.g. {unlabelled[:_SHOW]})"
            )
        labels = [index[by_key[_image_key(f)]] for f in files]
        present = {by_key[_image_key(f)] for f in files}
        missing = [w for w in imagenet_wnids() if w not in present]
        if missing and opts["require_all_classes"]:
            raise ValueError(
                f"dataset '{cls.name}': the images in {folder} cover {NUM_CLASSES - len(missing)} of 1000 classes "
                f"(missing e.g. {missing[:_SHOW]}); set option require_all_classes: false to prepare a subset"
            )
        rel = os.path.relpath(folder, source)
        paths = [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
        info: dict[str, Any] = {
            "labels_file": str(labels_path), "labels_without_image": len(by_key) - len(files),
        }
        if missing:
            info["missing_classes"] = missing
        return _frame(paths, labels, "val"), "flat", info

    @classmethod
    def _labels_path(cls, source: Path, folder: Path, option: str | None) -> Path:
        if option is not None:
            path = Path(option) if Path(option).is_absolute() else source / option
            if not path.is_file():
                raise FileNotFoundError(f"dataset '{cls.name}': labels_file not found: {path}")
            return path
        for path in (source / cls._DEFAULT_LABELS, folder / cls._DEFAULT_LABELS):
            if path.is_file():
                return path
        raise FileNotFoundError(
            f"dataset '{cls.name}': {folder} holds flat ILSVRC2012_val_* images but no labels were found; "
            f"set option labels_file to Kaggle's {cls._DEFAULT_LABELS} or to a text file of '<filename> <wnid>' "
            "lines (the devkit's ILSVRC2012_validation_ground_truth.txt uses ILSVRC2012_IDs, not sorted-wnid labels)"
        )


def _image_key(name: str) -> str:
    """A file name without its image extension: Kaggle's ImageIds carry none, the files do."""
    base = os.path.basename(name)
    stem, suffix = os.path.splitext(base)
    return stem if suffix.lower() in IMAGE_SUFFIXES else base


def _read_val_labels(path: Path, dataset: str) -> dict[str, str]:
    """image key → wnid from `LOC_val_solution.csv` or a `<filename> <wnid>` text file."""
    index = wnid_to_label()
    text = path.read_text("utf-8-sig")
    pairs: list[tuple[int, str, str]] = []
    first = text.lstrip().split("\n", 1)[0]
    if path.suffix.lower() == ".csv" or first.startswith("ImageId"):
        rows = csv.DictReader(text.splitlines())
        if not rows.fieldnames or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
            raise ValueError(f"dataset '{dataset}': {path}: expected CSV columns ImageId,PredictionString")
        for n, row in enumerate(rows, start=2):
            tokens = (row["PredictionString"] or "").split()
            pairs.append((n, row["ImageId"] or "", tokens[0] if tokens else ""))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            tokens = line.split("#", 1)[0].split()
            if not tokens:
                continue
            if len(tokens) != 2:
                raise ValueError(
                    f"dataset '{dataset}': {path}:{n}: expected '<filename> <wnid>', got {line.strip()!r} "
                    "(ILSVRC2012_validation_ground_truth.txt's ILSVRC2012_IDs must first be mapped to wnids)"
                )
            pairs.append((n, tokens[0], tokens[1]))
    out: dict[str, str] = {}
    for n, name, wnid in pairs:
        if wnid not in index:
            raise ValueError(f"dataset '{dataset}': {path}:{n}: {wnid!r} is not an ImageNet-1k wnid")
        key = _image_key(name)
        if out.setdefault(key, wnid) != wnid:
            raise ValueError(f"dataset '{dataset}': {path}:{n}: {name} is labelled twice ({out[key]}, {wnid})")
    if not out:
        raise ValueError(f"dataset '{dataset}': {path}: no labels found")
    return out


@register
class ImageNetV2(_ImageNet1k):
    """ImageNetV2 (Recht et al.): `imagenetv2-<variant>-format-val/<class index>/<hash>.jpeg`.

    Folder names are the 0..999 class indices themselves. `source` is either one variant's folder or a
    folder holding several; option `variant` (matched-frequency | threshold0.7 | top-images) picks
    one, defaulting to the only one present, else matched-frequency (the commonly reported set).
    """

    name = "imagenet-v2"

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        opts = _options(cls.name, options, {"variant": None, "require_all_classes": True})
        variant = opts["variant"]
        if variant is not None and variant not in IMAGENET_V2_VARIANTS:
            raise ValueError(
                f"dataset '{cls.name}': unknown variant {variant!r}; expected one of {list(IMAGENET_V2_VARIANTS)}"
            )
        folder, variant = cls._variant_folder(source, variant)
        labels = {str(i): i for i in range(NUM_CLASSES)}
        paths, targets, missing = _scan_class_folders(
            source, folder, labels, cls.name, "class index 0..999", opts["require_all_classes"]
        )
        info: dict[str, Any] = {"wnids": list(imagenet_wnids()), "variant": variant}
        if missing:
            info["missing_classes"] = [imagenet_wnids()[int(m)] for m in missing]
        return Enumeration(_frame(paths, targets, "test"), list(imagenet_classnames()), info)

    @classmethod
    def _variant_folder(cls, source: Path, variant: str | None) -> tuple[Path, str | None]:
        for name, folder_name in IMAGENET_V2_VARIANTS.items():
            if source.name == folder_name:  # pointed at one variant's folder
                if variant not in (None, name):
                    raise ValueError(f"dataset '{cls.name}': {source} is the {name} variant, not {variant!r}")
                return source, name
        present = [v for v, f in IMAGENET_V2_VARIANTS.items() if (source / f).is_dir()]
        if variant is not None:
            if variant in present:
                return source / IMAGENET_V2_VARIANTS[variant], variant
            if present:
                raise FileNotFoundError(
                    f"dataset '{cls.name}': variant {variant!r} not found: {source / IMAGENET_V2_VARIANTS[variant]} "
                    f"(present: {present})"
                )
        elif present:
            chosen = present[0] if len(present) == 1 else "matched-frequency"
            if chosen in present:
                return source / IMAGENET_V2_VARIANTS[chosen], chosen
            raise ValueError(f"dataset '{cls.name}': {source} holds variants {present}; set option variant")
        with os.scandir(source) as it:
            numbered = any(e.is_dir() and e.name.isdigit() for e in it)
        if numbered:
            return source, variant  # a renamed variant folder: only the option can name it
        raise FileNotFoundError(
            f"dataset '{cls.name}': {source} holds neither an ImageNetV2 release folder "
            f"({', '.join(IMAGENET_V2_VARIANTS.values())}) nor class-index folders 0..999"
        )


@register
class ImageNetSketch(_ImageNet1k):
    """ImageNet-Sketch (Wang et al.): `sketch/<wnid>/*.JPEG`, 1000 classes (`source` = `sketch/` or its parent)."""

    name = "imagenet-sketch"

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        opts = _options(cls.name, options, {"require_all_classes": True})
        folder = _pick_subfolder(source, ["sketch"])
        paths, labels, missing = _scan_class_folders(
            source, folder, wnid_to_label(), cls.name, "ImageNet-1k wnid", opts["require_all_classes"]
        )
        info: dict[str, Any] = {"wnids": list(imagenet_wnids())}
        if missing:
            info["missing_classes"] = missing
        return Enumeration(_frame(paths, labels, "test"), list(imagenet_classnames()), info)


class _Hendrycks200(Dataset):
    """A 200-class Hendrycks benchmark: `<release folder>/<wnid>/*.jpg`, evaluated with 1000-way logits
    restricted to its classes (`project_logits`), labels 0..199 in sorted-wnid order of the 200."""

    required_columns = ("path", "label", "split")
    release_folder: ClassVar[str]

    @classmethod
    def wnids(cls) -> list[str]:
        return subset_wnids(cls.name)

    @classmethod
    def indices_in_1k(cls) -> list[int]:
        return indices_in_1k(cls.name)

    @classmethod
    def class_mask(cls) -> torch.Tensor:
        """Boolean mask over the 1000 ImageNet classes (wise-ft's `class_sublist_mask`)."""
        import torch

        mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        mask[cls.indices_in_1k()] = True
        return mask

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        opts = _options(cls.name, options, {"require_all_classes": True})
        folder = _pick_subfolder(source, [cls.release_folder])
        wnids = cls.wnids()
        labels = {w: i for i, w in enumerate(wnids)}
        paths, targets, missing = _scan_class_folders(
            source, folder, labels, cls.name, f"{cls.name} class wnid", opts["require_all_classes"]
        )
        idx = np.asarray(cls.indices_in_1k(), dtype=np.int64)
        targets_arr = np.asarray(targets, dtype=np.int64)
        frame = pd.DataFrame({
            "path": paths, "label": targets_arr, "split": "test",
            "wnid": np.asarray(wnids, dtype=object)[targets_arr] if len(targets_arr) else [],
            "label_1k": idx[targets_arr],
        })
        names = imagenet_classnames()
        info: dict[str, Any] = {"wnids": wnids, "indices_in_1k": idx.tolist()}
        if missing:
            info["missing_classes"] = missing
        return Enumeration(frame, [names[i] for i in idx], info)

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """1000-way logits → the 200 subset columns; 200-way logits (a head on this set's names) pass."""
        n = logits.shape[-1]
        if n == NUM_CLASSES:
            import torch

            return logits[:, torch.as_tensor(self.indices_in_1k(), device=logits.device)]
        if n == len(self.wnids()):
            return logits
        raise ValueError(f"dataset '{self.name}': expected 1000- or 200-way logits, got {n}")


@register
class ImageNetR(_Hendrycks200):
    """ImageNet-Rendition (Hendrycks et al. 2021): 30k renditions of 200 ImageNet classes."""

    name = "imagenet-r"
    release_folder = "imagenet-r"


@register
class ImageNetA(_Hendrycks200):
    """ImageNet-A natural adversarial examples (Hendrycks et al. 2021): 7.5k images of 200 classes."""

    name = "imagenet-a"
    release_folder = "imagenet-a"


@register
class ImageNetC(_ImageNet1k):
    """ImageNet-C (Hendrycks & Dietterich 2019): `<corruption>/<severity>/<wnid>/*.JPEG`.

    Corruption folders may sit directly in `source` or one level down in the release tarballs' group
    folders (noise/, blur/, weather/, digital/, extra/). Options: `corruptions` (names, default all
    present; `all` says the same), `severities` (default 1..5; each selected corruption must have them
    all), `require_all_classes` (per corruption and severity). Adds columns `corruption` and `severity`.
    """

    name = "imagenet-c"
    required_columns = ("path", "label", "split", "corruption", "severity")

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        defaults = {"corruptions": None, "severities": list(IMAGENET_C_SEVERITIES), "require_all_classes": True}
        opts = _options(cls.name, options, defaults)
        found = cls._corruption_folders(source)
        if opts["corruptions"] in (None, "all"):
            wanted = [c for c in IMAGENET_C_CORRUPTIONS if c in found]
        else:
            wanted = _as_list(cls.name, "corruptions", opts["corruptions"])
            unknown = [c for c in wanted if c not in IMAGENET_C_CORRUPTIONS]
            if unknown:
                raise ValueError(
                    f"dataset '{cls.name}': unknown corruption(s) {unknown}; known: {list(IMAGENET_C_CORRUPTIONS)}"
                )
            absent = [c for c in wanted if c not in found]
            if absent:
                raise FileNotFoundError(
                    f"dataset '{cls.name}': corruption folder(s) {absent} not found under {source} "
                    f"(present: {sorted(found)})"
                )
        if not wanted:
            raise ValueError(f"dataset '{cls.name}': option corruptions selects none")
        severities = _as_list(cls.name, "severities", opts["severities"])
        if not severities or any(isinstance(s, bool) or s not in IMAGENET_C_SEVERITIES for s in severities):
            raise ValueError(f"dataset '{cls.name}': option severities must be integers from 1..5, got {severities}")
        severities = sorted({int(s) for s in severities})
        frames, missing_classes = [], {}
        for corruption in wanted:
            folder = found[corruption]
            cls._check_severity_folders(folder, severities)
            for severity in severities:
                paths, labels, missing = _scan_class_folders(
                    source, folder / str(severity), wnid_to_label(), cls.name, "ImageNet-1k wnid",
                    opts["require_all_classes"],
                )
                frames.append(_frame(paths, labels, "test", corruption=corruption, severity=np.int64(severity)))
                if missing:
                    missing_classes[f"{corruption}/{severity}"] = len(missing)
        items = pd.concat(frames, ignore_index=True)
        items["severity"] = items["severity"].astype(np.int64)
        info: dict[str, Any] = {"wnids": list(imagenet_wnids()), "corruptions": wanted, "severities": severities}
        if missing_classes:
            info["missing_classes"] = missing_classes
        return Enumeration(items, list(imagenet_classnames()), info)

    @classmethod
    def _corruption_folders(cls, source: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        unknown: list[str] = []

        def add(folder: Path) -> None:
            if folder.name in found:
                raise ValueError(
                    f"dataset '{cls.name}': corruption {folder.name} found twice: {found[folder.name]}, {folder}"
                )
            found[folder.name] = folder

        with os.scandir(source) as it:
            top = [e for e in _visible(it) if e.is_dir()]
        for entry in top:
            if entry.name in IMAGENET_C_CORRUPTIONS:
                add(Path(entry.path))
            elif entry.name in IMAGENET_C_GROUPS:
                with os.scandir(entry.path) as it:
                    for sub in _visible(it):
                        if sub.is_dir() and sub.name in IMAGENET_C_CORRUPTIONS:
                            add(Path(sub.path))
                        elif sub.is_dir():
                            unknown.append(f"{entry.name}/{sub.name}")
            else:
                unknown.append(entry.name)
        if unknown:
            raise ValueError(
                f"dataset '{cls.name}': {source} holds folder(s) that are not ImageNet-C corruptions: "
                f"{unknown[:_SHOW]}; expected <corruption>/<severity>/<wnid>/ folders, corruptions being "
                f"{list(IMAGENET_C_CORRUPTIONS)}"
            )
        if not found:
            raise FileNotFoundError(
                f"dataset '{cls.name}': no corruption folders under {source}; "
                "expected <corruption>/<severity>/<wnid>/*.JPEG"
            )
        return found

    @classmethod
    def _check_severity_folders(cls, folder: Path, severities: list[int]) -> None:
        with os.scandir(folder) as it:
            names = [e.name for e in _visible(it) if e.is_dir()]
        odd = [n for n in names if n not in {str(s) for s in IMAGENET_C_SEVERITIES}]
        if odd:
            raise ValueError(f"dataset '{cls.name}': {folder} holds folder(s) {odd[:_SHOW]}; expected severities 1..5")
        absent = [s for s in severities if str(s) not in names]
        if absent:
            raise FileNotFoundError(f"dataset '{cls.name}': {folder} lacks severity folder(s) {absent}")
