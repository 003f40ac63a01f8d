"""ObjectNet and ObjectNet-C (SPEC §5; protocol as in wise-ft / imagenet-testbed).

Source layout of the ObjectNet 1.0 release (`source` may be `objectnet-1.0/` or the folder holding it):
  objectnet-1.0/images/<folder>/<file>.png       313 class folders
  objectnet-1.0/mappings/folder_to_objectnet_label.json   {"alarm_clock": "Alarm clock", ...}
  objectnet-1.0/mappings/objectnet_to_imagenet_1k.json    {"Alarm clock": "analog clock; digital clock", ...}
      113 ObjectNet classes → ImageNet class names separated by "; " (a name itself may hold commas)
  objectnet-1.0/mappings/pytorch_to_imagenet_2012_id.json {"0": 355, ...}  PyTorch index → ILSVRC-2012 id
  objectnet-1.0/mappings/imagenet_to_label_2012_v2        line i (0-based) = name of ILSVRC-2012 id i

Protocol. Option `classes: overlap|all`: `overlap` (default) keeps the 113 classes that have ImageNet
counterparts; `all` keeps the 313 (for heads in ObjectNet's own label space). Labels index the selected
classes sorted by *folder name* — wise-ft's order, so a 113-way head built in its order lines up (sorting
by the display name would reorder 39 of the 113). Class names are the ObjectNet labels lower-cased, as
wise-ft prompts them. Images lose a 2-px border when loaded: the 1-px red frame around every ObjectNet
image smears into a second pixel ring under JPEG/resampling. `project_logits` turns 1000-way ImageNet
logits into ObjectNet logits as the max over each class's mapped ImageNet logits (overlap only).

The mapping needed at evaluation is stored by `prepare` in dataset.json (key `objectnet`), so evaluating
never needs the source folder again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image

from robustify.data.folder import list_images, subdirs
from robustify.data.images import load_rgb
from robustify.data.registry import Dataset, Enumeration, register
from robustify.io import read_json

if TYPE_CHECKING:  # imported lazily: dataset classes serve torch-free builder jobs too
    import torch

BORDER = 2
IMAGENET_CLASSES = 1000
CLASS_SELECTIONS = ("overlap", "all")
RELEASE_DIR = "objectnet-1.0"
FOLDER_TO_LABEL = "folder_to_objectnet_label.json"
OBJECTNET_TO_IMAGENET = "objectnet_to_imagenet_1k.json"
PYTORCH_TO_2012 = "pytorch_to_imagenet_2012_id.json"
IMAGENET_2012_NAMES = "imagenet_to_label_2012_v2"
MAPPING_FILES = (FOLDER_TO_LABEL, OBJECTNET_TO_IMAGENET, PYTORCH_TO_2012, IMAGENET_2012_NAMES)


@dataclass(frozen=True)
class ObjectNetMappings:
    """The release's mapping files, resolved to PyTorch ImageNet-1k indices."""

    folder_to_label: dict[str, str]
    label_to_imagenet: dict[str, list[int]]

    def folders(self, classes: str) -> list[str]:
        """The selected class folders in label order (sorted folder names)."""
        if classes == "all":
            return sorted(self.folder_to_label)
        return sorted(f for f, label in self.folder_to_label.items() if label in self.label_to_imagenet)

    def imagenet_indices(self, folder: str) -> list[int] | None:
        return self.label_to_imagenet.get(self.folder_to_label[folder])


