"""The corrupted-dataset builder: protocol, odd inputs, shards, byte-identical rebuilds, kill-and-rerun."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustify.cli import main
from robustify.corruptions.build import (
    BuildSpec,
    build_shard,
    build_sources,
    merge,
    resize_center_crop,
    shard_path,
    source_items,
    sources_paths,
    spec_from_params,
)
from robustify.data.registry import get_dataset
from robustify.io import write_json, write_parquet


def _photo(w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (np.sin(xx / 6) * np.cos(yy / 4) + 1) * 127], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _bomb_png(path: Path, side: int = 30_000) -> None:
    """A valid 1-bit PNG of side² pixels (~113 KB compressed): PIL refuses it as a decompression bomb."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# source file → (expected source_mode, or None when it must be rejected, reason fragment)
CORPUS = {
    "cat/rgb.jpg": ("RGB", None),
    "cat/cmyk.jpg": ("CMYK", None),
    "cat/grey.png": ("L", None),
    "dog/sixteen.png": ("I;16", None),
    "dog/alpha.png": ("RGBA", None),
    "dog/palette.png": ("P", None),
    "dog/truncated.jpg": (None, "unreadable"),
    "cat/empty.jpg": (None, "unreadable"),
    "cat/bomb.png": (None, "DecompressionBomb"),
    "dog/tiny.png": ("RGB", None),  # 20x20: the protocol's Resize(256) scales it up
    "dog/missing.png": (None, "file not found"),
}


