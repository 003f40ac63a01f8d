"""DomainNet (Peng et al., ICCV 2019) in its official layout, with the official split lists.

  <source>/<domain>/<class>/<file>.jpg                 images, one zip per domain
  <source>/<domain>_train.txt, <domain>_test.txt       (or in <source>/splits/, as Dassl keeps them)
      lines: `<domain>/<class>/<file>.jpg <label>`

The split lists are the ground truth: labels and splits come from them, never from a folder scan, so
the 345-class label order is the dataset's own. Class names come from the class folder of the listed
paths, in label order, with `_` replaced by a space (zero-shot names: `The_Eiffel_Tower` → `The Eiffel
Tower`); a label whose folder differs between lines is an error. Every list of every selected domain is
read before names are fixed, because some lists lack a class (painting_train.txt has no t-shirt).

Option `domains` (default real, painting, clipart, infograph, sketch — quickdraw is excluded as in the
papers). Manifest columns: path, label, split (train/test), domain. A listed image that is missing on disk
stays in the enumeration so that `prepare` lists it in rejects.parquet; a missing list file or domain
folder is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from robustify.data.registry import Dataset, Enumeration, register

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DEFAULT_DOMAINS = ("real", "painting", "clipart", "infograph", "sketch")
SPLITS = ("train", "test")


def _domains(options: Mapping[str, Any]) -> list[str]:
    asked = options.get("domains", DEFAULT_DOMAINS)
    domains = [asked] if isinstance(asked, str) else [str(d) for d in asked]
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ValueError(f"domainnet: option domains must be a non-empty list of {DOMAINS}, got {asked!r}")
    if len(set(domains)) != len(domains):
        raise ValueError(f"domainnet: option domains lists a domain twice: {domains}")
    return domains


def list_file(source: Path, domain: str, split: str) -> Path:
    """Where `<domain>_<split>.txt` lives: the dataset root, or its `splits/` folder."""
    name = f"{domain}_{split}.txt"
    for path in (source / name, source / "splits" / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"domainnet: split list {name} not found in {source} or {source / 'splits'}")


def read_list(path: Path) -> list[tuple[str, int, int]]:
    """(relative image path, label, line number) for each non-empty line of a split list."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdecimal():
            raise ValueError(f"{path}:{lineno}: expected '<domain>/<class>/<file> <label>', got {line.strip()!r}")
        rel, label = parts[0], int(parts[1])
        if label < 0 or rel.startswith("/") or rel.count("/") < 1:  # str checks: lists hold ~600k lines
            raise ValueError(f"{path}:{lineno}: expected a relative '<domain>/<class>/<file>' and a label >= 0")
        rows.append((rel, label, lineno))
    return rows


@register
class DomainNet(Dataset):
    """DomainNet domains with their official train/test lists; domains are a manifest column."""

    name = "domainnet"
    required_columns = ("path", "label", "split", "domain")

    @classmethod
    def enumerate(cls, source: Path, options: Mapping[str, Any]) -> Enumeration:
        source = Path(source)
        domains = _domains(options)
        folder_of: dict[int, tuple[str, str]] = {}  # label → (class folder, where first seen)
        rows = []
        for domain in domains:
            if not (source / domain).is_dir():
                raise FileNotFoundError(f"domainnet: domain folder {source / domain} not found")
            for split in SPLITS:
                path = list_file(source, domain, split)
                for rel, label, lineno in read_list(path):
                    folder = rel.rsplit("/", 2)[-2]
                    seen = folder_of.setdefault(label, (folder, f"{path.name}:{lineno}"))
                    if seen[0] != folder:
                        raise ValueError(
                            f"domainnet: label {label} is class {folder!r} at {path.name}:{lineno} "
                            f"but {seen[0]!r} at {seen[1]}"
                        )
                    rows.append((rel, label, split, domain))
        if not rows:
            raise ValueError(f"domainnet: the split lists of {domains} in {source} are empty")
        gaps = sorted(set(range(max(folder_of) + 1)) - set(folder_of))
        if gaps:
            raise ValueError(
                f"domainnet: label(s) {gaps[:10]} appear in no split list of {domains}; labels must be 0..K-1"
            )
        folders = [folder_of[i][0] for i in range(len(folder_of))]
        twice = sorted({f for f in folders if folders.count(f) > 1})
        if twice:
            raise ValueError(f"domainnet: class folder(s) {twice[:10]} have two labels in the split lists of {domains}")
        items = pd.DataFrame(rows, columns=["path", "label", "split", "domain"])
        classnames = [f.replace("_", " ") for f in folders]
        return Enumeration(items, classnames, info={"domainnet": {"domains": domains, "folders": folders}})
