"""ImageNet-family datasets: tiny fixtures in each benchmark's real release layout, through `prepare`."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import robustify.data.imagenet as inet  # registers the datasets (not yet imported by the registry)
from robustify.data.prepare import prepare
from robustify.data.registry import get_dataset
from robustify.io import read_json

# Hendrycks' published masks, verbatim: hendrycks/imagenet-r eval.py (the `imagenet_r_indices` comment,
# = positions of `imagenet_r_wnids` in `all_wnids`) and hendrycks/natural-adv-examples eval.py
# (`indices_in_1k = [k for k in thousand_k_to_200 if thousand_k_to_200[k] != -1]`).
HENDRYCKS_R_INDICES = [
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195, 199,
    203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277,
    281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337,
    338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414,
    425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558,
    570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768, 774, 776,
    779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934,
    936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
]
HENDRYCKS_A_INDICES = [
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298, 301,
    306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363,
    372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461,
    462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572,
    573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704,
    719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815,
    820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932,
    933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
]
HENDRYCKS = {"imagenet-r": HENDRYCKS_R_INDICES, "imagenet-a": HENDRYCKS_A_INDICES}

WNIDS = inet.imagenet_wnids()


def jpeg(path: Path, mode: str = "RGB", seed: int = 0, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, "JPEG", quality=90)
    return path


def truncated_jpeg(path: Path) -> Path:
    jpeg(path, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def run_prepare(name: str, source: Path, tmp_path: Path, **options: object) -> tuple[pd.DataFrame, dict]:
    out = tmp_path / f"prepared-{name}"
    manifest = prepare(name, source, out, options, workers=2)
    return manifest, read_json(out / "dataset.json")


# --------------------------------------------------------------------------- label space and masks


def test_label_space_comes_from_timm_and_open_clip() -> None:
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(WNIDS)
    names = inet.imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish"


@pytest.mark.parametrize("subset", ["imagenet-r", "imagenet-a"])
def test_masks_equal_hendrycks_indices_in_1k(subset: str) -> None:
    published = HENDRYCKS[subset]
    assert len(published) == 200 and published == sorted(set(published))
    # Derived from the stored wnids through timm's sorted synsets, it must be Hendrycks' list exactly.
    assert inet.indices_in_1k(subset) == published
    assert inet.subset_wnids(subset) == [WNIDS[i] for i in published]
    cls = {"imagenet-r": inet.ImageNetR, "imagenet-a": inet.ImageNetA}[subset]
    assert torch.nonzero(cls.class_mask()).flatten().tolist() == published
    # timm ships the same subsets independently; they must agree too.
    short = subset.split("-")[1]
    timm_idx = pkgutil.get_data("timm.data", f"_info/imagenet_{short}_indices.txt").decode().split()
    timm_wnids = pkgutil.get_data("timm.data", f"_info/imagenet_{short}_synsets.txt").decode().split()
    assert [int(i) for i in timm_idx] == published and timm_wnids == inet.subset_wnids(subset)


# --------------------------------------------------------------------------- imagenet


def test_imagenet_folder_layout_keeps_odd_modes_and_rejects_truncated(tmp_path: Path) -> None:
    src = tmp_path / "ilsvrc"
    w0, w1, w999 = WNIDS[0], WNIDS[1], WNIDS[999]
    jpeg(src / "val" / w0 / "ILSVRC2012_val_00000001.JPEG")
    jpeg(src / "val" / w0 / "ILSVRC2012_val_00000002.JPEG", mode="CMYK")
    jpeg(src / "val" / w1 / "ILSVRC2012_val_00000003.JPEG", mode="L")
    truncated_jpeg(src / "val" / w999 / "ILSVRC2012_val_00000004.JPEG")
    jpeg(src / "val" / w999 / "ILSVRC2012_val_00000005.JPEG")
    (src / "val" / w1 / ".DS_Store").write_bytes(b"junk")
    manifest, info = run_prepare("imagenet", src, tmp_path, require_all_classes=False)

    assert info["classes"] == list(inet.imagenet_classnames()) and info["layout"] == {"val": "folders"}
    assert info["rejected"] == 1 and len(info["missing_classes"]["val"]) == 997
    rejects = pd.read_parquet(tmp_path / "prepared-imagenet" / "rejects.parquet")
    assert rejects["path"].str.endswith("ILSVRC2012_val_00000004.JPEG").tolist() == [True]
    assert rejects["reason"].iloc[0].startswith("unreadable")
    by_name = manifest.set_index(manifest["path"].map(lambda p: Path(p).name))
    assert by_name["label"].to_dict() == {
        "ILSVRC2012_val_00000001.JPEG": 0, "ILSVRC2012_val_00000002.JPEG": 0,
        "ILSVRC2012_val_00000003.JPEG": 1, "ILSVRC2012_val_00000005.JPEG": 999,
    }
    assert by_name.loc["ILSVRC2012_val_00000002.JPEG", "source_mode"] == "CMYK"
    assert by_name.loc["ILSVRC2012_val_00000003.JPEG", "source_mode"] == "L"
    assert manifest["label"].dtype == np.int64 and set(manifest["split"]) == {"val"}
    assert (manifest["wnid"] == [WNIDS[i] for i in manifest["label"]]).all()

    ds = get_dataset("imagenet", tmp_path / "prepared-imagenet")
    assert len(ds.select("val")) == 4
    assert ds.load_image(by_name.loc["ILSVRC2012_val_00000002.JPEG", "path"]).mode == "RGB"
    logits = torch.randn(3, 1000)
    assert torch.equal(ds.project_logits(logits), logits)
    with pytest.raises(ValueError, match="1000-way"):
        ds.project_logits(torch.randn(3, 200))


def test_imagenet_errors_name_the_problem(tmp_path: Path) -> None:
    src = tmp_path / "ilsvrc"
    jpeg(src / "val" / WNIDS[3] / "a.JPEG")
    with pytest.raises(ValueError, match="lacks 999 of the 1000 expected.*require_all_classes"):
        inet.ImageNet.enumerate(src, {})
    with pytest.raises(ValueError, match="unknown option"):
        inet.ImageNet.enumerate(src, {"require_all": False})
    jpeg(src / "val" / "cats" / "b.JPEG")
    with pytest.raises(ValueError, match=r"val holds 1 unexpected folder\(s\) \['cats'\]; expected one folder per ImageNet-1k wnid"):
        inet.ImageNet.enumerate(src, {"require_all_classes": False})
    with pytest.raises(FileNotFoundError, match="no train folder"):
        inet.ImageNet.enumerate(src, {"splits": ["train", "val"], "require_all_classes": False})


def test_imagenet_train_and_val_splits(tmp_path: Path) -> None:
    src = tmp_path / "ilsvrc"
    jpeg(src / "train" / WNIDS[7] / f"{WNIDS[7]}_1.JPEG")
    jpeg(src / "val" / WNIDS[8] / "ILSVRC2012_val_00000009.JPEG")
    found = inet.ImageNet.enumerate(src, {"splits": ["train", "val"], "require_all_classes": False})
    assert found.items[["split", "label"]].values.tolist() == [["train", 7], ["val", 8]]
    assert found.items["path"].tolist() == [f"train/{WNIDS[7]}/{WNIDS[7]}_1.JPEG",
                                            f"val/{WNIDS[8]}/ILSVRC2012_val_00000009.JPEG"]


def test_imagenet_flat_kaggle_layout(tmp_path: Path) -> None:
    src = tmp_path / "kaggle"
    val = src / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    labels = {"ILSVRC2012_val_00000001": WNIDS[65], "ILSVRC2012_val_00000002": WNIDS[970],
              "ILSVRC2012_val_00000003": WNIDS[65], "ILSVRC2012_val_00000004": WNIDS[230]}
    for i, stem in enumerate(sorted(labels)[:3]):
        jpeg(val / f"{stem}.JPEG", seed=i)
    rows = [f"{stem},{wnid} 10 20 30 40 {wnid} 1 2 3 4 " for stem, wnid in labels.items()]
    (src / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    manifest, info = run_prepare("imagenet", src, tmp_path, require_all_classes=False)
    assert info["layout"] == {"val": "flat"} and info["labels_without_image"] == 1
    assert manifest["label"].tolist() == [65, 970, 65]
    assert all(Path(p).is_relative_to(val) for p in manifest["path"])


def test_imagenet_flat_layout_with_text_labels(tmp_path: Path) -> None:
    src = tmp_path / "flat"
    jpeg(src / "ILSVRC2012_val_00000001.JPEG")
    jpeg(src / "ILSVRC2012_val_00000002.JPEG")
    (src / "labels.txt").write_text(
        f"# filename wnid\nILSVRC2012_val_00000001.JPEG {WNIDS[12]}\nILSVRC2012_val_00000002.JPEG {WNIDS[0]}\n"
    )
    found = inet.ImageNet.enumerate(src, {"labels_file": "labels.txt", "require_all_classes": False})
    assert found.items["label"].tolist() == [12, 0]
    assert found.items["path"].tolist() == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]

    with pytest.raises(FileNotFoundError, match="no labels were found"):
        inet.ImageNet.enumerate(src, {"require_all_classes": False})
    (src / "gt.txt").write_text("65\n970\n")  # devkit ground truth: ILSVRC2012_IDs, not wnids
    with pytest.raises(ValueError, match="gt.txt:1: expected '<filename> <wnid>'"):
        inet.ImageNet.enumerate(src, {"labels_file": "gt.txt", "require_all_classes": False})
    jpeg(src / "ILSVRC2012_val_00000003.JPEG")
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no label"):
        inet.ImageNet.enumerate(src, {"labels_file": "labels.txt", "require_all_classes": False})


# --------------------------------------------------------------------------- imagenet-v2, -sketch


def test_imagenet_v2_variants(tmp_path: Path) -> None:
    src = tmp_path / "v2"
    mf = src / "imagenetv2-matched-frequency-format-val"
    th = src / "imagenetv2-threshold0.7-format-val"
    jpeg(mf / "0" / "7e6f.jpeg")
    jpeg(mf / "999" / "a1b2.jpeg", mode="L")
    jpeg(th / "500" / "c3d4.jpeg")
    manifest, info = run_prepare("imagenet-v2", src, tmp_path, require_all_classes=False)
    assert info["variant"] == "matched-frequency" and info["classes"] == list(inet.imagenet_classnames())
    assert manifest["label"].tolist() == [0, 999] and set(manifest["split"]) == {"test"}
    assert manifest["wnid"].tolist() == [WNIDS[0], WNIDS[999]]

    found = inet.ImageNetV2.enumerate(src, {"variant": "threshold0.7", "require_all_classes": False})
    assert found.items["label"].tolist() == [500] and found.info["variant"] == "threshold0.7"
    assert found.items["path"].tolist() == ["imagenetv2-threshold0.7-format-val/500/c3d4.jpeg"]
    # Pointing at one variant's folder works too.
    assert inet.ImageNetV2.enumerate(th, {"require_all_classes": False}).info["variant"] == "threshold0.7"
    with pytest.raises(FileNotFoundError, match="variant 'top-images' not found"):
        inet.ImageNetV2.enumerate(src, {"variant": "top-images", "require_all_classes": False})
    with pytest.raises(ValueError, match="unknown variant"):
        inet.ImageNetV2.enumerate(src, {"variant": "matched"})
    jpeg(mf / "n01440764" / "x.jpeg")
    with pytest.raises(ValueError, match=r"\['n01440764'\]; expected one folder per class index 0..999"):
        inet.ImageNetV2.enumerate(src, {"require_all_classes": False})


def test_imagenet_sketch(tmp_path: Path) -> None:
    src = tmp_path / "ImageNet-Sketch"
    jpeg(src / "sketch" / WNIDS[2] / "sketch_0.JPEG", mode="L")
    jpeg(src / "sketch" / WNIDS[2] / "sketch_1.JPEG")
    jpeg(src / "sketch" / WNIDS[500] / "sketch_0.JPEG")
    manifest, info = run_prepare("imagenet-sketch", src, tmp_path, require_all_classes=False)
    assert manifest["label"].tolist() == [2, 2, 500] and len(info["classes"]) == 1000
    assert len(info["missing_classes"]) == 998
    with pytest.raises(ValueError, match="lacks 998 of the 1000"):
        inet.ImageNetSketch.enumerate(src, {})


# --------------------------------------------------------------------------- imagenet-r, -a


@pytest.mark.parametrize("name", ["imagenet-r", "imagenet-a"])
def test_hendrycks_200_labels_and_projection(tmp_path: Path, name: str) -> None:
    src = tmp_path / "release"
    sub = inet.subset_wnids(name)
    published = HENDRYCKS[name]
    (src / name).mkdir(parents=True)
    (src / name / "README.txt").write_text("release notes")
    for k in (0, 5, 199):
        jpeg(src / name / sub[k] / f"{k}_a.jpg", seed=k)
    jpeg(src / name / sub[5] / "5_b.jpg", mode="CMYK")
    manifest, info = run_prepare(name, src, tmp_path, require_all_classes=False)

    assert manifest["label"].tolist() == [0, 5, 5, 199]
    assert manifest["label_1k"].tolist() == [published[0], published[5], published[5], published[199]]
    assert manifest["wnid"].tolist() == [sub[0], sub[5], sub[5], sub[199]]
    names = inet.imagenet_classnames()
    assert info["classes"] == [names[i] for i in published] and info["indices_in_1k"] == published

    ds = get_dataset(name, tmp_path / f"prepared-{name}")
    logits = torch.arange(1000, dtype=torch.float32).repeat(4, 1)
    projected = ds.project_logits(logits)
    assert projected.shape == (4, 200)
    assert projected[0].tolist() == [float(i) for i in published]
    # A classifier that is right in the 1000-way space is right after projection, with labels 0..199.
    onehot = torch.zeros(4, 1000)
    onehot[torch.arange(4), torch.tensor(manifest["label_1k"].tolist())] = 1.0
    assert ds.project_logits(onehot).argmax(1).tolist() == manifest["label"].tolist()
    head_200 = torch.randn(4, 200)
    assert torch.equal(ds.project_logits(head_200), head_200)
    with pytest.raises(ValueError, match="1000- or 200-way"):
        ds.project_logits(torch.randn(4, 10))


def test_hendrycks_200_rejects_foreign_wnids(tmp_path: Path) -> None:
    src = tmp_path / "imagenet-r"
    jpeg(src / inet.subset_wnids("imagenet-r")[0] / "a.jpg")
    jpeg(src / WNIDS[0] / "b.jpg")  # tench: an ImageNet class, but not one of ImageNet-R's 200
    with pytest.raises(ValueError, match=rf"unexpected folder\(s\) \['{WNIDS[0]}'\]; expected one folder per imagenet-r class wnid"):
        inet.ImageNetR.enumerate(src, {"require_all_classes": False})
    with pytest.raises(FileNotFoundError, match="folder not found"):
        inet.ImageNetA.enumerate(tmp_path / "nowhere", {})


# --------------------------------------------------------------------------- imagenet-c


def imagenet_c_fixture(src: Path) -> None:
    for c_dir in (src / "gaussian_noise", src / "blur" / "defocus_blur"):
        for s in (1, 2, 3, 4, 5):
            for k, wnid in enumerate((WNIDS[10], WNIDS[20])):
                jpeg(c_dir / str(s) / wnid / f"ILSVRC2012_val_0000000{k}.JPEG", seed=s * 10 + k, size=8)


def test_imagenet_c_layout_and_restrictions(tmp_path: Path) -> None:
    src = tmp_path / "ImageNet-C"
    imagenet_c_fixture(src)
    truncated_jpeg(src / "gaussian_noise" / "3" / WNIDS[20] / "ILSVRC2012_val_00000009.JPEG")
    manifest, info = run_prepare(
        "imagenet-c", src, tmp_path, severities=[1, 3], corruptions=["gaussian_noise", "defocus_blur"],
        require_all_classes=False,
    )
    assert info["rejected"] == 1 and info["corruptions"] == ["gaussian_noise", "defocus_blur"]
    assert manifest["severity"].dtype == np.int64 and manifest["label"].dtype == np.int64
    counts = manifest.groupby(["corruption", "severity"]).size().to_dict()
    assert counts == {
        ("defocus_blur", 1): 2, ("defocus_blur", 3): 2, ("gaussian_noise", 1): 2, ("gaussian_noise", 3): 2,
    }
    assert sorted(set(manifest["label"])) == [10, 20] and set(manifest["split"]) == {"test"}
    ds = get_dataset("imagenet-c", tmp_path / "prepared-imagenet-c")
    assert len(ds.select("test")) == 8

    every = inet.ImageNetC.enumerate(src, {"require_all_classes": False}).items
    assert len(every) == 2 * 5 * 2 + 1 and every["path"].iloc[0].startswith("gaussian_noise/1/")
    assert every["corruption"].unique().tolist() == ["gaussian_noise", "defocus_blur"]


def test_imagenet_c_errors(tmp_path: Path) -> None:
    src = tmp_path / "ImageNet-C"
    imagenet_c_fixture(src)
    with pytest.raises(FileNotFoundError, match=r"corruption folder\(s\) \['fog'\] not found"):
        inet.ImageNetC.enumerate(src, {"corruptions": ["fog"], "require_all_classes": False})
    with pytest.raises(ValueError, match="unknown corruption"):
        inet.ImageNetC.enumerate(src, {"corruptions": ["rain"]})
    with pytest.raises(ValueError, match="severities must be integers from 1..5"):
        inet.ImageNetC.enumerate(src, {"severities": [0, 6]})
    with pytest.raises(ValueError, match="lacks 998 of the 1000"):
        inet.ImageNetC.enumerate(src, {"corruptions": "gaussian_noise"})
    for f in (src / "gaussian_noise" / "5").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((src / "gaussian_noise" / "5").rglob("*"), reverse=True):
        d.rmdir()
    (src / "gaussian_noise" / "5").rmdir()
    with pytest.raises(FileNotFoundError, match=r"gaussian_noise lacks severity folder\(s\) \[5\]"):
        inet.ImageNetC.enumerate(src, {"require_all_classes": False})
    jpeg(src / "val" / WNIDS[0] / "x.JPEG")
    with pytest.raises(ValueError, match=r"not ImageNet-C corruptions: \['val'\]"):
        inet.ImageNetC.enumerate(src, {"require_all_classes": False})
