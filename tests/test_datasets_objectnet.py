"""ObjectNet / ObjectNet-C: a tiny release in the real layout with mapping files in their true format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import robustify.data.objectnet  # noqa: F401  (registers objectnet, objectnet-c)
from robustify.data.objectnet import load_mappings
from robustify.data.prepare import prepare
from robustify.data.registry import get_dataset

INNER = (40, 90, 200)
# ImageNet-1k classes used by the fixture, by PyTorch index (the real indices of these classes).
TORCH_INDEX = {
    "analog clock": 409, "digital clock": 530, "barber chair": 423, "folding chair": 559,
    "rocking chair, rocker": 765, "television, television system": 851, "bath towel": 434,
}
FOLDER_TO_LABEL = {  # two classes without ImageNet counterpart: squeegee, dog_bed
    "squeegee": "Squeegee", "alarm_clock": "Alarm clock", "chair": "Chair", "tv": "TV",
    "full_sized_towel": "Bath towel", "dog_bed": "Dog bed",
}
OBJECTNET_TO_IMAGENET = {
    "Alarm clock": "analog clock; digital clock",
    "Bath towel": "bath towel",
    "Chair": "barber chair; folding chair; rocking chair, rocker",
    "TV": "television, television system",
}
OVERLAP_FOLDERS = ["alarm_clock", "chair", "full_sized_towel", "tv"]  # label order: sorted folder names


def to_2012_id(pytorch_index: int) -> int:
    """A non-identity bijection, so the code must really go through pytorch_to_imagenet_2012_id.json."""
    return (pytorch_index * 7 + 3) % 1000


def write_mappings(mdir: Path) -> None:
    mdir.mkdir(parents=True)
    (mdir / "folder_to_objectnet_label.json").write_text(json.dumps(FOLDER_TO_LABEL, indent=2) + "\n")
    (mdir / "objectnet_to_imagenet_1k.json").write_text(json.dumps(OBJECTNET_TO_IMAGENET, indent=2) + "\n")
    (mdir / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(p): to_2012_id(p) for p in range(1000)}, indent=2) + "\n"
    )
    names = [f"filler class {i}, filler" for i in range(1000)]
    names[to_2012_id(134)] = names[to_2012_id(517)] = "crane"  # a duplicated name, unused by the mapping
    for name, p in TORCH_INDEX.items():
        names[to_2012_id(p)] = name
    (mdir / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")


def framed_png(path: Path, w: int = 12, h: int = 10) -> None:
    """ObjectNet-like image: 1-px red frame, a 1-px pinkish ring (the smear), uniform inside."""
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = (230, 120, 120)
    arr[0, :] = arr[-1, :] = arr[:, 0] = arr[:, -1] = (255, 0, 0)
    arr[2:-2, 2:-2] = INNER
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def truncated_png(path: Path) -> None:
    framed_png(path, 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    root = tmp_path / "src" / "objectnet-1.0"
    write_mappings(root / "mappings")
    for folder in FOLDER_TO_LABEL:
        for i in range(2):
            framed_png(root / "images" / folder / f"{folder}_{i}.png")
    truncated_png(root / "images" / "chair" / "broken.png")
    (root / "images" / "chair" / ".DS_Store").write_bytes(b"\0")
    return root


def test_mappings_true_format(release: Path) -> None:
    m = load_mappings(release / "mappings")
    assert len(m.folder_to_label) == 6
    assert m.label_to_imagenet == {
        "Alarm clock": [409, 530], "Bath towel": [434], "Chair": [423, 559, 765], "TV": [851],
    }
    assert m.folders("overlap") == OVERLAP_FOLDERS


def test_prepare_overlap_and_rejects(release: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    manifest = prepare("objectnet", release.parent, out, workers=2)  # the folder holding objectnet-1.0/
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert [Path(p).name for p in rejects["path"]] == ["broken.png"]
    assert rejects["reason"].iloc[0].startswith("unreadable")
    assert sorted(set(manifest["folder"])) == OVERLAP_FOLDERS  # squeegee, dog_bed left out
    assert len(manifest) == 8 and set(manifest["split"]) == {"test"}
    for folder, label in zip(manifest["folder"], manifest["label"]):
        assert OVERLAP_FOLDERS[label] == folder
    ds = get_dataset("objectnet", out)
    assert ds.classnames == ["alarm clock", "chair", "bath towel", "tv"]
    info = json.loads((out / "dataset.json").read_text())["objectnet"]
    assert info["imagenet_indices"] == [[409, 530], [423, 559, 765], [434], [851]]
    # the release folder itself works as source too
    again = prepare("objectnet", release, tmp_path / "prepared2", workers=2)
    assert sorted(again["path"]) == sorted(manifest["path"])


def test_project_logits_max_over_mapped_classes(release: Path, tmp_path: Path) -> None:
    prepare("objectnet", release, tmp_path / "p", workers=2)
    ds = get_dataset("objectnet", tmp_path / "p")
    logits = torch.randn(3, 1000)
    logits[0, 530] = 50.0  # digital clock wins → ObjectNet "alarm clock" (label 0)
    logits[1, 765] = 50.0  # rocking chair wins → "chair" (label 1)
    logits[2, 434] = 50.0  # bath towel → label 2
    out = ds.project_logits(logits)
    expected = torch.stack([
        torch.maximum(logits[:, 409], logits[:, 530]),
        torch.maximum(torch.maximum(logits[:, 423], logits[:, 559]), logits[:, 765]),
        logits[:, 434],
        logits[:, 851],
    ], dim=1)
    assert torch.equal(out, expected)
    assert out.argmax(1).tolist() == [0, 1, 2]
    head_logits = torch.randn(2, 4)
    assert ds.project_logits(head_logits) is head_logits  # already in ObjectNet's label space
    with pytest.raises(ValueError, match="expected 4"):
        ds.project_logits(torch.randn(2, 7))
    with pytest.raises(ValueError, match="prepared with"):
        get_dataset("objectnet", tmp_path / "p", {"classes": "all"}).project_logits(logits)


def test_classes_all(release: Path, tmp_path: Path) -> None:
    manifest = prepare("objectnet", release, tmp_path / "p", {"classes": "all"}, workers=2)
    ds = get_dataset("objectnet", tmp_path / "p", {"classes": "all"})
    assert ds.classnames == ["alarm clock", "chair", "dog bed", "bath towel", "squeegee", "tv"]
    assert len(manifest) == 12 and manifest["label"].max() == 5
    assert ds.project_logits(torch.zeros(1, 6)).shape == (1, 6)
    with pytest.raises(ValueError, match="classes: overlap"):
        ds.project_logits(torch.zeros(1, 1000))


def test_border_crop(release: Path, tmp_path: Path) -> None:
    manifest = prepare("objectnet", release, tmp_path / "p", workers=2)
    im = get_dataset("objectnet", tmp_path / "p").load_image(manifest["path"].iloc[0])
    assert im.mode == "RGB" and im.size == (8, 6)
    assert (np.asarray(im) == np.array(INNER, np.uint8)).all()  # no red frame, no smear left


def test_layout_errors(release: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="option classes"):
        prepare("objectnet", release, tmp_path / "a", {"classes": "some"})
    framed_png(release / "images" / "not_a_class" / "x.png")
    with pytest.raises(ValueError, match="not_a_class"):
        prepare("objectnet", release, tmp_path / "b")
    (release / "images" / "not_a_class" / "x.png").unlink()
    (release / "mappings" / "imagenet_to_label_2012_v2").unlink()
    with pytest.raises(FileNotFoundError, match="imagenet_to_label_2012_v2"):
        prepare("objectnet", release, tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="images/"):
        prepare("objectnet", tmp_path, tmp_path / "d")


def test_unknown_imagenet_name_is_an_error(release: Path, tmp_path: Path) -> None:
    bad = dict(OBJECTNET_TO_IMAGENET, TV="television; crane")
    (release / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(ValueError, match="'television'"):
        load_mappings(release / "mappings")
    bad["TV"] = "crane"
    (release / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(ValueError, match="names 2"):
        load_mappings(release / "mappings")


def test_objectnet_c(release: Path, tmp_path: Path) -> None:
    src = tmp_path / "objectnet-c"
    for corruption in ("gaussian_noise", "fog"):
        for severity in (1, 5):
            for folder in ("alarm_clock", "tv", "squeegee"):
                path = src / corruption / str(severity) / folder / f"{folder}_0.jpg"
                path.parent.mkdir(parents=True)
                Image.new("RGB", (16, 16), INNER).save(path, quality=85)
    truncated_png(src / "fog" / "5" / "tv" / "broken.png")
    (src / "manifest.parquet").write_bytes(b"builder output, not an image folder")
    with pytest.raises(ValueError, match="option mappings"):
        prepare("objectnet-c", src, tmp_path / "c0")
    options = {"mappings": str(release / "mappings")}
    manifest = prepare("objectnet-c", src, tmp_path / "c", options, workers=2)
    assert len(manifest) == 8  # squeegee (no ImageNet counterpart) left out under classes: overlap
    assert set(manifest["corruption"]) == {"gaussian_noise", "fog"} and set(manifest["severity"]) == {1, 5}
    assert manifest["severity"].dtype.kind == "i"
    assert set(zip(manifest["folder"], manifest["label"])) == {("alarm_clock", 0), ("tv", 3)}
    assert len(pd.read_parquet(tmp_path / "c" / "rejects.parquet")) == 1
    ds = get_dataset("objectnet-c", tmp_path / "c", options)
    assert ds.classnames == ["alarm clock", "chair", "bath towel", "tv"]
    assert ds.load_image(manifest["path"].iloc[0]).size == (16, 16)  # already cropped by the builder
    logits = torch.randn(2, 1000)
    plain = get_dataset("objectnet", _prepared(release, tmp_path))
    assert torch.equal(ds.project_logits(logits), plain.project_logits(logits))
    assert ds.select("test").shape[0] == 8
    (src / "fog" / "high").mkdir()
    with pytest.raises(ValueError, match="severity"):
        prepare("objectnet-c", src, tmp_path / "c2", options)


def _prepared(release: Path, tmp_path: Path) -> Path:
    out = tmp_path / "objectnet-prepared"
    prepare("objectnet", release, out, workers=2)
    return out