def _string_map(path: Path) -> dict[str, Any]:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def load_mappings(mappings_dir: str | Path) -> ObjectNetMappings:
    """Read and cross-check the four mapping files of the ObjectNet release."""
    mdir = Path(mappings_dir)
    missing = [name for name in MAPPING_FILES if not (mdir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"objectnet: mapping file(s) {missing} not found in {mdir}")
    folder_to_label = {str(k): str(v) for k, v in _string_map(mdir / FOLDER_TO_LABEL).items()}
    to_imagenet = _string_map(mdir / OBJECTNET_TO_IMAGENET)
    try:
        id_to_pytorch = {int(v): int(k) for k, v in _string_map(mdir / PYTORCH_TO_2012).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{mdir / PYTORCH_TO_2012}: expected {{\"<pytorch index>\": <2012 id>}} ({e})") from e
    lines = (mdir / IMAGENET_2012_NAMES).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    name_to_pytorch: dict[str, list[int]] = {}
    for class_id, name in enumerate(lines):
        if class_id in id_to_pytorch:
            name_to_pytorch.setdefault(name.strip(), []).append(id_to_pytorch[class_id])
    known_labels = set(folder_to_label.values())
    label_to_imagenet: dict[str, list[int]] = {}
    for label, names in to_imagenet.items():
        if label not in known_labels:
            raise ValueError(f"{mdir / OBJECTNET_TO_IMAGENET}: class {label!r} is not a value of {FOLDER_TO_LABEL}")
        indices = []
        for name in (n.strip() for n in str(names).split(";")):
            if not name:
                continue
            found = name_to_pytorch.get(name, [])
            if len(found) != 1:
                problem = "is not an ImageNet-1k name" if not found else f"names {len(found)} ImageNet-1k classes"
                raise ValueError(
                    f"objectnet: {name!r} (for {label!r}) {problem} of {IMAGENET_2012_NAMES} + {PYTORCH_TO_2012}"
                )
            indices.append(found[0])
        if not indices:
            raise ValueError(f"{mdir / OBJECTNET_TO_IMAGENET}: class {label!r} maps to no ImageNet class")
        label_to_imagenet[label] = sorted(set(indices))
    return ObjectNetMappings(folder_to_label, label_to_imagenet)


def _class_selection(options: Mapping[str, Any]) -> str:
    classes = str(options.get("classes", "overlap"))
    if classes not in CLASS_SELECTIONS:
        raise ValueError(f"objectnet: option classes must be one of {CLASS_SELECTIONS}, got {classes!r}")
    return classes


def _release_root(source: Path) -> Path:
    for root in (source, source / RELEASE_DIR):
        if (root / "images").is_dir():
            return root
    raise FileNotFoundError(f"objectnet: no images/ folder in {source} or {source / RELEASE_DIR}")


def _class_space(mappings: ObjectNetMappings, classes: str) -> tuple[list[str], list[str], dict[str, Any]]:
    """(folders, class names, dataset.json info) of the selected label space."""
    folders = mappings.folders(classes)
    labels = [mappings.folder_to_label[f] for f in folders]
    info = {
        "classes": classes,
        "folders": folders,
        "objectnet_labels": labels,
        "imagenet_indices": [mappings.imagenet_indices(f) for f in folders],
    }
    return folders, [label.lower() for label in labels], info


def _check_folder(folder: str, mappings: ObjectNetMappings, where: Path) -> None:
    if folder not in mappings.folder_to_label:
        raise ValueError(f"objectnet: folder {where / folder} is not an ObjectNet class of {FOLDER_TO_LABEL}")


class _ObjectNetProtocol(Dataset):
    """Label space and logit projection shared by ObjectNet and ObjectNet-C."""

    _groups: list[list[int] | None] | None = None

    def _imagenet_groups(self) -> list[list[int] | None]:
        if self._groups is None:
            info = read_json(self.root / "dataset.json").get("objectnet")
            if not info:
                where = self.root / "dataset.json"
                raise ValueError(f"{where}: no 'objectnet' mapping; re-run prepare for {self.name}")
            asked = self.options.get("classes")
            if asked is not None and asked != info["classes"]:
                raise ValueError(
                    f"{self.name}: options ask classes={asked!r} but {self.root} was prepared with "
                    f"classes={info['classes']!r}; re-run prepare"
                )
            self._groups = info["imagenet_indices"]
        return self._groups

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """ImageNet logits → ObjectNet logits (max over mapped classes); ObjectNet-space logits pass."""
        groups = self._imagenet_groups()
        width = logits.shape[-1]
        if width == len(groups):
            return logits
        if width != IMAGENET_CLASSES:
            raise ValueError(
                f"{self.name}: got {width} logits; expected {len(groups)} (ObjectNet label space) "
                f"or {IMAGENET_CLASSES} (ImageNet, projected)"
            )
        if any(g is None for g in groups):
            raise ValueError(
                f"{self.name}: ImageNet logits can only be projected onto the 113 ObjectNet classes with ImageNet "
                f"counterparts; this data was prepared with classes: all — use classes: overlap, or a head in "
                f"ObjectNet's {len(groups)}-class label space"
            )
        width_max = max(len(g) for g in groups if g is not None)
        # Pad each group by repeating its first index: duplicates leave the max unchanged.
        padded = [g + [g[0]] * (width_max - len(g)) for g in groups if g is not None]
        import torch

        index = torch.tensor(padded, dtype=torch.long, device=logits.device)
        return logits[..., index].amax(dim=-1)


@register
class ObjectNet(_ObjectNetProtocol):
    """ObjectNet 1.0 test set (split `test`); options `classes` and `mappings` (default <release>/mappings)."""

    name = "objectnet"
    corrupted_type = "objectnet-c"  # corrupted images were cropped before corruption

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        source = Path(source)
        root = _release_root(source)
        mappings = load_mappings(options.get("mappings") or root / "mappings")
        classes = _class_selection(options)
        folders, classnames, info = _class_space(mappings, classes)
        images = root / "images"
        on_disk = {d.name: d for d in subdirs(images)}
        for folder in on_disk:
            _check_folder(folder, mappings, images)
        rows = [
            (str(img.relative_to(source)), label, "test", folder)
            for label, folder in enumerate(folders)
            if folder in on_disk
            for img in list_images(on_disk[folder])
        ]
        info["missing_folders"] = [f for f in folders if f not in on_disk]
        items = pd.DataFrame(rows, columns=["path", "label", "split", "folder"])
        return Enumeration(items, classnames, info={"objectnet": info})

    def load_image(self, path: str) -> Image.Image:
        """RGB image without its 2-px border (the red frame and its smear)."""
        im = load_rgb(path)
        w, h = im.size
        if w <= 2 * BORDER or h <= 2 * BORDER:
            raise ValueError(f"{path}: {w}x{h} px is too small to crop a {BORDER}-px border")
        return im.crop((BORDER, BORDER, w - BORDER, h - BORDER))


@register
class ObjectNetC(_ObjectNetProtocol):
    """ObjectNet-C: `<corruption>/<severity>/<objectnet folder>/<file>` written by the corruption builder.

    Images were cropped and resized before corruption, so no border is cropped here. Option `mappings`
    (the release's mappings folder; default `<source>/mappings`) gives the label space; `classes` as for
    ObjectNet — folders outside the selection are left out, folders unknown to the mapping are an error.
    """

    name = "objectnet-c"
    required_columns = ("path", "label", "split", "corruption", "severity")

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        source = Path(source)
        spec = options.get("mappings")
        if spec is None and not (source / "mappings").is_dir():
            raise ValueError(
                f"objectnet-c: set option mappings to the ObjectNet release's mappings folder ({source / 'mappings'} "
                f"does not exist)"
            )
        mappings = load_mappings(spec or source / "mappings")
        classes = _class_selection(options)
        folders, classnames, info = _class_space(mappings, classes)
        label_of = {f: i for i, f in enumerate(folders)}
        rows = []
        for cdir in subdirs(source):
            if cdir.name == "mappings":
                continue
            for sdir in subdirs(cdir):
                if not sdir.name.isdecimal():
                    raise ValueError(
                        f"objectnet-c: {sdir} is not a severity folder (expected <corruption>/<int>/<folder>)"
                    )
                for fdir in subdirs(sdir):
                    _check_folder(fdir.name, mappings, sdir)
                    if fdir.name in label_of:
                        label, severity = label_of[fdir.name], int(sdir.name)
                        rows += [
                            (str(img.relative_to(source)), label, "test", fdir.name, cdir.name, severity)
                            for img in list_images(fdir)
                        ]
        items = pd.DataFrame(rows, columns=["path", "label", "split", "folder", "corruption", "severity"])
        info["corruptions"] = sorted(set(items["corruption"]))
        info["severities"] = sorted(int(s) for s in set(items["severity"]))
        return Enumeration(items, classnames, info={"objectnet": info})
