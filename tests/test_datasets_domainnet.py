"""DomainNet: a tiny copy of the official layout (domain folders + `<domain>_<split>.txt` lists)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import robustify.data.domainnet  # noqa: F401  (registers domainnet)
from robustify.data.domainnet import DEFAULT_DOMAINS, DOMAINS
from robustify.data.prepare import prepare
from robustify.data.registry import get_dataset

CLASSES = ["aircraft_carrier", "t-shirt", "The_Eiffel_Tower", "zigzag"]  # label order of the lists


def build(root: Path, lists_in: str = ".") -> Path:
    """Every domain: one train and one test JPEG per class; sketch_train lacks t-shirt (as painting does)."""
    for domain in DOMAINS:
        for split in ("train", "test"):
            lines = []
            for label, cls in enumerate(CLASSES):
                if domain == "sketch" and split == "train" and cls == "t-shirt":
                    continue
                rel = f"{domain}/{cls}/{domain}_{label:03d}_{split}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (label * 60, 100, 30)).save(root / rel)
                lines.append(f"{rel} {label}")
            (root / lists_in).mkdir(parents=True, exist_ok=True)
            (root / lists_in / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_default_domains(tmp_path: Path) -> None:
    src = build(tmp_path / "domainnet")
    # a listed image missing on disk, and a truncated one: both end up in rejects, not in a crash
    (src / "real" / "zigzag" / "real_003_test.jpg").unlink()
    bad = src / "clipart" / "t-shirt" / "clipart_001_train.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    out = tmp_path / "prepared"
    manifest = prepare("domainnet", src, out, workers=2)
    assert set(manifest["domain"]) == set(DEFAULT_DOMAINS) and "quickdraw" not in set(manifest["domain"])
    assert set(manifest["split"]) == {"train", "test"}
    assert len(manifest) == 5 * 8 - 1 - 2  # sketch_train lacks t-shirt; two rejects
    rejects = pd.read_parquet(out / "rejects.parquet").sort_values("path")
    assert [Path(p).name for p in rejects["path"]] == ["clipart_001_train.jpg", "real_003_test.jpg"]
    assert rejects["reason"].tolist()[1] == "file not found"
    ds = get_dataset("domainnet", out)
    assert ds.classnames == ["aircraft carrier", "t-shirt", "The Eiffel Tower", "zigzag"]
    for path, label in zip(manifest["path"], manifest["label"]):
        assert Path(path).parent.name == CLASSES[label]
    sketch_test = ds.select("test", domain="sketch")
    assert len(sketch_test) == 4 and sorted(sketch_test["label"]) == [0, 1, 2, 3]


def test_domains_option_and_splits_folder(tmp_path: Path) -> None:
    src = build(tmp_path / "dn", lists_in="splits")  # Dassl keeps the lists in splits/
    manifest = prepare("domainnet", src, tmp_path / "p", {"domains": ["quickdraw", "sketch"]}, workers=2)
    assert sorted(set(manifest["domain"])) == ["quickdraw", "sketch"]
    assert len(manifest) == 8 + 7
    with pytest.raises(ValueError, match="option domains"):
        prepare("domainnet", src, tmp_path / "q", {"domains": ["photo"]})


def test_missing_list_or_domain_is_an_error(tmp_path: Path) -> None:
    src = build(tmp_path / "dn")
    (src / "painting_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="painting_test.txt"):
        prepare("domainnet", src, tmp_path / "p")
    (src / "painting_test.txt").write_text("")
    shutil.rmtree(src / "infograph")
    with pytest.raises(FileNotFoundError, match="domain folder .*infograph"):
        prepare("domainnet", src, tmp_path / "q")


def test_inconsistent_lists_are_errors(tmp_path: Path) -> None:
    src = build(tmp_path / "dn")
    lst = src / "real_test.txt"
    lst.write_text(lst.read_text() + "real/zigzag/real_extra.jpg 0\n")
    with pytest.raises(ValueError, match="label 0 is class 'zigzag'"):
        prepare("domainnet", src, tmp_path / "p", {"domains": ["real"]})
    lst.write_text("real/zigzag/real_003_test.jpg three\n")
    with pytest.raises(ValueError, match="real_test.txt:1"):
        prepare("domainnet", src, tmp_path / "p", {"domains": ["real"]})
    lst.write_text("real/zigzag/real_003_test.jpg 3\n")
    (src / "real_train.txt").write_text("real/aircraft_carrier/real_000_train.jpg 0\n")
    with pytest.raises(ValueError, match=r"label\(s\) \[1, 2\]"):
        prepare("domainnet", src, tmp_path / "p", {"domains": ["real"]})
