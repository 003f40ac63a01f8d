"""ImageNet-P-style sequence sets: filmstrips, rebuild determinism, rejects, and flip-probability evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from robustify.corruptions.sequence_build import (
    build_sequence_shard,
    filmstrip,
    load_sequence,
    merge_sequences,
    sequence_shard_path,
    sequence_spec_from_params,
    split_filmstrip,
)
from robustify.data.registry import get_dataset
from robustify.io import write_json, write_parquet


def _world(root: Path, n: int = 6) -> Path:
    rows = []
    rng = np.random.default_rng(0)
    for i in range(n):
        rel = f"{'a' if i % 2 else 'b'}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / rel)
        rows.append({"path": rel, "label": i % 2, "split": "test"})
    rows.append({"path": "a/gone.png", "label": 1, "split": "test"})
    write_parquet(root / "manifest.parquet", pd.DataFrame(rows))
    write_json(root / "dataset.json", {"classes": ["b", "a"]})
    return root


def _spec(**kw):
    params = {"dataset": "toy", "split": "test", "perturbations": ["gaussian_noise", "translate"], "difficulty": 1,
              "resize": None, "crop": None, "shards": 2, **kw}
    return sequence_spec_from_params(params, "perturb.toy-p", seed=0)


def _build(src: Path, out: Path, spec) -> pd.DataFrame:
    ds = get_dataset("imagefolder", src)
    for p in spec.perturbations:
        for k in range(spec.shards):
            build_sequence_shard(ds, spec, p, k, out, progress=False)
    shards = [sequence_shard_path(out, p, k) for p in spec.perturbations for k in range(spec.shards)]
    manifest, rejects = merge_sequences(out, spec, src, shards)
    assert rejects["source"].tolist() == ["a/gone.png"] and "file not found" in rejects["reason"].item()
    return manifest


def test_filmstrip_roundtrip() -> None:
    frames = np.random.default_rng(1).integers(0, 255, (5, 4, 3, 3), dtype=np.uint8)
    assert np.array_equal(split_filmstrip(filmstrip(frames), 5), frames)
    with pytest.raises(ValueError, match="does not hold 3 equal frames"):
        split_filmstrip(filmstrip(frames), 3)


def test_sequence_sets_rebuild_byte_identically(tmp_path: Path) -> None:
    src = _world(tmp_path / "toy")
    spec = _spec()
    m1 = _build(src, tmp_path / "p1", spec)
    m2 = _build(src, tmp_path / "p2", spec)
    assert (tmp_path / "p1/manifest.parquet").read_bytes() == (tmp_path / "p2/manifest.parquet").read_bytes()
    assert m1.groupby("perturbation")["frames"].first().to_dict() == {"gaussian_noise": 31, "translate": 41}
    assert len(m1) == 12 and m1["perturbation"].iloc[0] == "gaussian_noise"
    frames = load_sequence(str(tmp_path / "p1" / m1["path"].iloc[0]), 31)
    assert len(frames) == 31 and frames[0].size == (48, 40)
    with pytest.raises(ValueError, match="perturb.toy-p.perturbations: unknown name"):
        _spec(perturbations=["wobble"])


def test_flip_probability_of_a_constant_and_of_a_pixel_reading_classifier(tmp_path: Path) -> None:
    from robustify.eval.sequences import evaluate_sequences

    src = _world(tmp_path / "toy")
    spec = _spec(shards=1)
    _build(src, tmp_path / "p", spec)
    ds = get_dataset("imagefolder", tmp_path / "p")
    frame = ds.select("test")

    class Constant(torch.nn.Module):
        def forward(self, x):  # always class 1: never flips, accuracy = share of label-1 sequences
            return torch.tensor([0.0, 1.0]).expand(len(x), 2)

    identity = lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()  # noqa: E731
    rows = evaluate_sequences(Constant(), ds, frame, identity, 64, 0, "cpu", {"model_id": "c", "eval_dataset": "p"})
    fp = rows[rows["metric"] == "flip_probability"].set_index("corruption")["value"]
    acc = rows[rows["metric"] == "accuracy"].set_index("corruption")["value"]
    assert fp.to_dict() == {"gaussian_noise": 0.0, "translate": 0.0}
    assert acc["translate"] == pytest.approx(0.5)

    class Brightest(torch.nn.Module):
        """Class = whether the mean of the left half exceeds the right half's: translation flips it."""

        def forward(self, x):
            w = x.shape[-1] // 2
            d = x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3))
            return torch.stack([-d, d], dim=1)

    rows = evaluate_sequences(Brightest(), ds, frame, identity, 64, 0, "cpu", {"model_id": "b", "eval_dataset": "p"})
    fp = rows[rows["metric"] == "flip_probability"].set_index("corruption")["value"]
    assert 0.0 < fp["translate"] < 0.5  # some of the 40 consecutive shifts flip the side, most do not