def _write_corpus(root: Path) -> None:
    for rel in CORPUS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_photo(300, 260, 0))
    rgb.save(root / "cat/rgb.jpg", quality=95)
    rgb.convert("CMYK").save(root / "cat/cmyk.jpg", quality=95)
    Image.fromarray(_photo(280, 240, 1)[..., 0]).save(root / "cat/grey.png")
    Image.fromarray((_photo(260, 300, 2)[..., 1].astype(np.uint16) * 257)).save(root / "dog/sixteen.png")
    rgba = np.dstack([_photo(256, 256, 3), np.full((256, 256), 128, np.uint8)])
    Image.fromarray(rgba).save(root / "dog/alpha.png")
    Image.fromarray(_photo(300, 300, 4)).convert("P", palette=Image.ADAPTIVE).save(root / "dog/palette.png")
    buf = io.BytesIO()
    Image.fromarray(_photo(300, 260, 5)).save(buf, format="JPEG")
    (root / "dog/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (root / "cat/empty.jpg").write_bytes(b"")
    _bomb_png(root / "cat/bomb.png")
    Image.fromarray(_photo(20, 20, 6)).save(root / "dog/tiny.png")


def _prepared(root: Path, files: list[str]) -> Path:
    """A prepared imagefolder dataset whose manifest lists `files` as they are on disk now (the builder
    must cope with files that went bad after `prepare`)."""
    labels = {"cat": 0, "dog": 1}
    rows = [{"path": f, "label": labels[Path(f).parent.name], "split": "test"} for f in files]
    write_parquet(root / "manifest.parquet", pd.DataFrame(rows))
    write_json(root / "dataset.json", {"name": "pets", "classes": ["cat", "dog"]})
    return root


def _spec(**kw) -> BuildSpec:
    base = dict(dataset="pets", split="test", corruptions=("gaussian_noise", "defocus_blur"), severities=(3,))
    return BuildSpec(**{**base, **kw})


def test_every_odd_input_is_converted_or_rejected_with_its_reason(tmp_path: Path) -> None:
    src = _prepared(tmp_path / "pets", list(CORPUS))
    _write_corpus(src)
    dataset, spec, out = get_dataset("imagefolder", src), _spec(shards=2), tmp_path / "pets-c"
    shards = []
    for c in spec.corruptions:
        for k in range(spec.shards):
            build_shard(dataset, spec, c, 3, k, out, progress=False)
            shards.append(shard_path(out, c, 3, k))
    manifest, rejects = merge(out, spec, src, shards)

    built = set(manifest["source"])
    rejected = dict(zip(rejects["source"], rejects["reason"]))
    assert built | set(rejected) == set(CORPUS) and not built & set(rejected)  # fully accounted for
    for rel, (mode, reason) in CORPUS.items():
        if mode is None:
            assert reason in rejected[rel], (rel, rejected[rel])
        else:
            rows = manifest[manifest["source"] == rel]
            assert len(rows) == 2 and set(rows["source_mode"]) == {mode}  # one per corruption
    assert len(manifest) == 7 * 2
    for row in manifest.itertuples():
        with Image.open(out / row.path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (224, 224)
    assert manifest["path"].iloc[0].startswith("gaussian_noise/3/")
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["corrupted"]["rejected_sources"] == 4

    # at native size nothing scales the 20x20 image up to the 32 px the corruptions need
    native = _spec(resize=None, crop=None, corruptions=("gaussian_noise",))
    rows = build_shard(dataset, native, "gaussian_noise", 3, 0, tmp_path / "native", progress=False)
    reasons = dict(zip(rows["source"], rows["reject_reason"]))
    assert "too small" in reasons["dog/tiny.png"] and pd.isna(reasons["cat/rgb.jpg"])


@pytest.mark.parametrize("geometry", [{}, {"resize": None, "crop": None}], ids=["protocol", "native"])
def test_cached_sources_give_byte_identical_shards(tmp_path: Path, monkeypatch, geometry: dict) -> None:
    src = _prepared(tmp_path / "pets", list(CORPUS))
    _write_corpus(src)
    dataset, spec = get_dataset("imagefolder", src), _spec(shards=2, **geometry)
    fresh, cached = tmp_path / "fresh", tmp_path / "cached"
    indexes = [build_sources(dataset, spec, k, cached, progress=False) for k in range(spec.shards)]
    index = pd.concat(indexes)
    reasons = dict(zip(index["source"], index["reject_reason"]))
    assert set(index["source"]) == set(CORPUS) and "DecompressionBomb" in reasons["cat/bomb.png"]
    assert index["height"].gt(0).sum() == (7 if not geometry else 6)  # native: the 20x20 image is too small
    pixels = np.load(sources_paths(cached, 0)[0], mmap_mode="r")
    assert isinstance(pixels, np.memmap) and pixels.dtype == np.uint8 and pixels.ndim == 1
    built = []
    for c in spec.corruptions:
        for k in range(spec.shards):
            a = build_shard(dataset, spec, c, 3, k, fresh, progress=False)
            b = build_shard(dataset, spec, c, 3, k, cached, progress=False, sources=sources_paths(cached, k)[0])
            pd.testing.assert_frame_equal(a, b)
            assert shard_path(fresh, c, 3, k).read_bytes() == shard_path(cached, c, 3, k).read_bytes()
            for rel in a["path"].dropna():
                assert (fresh / rel).read_bytes() == (cached / rel).read_bytes()
            built.append(b)
    built = pd.concat(built)  # the odd inputs went through the cache: converted ones and rejected ones
    assert {"CMYK", "I;16", "P", "RGBA", "L"} <= set(built["source_mode"].dropna())
    assert built["reject_reason"].notna().sum() == 2 * (4 if not geometry else 5)

    # the same through the CLI: `corrupt-sources`, then `corrupt --sources`
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = json.dumps({k: v for k, v in dataclasses.asdict(spec).items() if k != "seed"})
    common = ["--name", "pets-c", "--params", params, "--source-root", str(src), "--source-type", "imagefolder",
              "--shard", "1", "--out", str(tmp_path / "cli"), "--experiment", "t"]
    main(["corrupt-sources", *common])
    main(["corrupt", *common, "--corruption", "defocus_blur", "--severity", "3",
          "--sources", str(sources_paths(tmp_path / "cli", 1)[0])])
    assert (shard_path(tmp_path / "cli", "defocus_blur", 3, 1).read_bytes()
            == shard_path(fresh, "defocus_blur", 3, 1).read_bytes())


def test_a_cache_of_other_items_or_geometry_is_refused(tmp_path: Path) -> None:
    src = _prepared(tmp_path / "pets", list(CORPUS))
    _write_corpus(src)
    dataset, out = get_dataset("imagefolder", src), tmp_path / "c"
    npy = sources_paths(out, 0)[0]
    build_sources(dataset, _spec(max_images=5), 0, out, progress=False)
    with pytest.raises(ValueError, match=r"sources/0\.npy: decoded-source cache does not match.*5 cached items vs 11"):
        build_shard(dataset, _spec(), "gaussian_noise", 3, 0, out, progress=False, sources=npy)
    build_sources(dataset, _spec(resize=None, crop=None), 0, out, progress=False)
    with pytest.raises(ValueError, match=r"sources/0\.npy: .*built with .*'resize': None"):
        build_shard(dataset, _spec(), "gaussian_noise", 3, 0, out, progress=False, sources=npy)
    npy.with_suffix(".parquet").unlink()  # an interrupted cache build leaves no index
    with pytest.raises(ValueError, match=r"sources/0\.npy: decoded-source cache has no index"):
        build_shard(dataset, _spec(), "gaussian_noise", 3, 0, out, progress=False, sources=npy)
    assert not shard_path(out, "gaussian_noise", 3, 0).exists() and not list(out.glob("gaussian_noise/**/*.jpg"))


def test_merge_refuses_missing_shards(tmp_path: Path) -> None:
    src = _prepared(tmp_path / "pets", ["cat/rgb.jpg"])
    _write_corpus(src)
    spec = _spec(shards=2)
    build_shard(get_dataset("imagefolder", src), spec, "gaussian_noise", 3, 0, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="missing e.g."):
        merge(tmp_path / "c", spec, src, [shard_path(tmp_path / "c", "gaussian_noise", 3, 0)])


def test_protocol_resize_crop_matches_torchvision() -> None:
    import torchvision.transforms as T

    ref = T.Compose([T.Resize(256), T.CenterCrop(224)])
    for w, h in ((500, 375), (375, 500), (256, 256), (231, 999)):
        im = Image.fromarray(_photo(w, h, w))
        assert np.array_equal(np.asarray(resize_center_crop(im, 256, 224)), np.asarray(ref(im)))


def test_spec_from_params_names_the_key() -> None:
    spec = spec_from_params({"dataset": "x", "split": "test", "corruptions": "common", "severities": [1, 2],
                             "resize": None, "crop": None, "shards": 3}, "corrupt.x-c", seed=4)
    assert len(spec.corruptions) == 15 and spec.severities == (1, 2) and spec.seed == 4
    with pytest.raises(ValueError, match="corrupt.x-c.corruptions: unknown name"):
        spec_from_params({"dataset": "x", "split": "t", "corruptions": ["fogg"], "severities": [1],
                          "resize": None, "crop": None, "shards": 1}, "corrupt.x-c", 0)
    with pytest.raises(ValueError, match="resize and crop"):
        _spec(resize=256, crop=None)


def test_subset_is_seeded_and_keeps_source_order(tmp_path: Path) -> None:
    files = [f"cat/{i:03d}.png" for i in range(50)]
    src = _prepared(tmp_path / "pets", files)
    dataset = get_dataset("imagefolder", src)
    a = source_items(dataset, _spec(max_images=10))["source"].tolist()
    assert a == source_items(dataset, _spec(max_images=10))["source"].tolist() and a == sorted(a) and len(a) == 10
    assert a != source_items(dataset, _spec(max_images=10, seed=1))["source"].tolist()


# ------------------------------------------------------------------ byte-identical, and kill-and-rerun
N_IMAGES = 120


def _many(root: Path) -> Path:
    files = [f"{'cat' if i % 2 else 'dog'}/{i:03d}.png" for i in range(N_IMAGES)]
    src = _prepared(root, files)
    for i, rel in enumerate(files):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_photo(300, 260, i)).save(src / rel, compress_level=1)
    return src


def _cli(src: Path, out: Path, spec: BuildSpec, corruption: str, shard: int, env: dict[str, str]) -> list[str]:
    params = {k: v for k, v in dataclasses.asdict(spec).items() if k != "seed"}
    return [sys.executable, "-m", "robustify.cli", "corrupt", "--name", "pets-c", "--params", json.dumps(params),
            "--source-root", str(src), "--source-type", "imagefolder", "--corruption", corruption,
            "--severity", "3", "--shard", str(shard), "--out", str(out), "--seed", str(spec.seed)]


def test_killed_build_resumes_to_a_byte_identical_manifest(tmp_path: Path) -> None:
    src = _many(tmp_path / "pets")
    spec = _spec(corruptions=("zoom_blur",), shards=2)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "ROBUSTIFY_EXPERIMENT": "t"}

    # the uninterrupted reference build, in-process
    dataset = get_dataset("imagefolder", src)
    for k in range(2):
        build_shard(dataset, spec, "zoom_blur", 3, k, tmp_path / "ref", progress=False)
    merge(tmp_path / "ref", spec, src, [shard_path(tmp_path / "ref", "zoom_blur", 3, k) for k in range(2)])

    # the same build through the CLI, killed (SIGKILL) after a few images of shard 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(src, out, spec, "zoom_blur", 0, env), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("zoom_blur/3/*/*.jpg"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(out.glob("zoom_blur/3/*/*.jpg")))
    assert 3 <= written < N_IMAGES // 2, f"the kill must land mid-shard ({written} images written)"
    assert not shard_path(out, "zoom_blur", 3, 0).exists()  # an interrupted shard is never marked done
    for jpg in out.glob("zoom_blur/3/*/*.jpg"):  # what is visible is whole (temp files are hidden .tmp)
        with Image.open(jpg) as im:
            im.load()

    # rerun what is missing (shard 0 again, shard 1 for the first time), merge, compare bytes
    for k in range(2):
        subprocess.run(_cli(src, out, spec, "zoom_blur", k, env), env=env, check=True, capture_output=True)
    merge(out, spec, src, [shard_path(out, "zoom_blur", 3, k) for k in range(2)])
    ref_manifest = (tmp_path / "ref" / "manifest.parquet").read_bytes()
    assert (out / "manifest.parquet").read_bytes() == ref_manifest
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == N_IMAGES and m["sha256"].nunique() == N_IMAGES and m["seed"].nunique() == N_IMAGES
    for rel in m["path"][:10]:
        assert (out / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()


def test_objectnet_c_is_built_from_the_cropped_overlap_classes(tmp_path: Path) -> None:
    import torch
    from test_datasets_objectnet import FOLDER_TO_LABEL, OVERLAP_FOLDERS, framed_png, write_mappings

    from robustify.data.prepare import prepare
    from robustify.data.registry import corrupted_type

    release = tmp_path / "objectnet-1.0"
    write_mappings(release / "mappings")
    for folder in FOLDER_TO_LABEL:
        framed_png(release / "images" / folder / f"{folder}_0.png", 64, 48)
    prepare("objectnet", release, tmp_path / "objectnet", {"classes": "overlap"}, workers=1)
    source = get_dataset("objectnet", tmp_path / "objectnet", {"classes": "overlap"})
    # native size, so the only geometry is ObjectNet's own 2-px border crop: 64x48 → 60x44
    spec = BuildSpec(dataset="objectnet", split="test", corruptions=("contrast",), severities=(1,), resize=None,
                     crop=None)
    build_shard(source, spec, "contrast", 1, 0, tmp_path / "objectnet-c", progress=False)
    merge(tmp_path / "objectnet-c", spec, tmp_path / "objectnet", [shard_path(tmp_path / "objectnet-c", "contrast", 1, 0)])

    assert corrupted_type("objectnet") == "objectnet-c"
    built = get_dataset("objectnet-c", tmp_path / "objectnet-c", {"classes": "overlap"})
    items = built.select("test")
    assert sorted(p.split("/")[-2] for p in items["path"]) == OVERLAP_FOLDERS  # only the 113-overlap classes
    for path in items["path"]:  # cropped once, before corrupting; objectnet-c does not crop again
        with Image.open(path) as im:
            assert im.size == (60, 44)
        assert built.load_image(path).size == (60, 44)
    logits = torch.zeros(len(items), 1000)
    assert built.project_logits(logits).shape == (len(items), len(OVERLAP_FOLDERS))


def test_same_named_sources_in_two_domains_never_overwrite_each_other(tmp_path: Path) -> None:
    src = tmp_path / "dn"
    rows = []
    for domain in ("real", "sketch"):
        path = src / domain / "cat" / "0001.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(_photo(40, 40, len(rows))).save(path)
        rows.append({"path": f"{domain}/cat/0001.png", "label": 0, "split": "test"})
    write_parquet(src / "manifest.parquet", pd.DataFrame(rows))
    write_json(src / "dataset.json", {"classes": ["cat"]})
    spec = _spec(corruptions=("contrast",), resize=None, crop=None)
    out = build_shard(get_dataset("imagefolder", src), spec, "contrast", 3, 0, tmp_path / "c", progress=False)
    assert out["path"].nunique() == 2 and all(p.startswith("contrast/3/cat/0001-") for p in out["path"])
    assert len(list((tmp_path / "c").glob("contrast/3/cat/*.jpg"))) == 2
