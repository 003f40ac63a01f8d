"""The CLI stages chained in-process on a tiny world: outputs exist, follow the schema, and a
rerun with the same params produces byte-identical weights and identical metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from robustify.cli import main
from robustify.data.miniworld import generate
from robustify.eval.schema import COLUMNS

PRETRAIN = {"model": "tinyclip", "dataset": "miniworld", "steps": 3, "batch_size": 16, "lr": 0.002,
            "weight_decay": 0.1, "warmup_steps": 1, "shift_px": 2, "checkpoint_every": 2}
SPEC = {"family": "open_clip", "arch": "tinyclip-rn32", "checkpoint": None}


@pytest.fixture()
def world(tiny_world_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    generate(tiny_world_cfg, seed=0)
    return tiny_world_cfg.root


def _chain(root: str, out: str) -> tuple[bytes, pd.DataFrame]:
    common = ["--seed", "5", "--device", "cpu", "--threads", "1", "--experiment", "t"]
    main(["pretrain", "--params", json.dumps(PRETRAIN), "--model-spec", json.dumps(SPEC),
          "--dataset-root", root, "--out", f"{out}/pre", *common])
    spec = {**SPEC, "checkpoint": f"{out}/pre/model.safetensors"}
    zs = {"dataset": "miniworld", "templates": ["a photo of a {}.", "a {}."]}
    main(["zeroshot", "--params", json.dumps(zs), "--model-name", "tinyclip", "--model-spec", json.dumps(spec),
          "--train-dataset", "miniworld", "--dataset-root", root, "--out", f"{out}/zs", *common])
    ev = {"dataset": "miniworld", "split": "test", "domain": "sketch", "shift_type": "domain"}
    main(["evaluate", "--params", json.dumps({"batch_size": 7, "ece_bins": 15, "workers": 0}),
          "--classifier", f"{out}/zs", "--eval-name", "mw-sketch", "--eval-set", json.dumps(ev),
          "--dataset-root", root, "--dataset-type", "miniworld", "--out", f"{out}/m.parquet", *common])
    with open(f"{out}/pre/model.safetensors", "rb") as f:
        return f.read(), pd.read_parquet(f"{out}/m.parquet")


def test_stages_chain_and_reproduce(world, tiny_world_cfg):
    weights_a, rows_a = _chain(world, "a")
    weights_b, rows_b = _chain(world, "b")
    assert weights_a == weights_b
    assert tuple(rows_a.columns) == COLUMNS and list(rows_a["metric"]) == ["accuracy", "ece", "nll", "top5"]
    assert rows_a["n"].eq(tiny_world_cfg.test_per_domain).all()
    assert rows_a.loc[0, "model_id"] == "zeroshot/tinyclip" and rows_a.loc[0, "eval_dataset"] == "mw-sketch"
    pd.testing.assert_series_equal(rows_a["value"], rows_b["value"])
    assert rows_a.loc[0, "run_id"] != rows_b.loc[0, "run_id"]


def test_a_mistyped_section_key_is_named(world):
    bad = {**PRETRAIN, "stepz": 3}
    with pytest.raises(SystemExit, match="pretrain: unknown key\\(s\\) stepz"):
        main(["pretrain", "--params", json.dumps(bad), "--model-spec", json.dumps(SPEC),
              "--dataset-root", world, "--out", "x"])


def test_pretrain_refuses_images_of_the_wrong_size(world, tiny_world_cfg, tmp_path):
    big = dataclasses.replace(tiny_world_cfg, root=str(tmp_path / "big"), image_size=48)
    generate(big, seed=0)
    with pytest.raises(SystemExit, match="images are 48 px but tinyclip-rn32 expects"):
        main(["pretrain", "--params", json.dumps(PRETRAIN), "--model-spec", json.dumps(SPEC),
              "--dataset-root", big.root, "--out", "x", "--device", "cpu"])


def test_finetune_stage_trains_saves_and_evaluates(world, tiny_world_cfg):
    """pretrain → zeroshot → finetune (Lipsum-FT, `seen` pool from the captions) → evaluate; a rerun of
    the fine-tuning writes byte-identical weights."""
    _chain(world, "a")
    common = ["--seed", "1", "--device", "cpu", "--threads", "1", "--experiment", "t"]
    recipe = {"steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2}
    method = {"texts": 6, "vocab": "seen"}
    weights = []
    for out in ("ft1", "ft2"):
        main(["finetune", "--params", json.dumps(recipe), "--method", "lipsum-ft", "--method-params", json.dumps(method),
              "--model-name", "tinyclip", "--zeroshot", "a/zs", "--dataset-root", world, "--dataset-type", "miniworld",
              "--domain", "photo", "--corpus-split", "pretrain", "--train-dataset", "miniworld", "--out", out, *common])
        with open(f"{out}/encoder.safetensors", "rb") as f:
            weights.append(f.read())
    assert weights[0] == weights[1]
    info = json.loads(open("ft1/classifier.json").read())
    assert info["model_id"] == "ft/tinyclip/lipsum-ft/s1" and info["method_params"]["vocab"] == "seen"
    assert info["best_step"] in (2, 4) and not Path("ft1/resume.pt").exists()
    with open("a/pre/model.safetensors", "rb") as f:
        assert f.read() != weights[0]
    ev = {"dataset": "miniworld", "split": "test", "domain": "photo", "shift_type": "reference"}
    main(["evaluate", "--params", json.dumps({"batch_size": 7, "ece_bins": 15, "workers": 0}),
          "--classifier", "ft1", "--eval-name", "mw-photo", "--eval-set", json.dumps(ev),
          "--dataset-root", world, "--dataset-type", "miniworld", "--out", "ft.parquet", *common])
    rows = pd.read_parquet("ft.parquet")
    assert set(rows["method"]) == {"lipsum-ft"} and set(rows["seed"]) == {1}
    assert rows["n"].eq(tiny_world_cfg.test_per_domain).all()
