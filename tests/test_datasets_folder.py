"""imagefolder: `<split>/<class>/<img>` and `<class>/<img>` layouts, class-name files, label order."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import robustify.data.folder  # noqa: F401  (registers imagefolder)
from robustify.data.folder import sort_folders
from robustify.data.prepare import prepare
from robustify.data.registry import get_dataset


def img(path: Path, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (10, 200, 30)).save(path, format=fmt)


def split_tree(root: Path) -> Path:
    for split in ("train", "test"):
        for cls in ("sunflower", "bird_of_paradise", "Anthurium"):
            img(root / split / cls / "a.png")
            img(root / split / cls / "b.JPG", "JPEG")
    img(root / "val" / "sunflower" / "c.png")  # a split need not hold every class
    (root / "train" / "sunflower" / "notes.txt").write_text("not an image")
    return root


def test_split_layout_labels_and_rejects(tmp_path: Path) -> None:
    src = split_tree(tmp_path / "flowers")
    bad = src / "test" / "Anthurium" / "b.JPG"
    bad.write_bytes(bad.read_bytes()[:40])
    manifest = prepare("imagefolder", src, tmp_path / "p", workers=2)
    assert sorted(set(manifest["split"])) == ["test", "train", "val"]
    folders = ["Anthurium", "bird_of_paradise", "sunflower"]  # sorted folder order (torchvision's)
    assert all(folders[lab] == f for f, lab in zip(manifest["folder"], manifest["label"]))
    assert len(manifest) == 12  # 13 images, one truncated; notes.txt is not an image
    rejects = pd.read_parquet(tmp_path / "p" / "rejects.parquet")
    assert [Path(p).relative_to(src).as_posix() for p in rejects["path"]] == ["test/Anthurium/b.JPG"]
    ds = get_dataset("imagefolder", tmp_path / "p")
    assert ds.classnames == ["Anthurium", "bird of paradise", "sunflower"]
    assert len(ds.select("val")) == 1


def test_splits_option_and_classnames_files(tmp_path: Path) -> None:
    src = split_tree(tmp_path / "flowers")
    (tmp_path / "names.txt").write_text("anthurium\nbird of paradise\nsunflower\n\n")
    options = {"splits": ["test"], "classnames_file": str(tmp_path / "names.txt")}
    m = prepare("imagefolder", src, tmp_path / "p", options, workers=2)
    assert set(m["split"]) == {"test"}
    assert get_dataset("imagefolder", tmp_path / "p").classnames == ["anthurium", "bird of paradise", "sunflower"]
    # JSON folder -> name, given relative to the source folder
    (src / "names.json").write_text(json.dumps({"sunflower": "sun flower", "Anthurium": "flamingo flower",
                                                "bird_of_paradise": "strelitzia"}))
    prepare("imagefolder", src, tmp_path / "q", {"classnames_file": "names.json"}, workers=2)
    assert get_dataset("imagefolder", tmp_path / "q").classnames == ["flamingo flower", "strelitzia", "sun flower"]
    (src / "names.json").write_text(json.dumps({"sunflower": "sun flower"}))
    with pytest.raises(ValueError, match="no name for class folder"):
        prepare("imagefolder", src, tmp_path / "r", {"classnames_file": "names.json"})
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="has 2 class names but the dataset has 3"):
        prepare("imagefolder", src, tmp_path / "s", {"classnames_file": str(tmp_path / "names.txt")})
    with pytest.raises(FileNotFoundError, match="split folder"):
        prepare("imagefolder", src, tmp_path / "t", {"splits": ["valid"]})


def test_flat_layout_numeric_folders(tmp_path: Path) -> None:
    src = tmp_path / "cifar100"
    for cls in ("0", "1", "2", "10", "11"):
        img(src / cls / "x.png")
    (src / "classes.txt").write_text("apple\naquarium fish\nbaby\nbicycle\nbird\n")
    m = prepare("imagefolder", src, tmp_path / "p", {"classnames_file": "classes.txt", "split": "val"}, workers=2)
    assert set(m["split"]) == {"val"}
    assert dict(zip(m["folder"], m["label"])) == {"0": 0, "1": 1, "2": 2, "10": 3, "11": 4}  # numeric, not "10" < "2"
    assert get_dataset("imagefolder", tmp_path / "p").classnames[3] == "bicycle"
    assert sort_folders(["b", "10", "2"]) == ["10", "2", "b"]  # mixed names: plain string order


def test_layout_detection_errors(tmp_path: Path) -> None:
    src = tmp_path / "mixed"
    img(src / "cat" / "x.png")
    img(src / "train" / "dog" / "y.png")
    with pytest.raises(ValueError, match="layout: split or layout: flat"):
        prepare("imagefolder", src, tmp_path / "p")
    m = prepare("imagefolder", src, tmp_path / "q", {"layout": "split"}, workers=2)
    assert list(m["split"]) == ["train"] and list(m["folder"]) == ["dog"]  # cat/ holds no class folders
    img(src / "stray.png")
    with pytest.raises(ValueError, match="images directly in"):
        prepare("imagefolder", src, tmp_path / "r", {"layout": "split"})
    with pytest.raises(ValueError, match="option layout"):
        prepare("imagefolder", src, tmp_path / "s", {"layout": "nested"})
