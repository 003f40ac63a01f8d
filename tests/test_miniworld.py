"""The mini-world is a real on-disk dataset and a pure function of (config, seed)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from robustify.data.miniworld import generate
from robustify.data.registry import get_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.parquet"
    }


def test_same_seed_gives_byte_identical_files(tiny_world_cfg, tmp_path):
    a = generate(tiny_world_cfg, seed=3, out_dir=tmp_path / "a")
    # Other worker count and chunk order must not matter: every item has its own derived seed.
    b = generate(dataclasses.replace(tiny_world_cfg, workers=2), seed=3, out_dir=tmp_path / "b")
    pd.testing.assert_frame_equal(a, b)
    digest_a, digest_b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert len(digest_a) == len(a) + 1  # every image + dataset.json
    assert digest_a == digest_b


def test_other_seed_gives_other_images(tiny_world_cfg, tmp_path):
    generate(tiny_world_cfg, seed=0, out_dir=tmp_path / "a")
    generate(tiny_world_cfg, seed=1, out_dir=tmp_path / "b")
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) == len(images)


def test_splits_layout_and_captions(tiny_world_cfg):
    manifest = generate(tiny_world_cfg, seed=0)
    cfg = tiny_world_cfg
    counts = manifest.groupby(["split", "domain"]).size().to_dict()
    assert counts[("train", "photo")] == cfg.train and counts[("val", "photo")] == cfg.val
    for dom in cfg.domains:
        assert counts[("test", dom)] == cfg.test_per_domain
    pre = manifest[manifest["split"] == "pretrain"]
    assert len(pre) == cfg.pretrain_pairs and set(pre["domain"]) == set(cfg.domains)
    # Captions exist exactly for the pre-training pairs, and most of them name the true shape.
    assert pre["caption"].notna().all() and manifest.loc[manifest["split"] != "pretrain", "caption"].isna().all()
    named = [c for c, s in zip(pre["caption"], pre["class_name"]) if s in c]
    assert len(named) / len(pre) > 0.6
    # Class-balanced splits, class folders, images at the configured size, decodable as RGB.
    test = manifest[manifest["split"] == "test"]
    assert test.groupby("domain")["label"].apply(lambda s: np.bincount(s, minlength=len(cfg.classes)).min()).min() >= 1
    first = manifest.iloc[0]
    assert f"/{first['class_name']}/" in first["path"]
    with Image.open(Path(cfg.root) / first["path"]) as im:
        assert im.size == (cfg.image_size, cfg.image_size) and im.mode == "RGB"


def test_registry_reads_it_like_any_dataset(tiny_world_cfg):
    generate(tiny_world_cfg, seed=0)
    ds = get_dataset("miniworld", tiny_world_cfg.root)
    assert ds.classnames == list(tiny_world_cfg.classes)
    sketch = ds.select("test", "sketch")
    assert len(sketch) == tiny_world_cfg.test_per_domain and all(Path(p).is_file() for p in sketch["path"])


def test_regeneration_replaces_the_world_without_leftovers(tiny_world_cfg):
    generate(tiny_world_cfg, seed=0)
    smaller = dataclasses.replace(tiny_world_cfg, test_per_domain=6)
    manifest = generate(smaller, seed=0)
    on_disk = {str(p.relative_to(smaller.root)) for p in Path(smaller.root, "images").rglob("*.png")}
    assert on_disk == set(manifest["path"])
    assert not list(Path(smaller.root).glob(".images-staging-*"))
