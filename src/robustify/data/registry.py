"""Dataset registry (DESIGN §3): each dataset is one class registered by name.

A dataset knows how to enumerate its (path, label) items — always through a `manifest.parquet` that
its `prepare` stage wrote — its class names, and its evaluation protocol: `project_logits` maps the
classifier's label space onto the dataset's (identity here; ObjectNet's max-over-mapped-classes and
ImageNet-R/A's class masks override it). Adding a dataset is one file with one `@register` class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
from PIL import Image

from robustify.data.images import load_rgb
from robustify.io import read_json, read_manifest

if TYPE_CHECKING:  # torch is imported where logits are projected: builder jobs never need it
    import torch

_REGISTRY: dict[str, type[Dataset]] = {}


def register(cls: type[Dataset]) -> type[Dataset]:
    if cls.name in _REGISTRY:
        raise ValueError(f"dataset '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def dataset_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def dataset_class(name: str) -> type[Dataset]:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset '{name}' (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def get_dataset(name: str, root: str | Path, options: Mapping[str, Any] | None = None) -> Dataset:
    return dataset_class(name)(root, options)


def corrupted_type(name: str) -> str:
    """The registered class that reads corrupted images built from dataset `name` (its own, unless its
    loader transforms images — ObjectNet crops a border, which the builder already did)."""
    return dataset_class(name).corrupted_type or name


def _load_builtin() -> None:
    import robustify.data.datasets  # noqa: F401  (registers the built-in datasets)


@dataclass
class Enumeration:
    """What a dataset's source layout holds, before images are checked.

    `items` has at least `path` (absolute, or relative to the source root), `label` (int index into
    `classnames`) and `split`; datasets add columns such as `domain`, `corruption`, `severity`.
    """

    items: pd.DataFrame
    classnames: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class Dataset:
    """A prepared dataset on disk: `<root>/manifest.parquet` + `<root>/dataset.json` (class names).

    Datasets read from a source folder define a classmethod `enumerate(source, options) ->
    Enumeration` (source layout → items; used once by the `prepare` stage; generated datasets such
    as the mini-world have none) and,
    where the benchmark needs it, the eval protocol: `project_logits` and `load_image`.
    `options` are the dataset's keys from params.yaml (e.g. ObjectNet's `classes: overlap|all`).
    """

    name: ClassVar[str]
    required_columns: ClassVar[tuple[str, ...]] = ("path", "label", "split")
    corrupted_type: ClassVar[str | None] = None  # see `corrupted_type()`

    def __init__(self, root: str | Path, options: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.options = dict(options or {})
        self._manifest: pd.DataFrame | None = None

    def load_image(self, path: str) -> Image.Image:
        """Decode one item as RGB (ObjectNet overrides this to crop its border)."""
        return load_rgb(path)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def classnames(self) -> list[str]:
        info = read_json(self.root / "dataset.json")
        return list(info["classes"])

    def _read_manifest(self) -> pd.DataFrame:
        if self._manifest is None:
            self._manifest = read_manifest(self.manifest_path, self.required_columns)
        return self._manifest

    def _resolve(self, df: pd.DataFrame) -> pd.DataFrame:
        """`path` resolved: manifest paths are absolute or relative to the root. String joins, not
        pathlib (1.4 s for the mini-world's 72k rows); absolute paths stay as they are."""
        df = df.copy()
        root = os.path.join(str(self.root), "")
        df["path"] = [p if os.path.isabs(p) else root + p for p in df["path"].astype(str)]
        return df

    def manifest(self) -> pd.DataFrame:
        """All items, with `path` resolved."""
        return self._resolve(self._read_manifest())

    def select(self, split: str, domain: str | None = None) -> pd.DataFrame:
        """The items of one split (and domain), paths resolved: filtered first, so an evaluation of
        1 000 test images does not resolve the paths of a 72k-row manifest."""
        df = self._read_manifest()
        keep = df["split"] == split
        if domain is not None:
            if "domain" not in df.columns:
                raise ValueError(f"{self.manifest_path}: has no 'domain' column but domain={domain!r} was asked")
            keep &= df["domain"] == domain
        out = df[keep].reset_index(drop=True)
        if out.empty:
            raise ValueError(f"{self.manifest_path}: no items with split={split!r}, domain={domain!r}")
        return self._resolve(out)

    def project_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Map classifier logits to this dataset's classes (identity when the label spaces agree)."""
        return logits
