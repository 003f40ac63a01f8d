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


def test_posthoc_chain_wise_sweep_tpgm_soups_and_energy_gaps(world, tiny_world_cfg):
    """finetune (2 seeds) → evaluate-tuned with a WiSE sweep and energy gaps → TPGM → soups → evaluate-tuned
    on the soup and the greedy ensemble: the sweep's ends reproduce the endpoints' rows, θ0 has gap 0,
    TPGM stays inside the fine-tuned ball, the uniform soup is the mean of its members."""
    import torch

    from robustify.io import load_safetensors

    _chain(world, "a")
    common = ["--device", "cpu", "--threads", "1", "--experiment", "t"]
    recipe = {"steps": 4, "batch_size": 8, "lr": 1e-3, "eval_every": 2}
    data = ["--dataset-root", world, "--dataset-type", "miniworld", "--domain", "photo"]
    for seed in (0, 1):
        main(["finetune", "--params", json.dumps(recipe), "--method", "ft", "--model-name", "tinyclip",
              "--run-name", "myft", "--zeroshot", "a/zs", *data, "--train-dataset", "miniworld", "--out", f"ft{seed}",
              "--seed", str(seed), *common])
    sets = {name: {"eval_set": {"dataset": "miniworld", "split": "test", "domain": dom, "shift_type": kind},
                   "root": world, "type": "miniworld"}
            for name, dom, kind in (("mw-photo", "photo", "reference"), ("mw-sketch", "sketch", "domain"))}
    ev = ["--params", json.dumps({"batch_size": 7, "ece_bins": 15, "workers": 0}), "--sets", json.dumps(sets),
          "--energy-gap", json.dumps({"texts": 50, "length": 4, "vocab": "full", "seed": 0})]
    main(["evaluate-tuned", *ev, "--classifier", "ft0", "--zeroshot", "a/zs", "--wise-alphas", "[0, 0.5, 1]",
          "--out-dir", "m/ft0", "--wise-out-dir", "m/wise0", *common])
    ft = pd.read_parquet("m/ft0/mw-sketch.parquet").set_index("metric")["value"]
    w0 = pd.read_parquet("m/wise0/a0/mw-sketch.parquet")
    w1 = pd.read_parquet("m/wise0/a1/mw-sketch.parquet").set_index("metric")["value"]
    half = pd.read_parquet("m/wise0/a0.5/mw-sketch.parquet").set_index("metric")["value"]
    assert set(w0["model_id"]) == {"wise/tinyclip/myft/s0/a0"} and set(w0["method"]) == {"wise"}
    assert json.loads(w0["method_params"].iloc[0]) == {"alpha": 0.0, "base": "myft"}
    zs = pd.read_parquet("a/m.parquet").set_index("metric")["value"]  # zero-shot on sketch, per-set job
    w0 = w0.set_index("metric")["value"]
    for metric in ("accuracy", "ece", "nll"):
        assert w0[metric] == pytest.approx(zs[metric], abs=1e-6)
        assert w1[metric] == ft[metric]
    assert w0["energy_gap"] == 0.0 and ft["energy_gap"] > 0 and 0 < half["energy_gap"] < ft["energy_gap"]

    main(["posthoc", "--kind", "tpgm", "--params", json.dumps({"steps": 5, "batch_size": 16}), "--finetuned", "ft0",
          "--zeroshot", "a/zs", "--dataset-root", world, "--dataset-type", "miniworld", "--domain", "photo",
          "--out", "tp", "--seed", "0", *common])
    info = json.loads(open("tp/classifier.json").read())
    assert info["model_id"] == "tpgm/tinyclip/myft/s0" and info["method_params"]["base"] == "myft"
    theta0 = load_safetensors("a/pre/model.safetensors")
    tuned, projected = load_safetensors("ft0/encoder.safetensors"), load_safetensors("tp/encoder.safetensors")
    for name, value in projected.items():
        if value.is_floating_point() and "running" not in name and "num_batches" not in name:
            start = theta0[f"visual.{name}"]
            assert (value - start).norm() <= (tuned[name] - start).norm() * (1 + 1e-5) + 1e-7, name

    outs = {"uniform-soup": "soup", "greedy-ensemble": "ens"}
    main(["soups", "--members", "ft0", "ft1", "--out-dirs", json.dumps(outs), "--dataset-root", world,
          "--dataset-type", "miniworld", "--domain", "photo", *common])
    soup = load_safetensors("soup/encoder.safetensors")
    members = [load_safetensors(f"ft{s}/encoder.safetensors") for s in (0, 1)]
    name = next(k for k, v in soup.items() if v.is_floating_point() and v.ndim > 1)
    torch.testing.assert_close(soup[name], (members[0][name] + members[1][name]) / 2)
    ens = json.loads(open("ens/classifier.json").read())
    assert ens["head_type"] == "ensemble" and set(ens["members"]) <= {"ft0", "ft1"}
    assert ens["model_id"] == "greedy-ensemble/tinyclip/myft"
    main(["evaluate-tuned", *ev, "--classifier", "ens", "--out-dir", "m/ens", *common])
    rows = pd.read_parquet("m/ens/mw-photo.parquet")
    assert "energy_gap" not in set(rows["metric"])  # an output ensemble has no single image tower
    if ens["members"] == ["ft0"]:  # one member: the ensemble is that model
        ref = pd.read_parquet("m/ft0/mw-photo.parquet").set_index("metric")["value"]
        assert rows.set_index("metric")["value"]["accuracy"] == ref["accuracy"]


def test_unimodal_student_imports_a_timm_classifier_distils_from_it_and_evaluates(world, tiny_world_cfg):
    """Paper Table 3's path: import-timm (a pre-trained timm classifier with its own head) → finetune
    (three-head, from that classifier, with a timm teacher) → evaluate-tuned with MC head selection; a
    CLIP-only method and a head of the wrong size are refused with the key named."""
    import timm
    import torch
    from safetensors.torch import save_file

    from robustify.methods.distill.checkpoint import is_student_dir, load_student
    from robustify.models.timm_models import save_timm_classifier, timm_classifier
    from robustify.models.zeroshot import load_classifier

    common = ["--device", "cpu", "--threads", "1", "--experiment", "t"]
    data = ["--dataset-root", world, "--dataset-type", "miniworld"]
    classes = len(tiny_world_cfg.classes)
    torch.manual_seed(0)
    pretrained = timm.create_model("test_resnet", num_classes=classes).eval()
    Path("ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, "ckpt/student.safetensors")
    spec = {"family": "timm", "arch": "test_resnet", "checkpoint": "ckpt/student.safetensors", "image_size": 32}
    main(["import-timm", "--model-name", "stu", "--model-spec", json.dumps(spec), *data, "--train-dataset",
          "miniworld", "--out", "timm/stu", *common])
    start, info = load_classifier("timm/stu")
    assert info["model_id"] == "timm/stu" and info["method"] == "pretrained" and len(info["classes"]) == classes
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(start(x), pretrained(x))
    save_timm_classifier("teacher", timm_classifier(timm.create_model("test_resnet", num_classes=classes).eval(), 32),
                         "test_resnet", {"model_id": "teachers/t"})

    recipe = {"steps": 3, "batch_size": 8, "lr": 1e-3, "eval_every": 3, "augment": "none"}
    method = {"fraction_tuned": 0.5, "cache_prefix": True}
    main(["finetune", "--params", json.dumps(recipe), "--method", "three-head", "--method-params", json.dumps(method),
          "--model-name", "stu", "--run-name", "ours", "--model-id", "distill/stu/t/ours/s0", "--teacher", "teacher",
          "--teacher-name", "t", "--zeroshot", "timm/stu", *data, "--domain", "photo", "--train-dataset", "miniworld",
          "--out", "d", "--seed", "0", *common])
    assert is_student_dir("d")
    view, dinfo = load_student("d")
    assert dinfo["model_id"] == "distill/stu/t/ours/s0" and dinfo["family"] == "timm" and dinfo["zeroshot"] == "timm/stu"
    # the frozen prefix is the pre-trained model's own; the tuned trailing blocks moved
    assert torch.equal(view.student.prefix.pre.conv1[0].weight, pretrained.conv1[0].weight)
    assert not torch.equal(view.student.shared[0].conv1.weight, pretrained.layer3[0].conv1.weight)

    sets = {"mw-photo": {"eval_set": {"dataset": "miniworld", "split": "test", "domain": "photo",
                                      "shift_type": "reference"}, "root": world, "type": "miniworld"}}
    ev = ["--params", json.dumps({"batch_size": 7, "ece_bins": 15, "workers": 0}), "--sets", json.dumps(sets)]
    main(["evaluate-tuned", *ev, "--classifier", "d", "--out-dir", "m/d", "--cost-out", "m/d/cost.parquet", *common])
    rows = pd.read_parquet("m/d/mw-photo.parquet").set_index("metric")["value"]
    assert rows["accuracy"] == pytest.approx(rows["accuracy_select_ours"], abs=1e-6) and 0 <= rows["f_correct_ours"] <= 1
    cost = pd.read_parquet("m/d/cost.parquet").set_index("metric")["value"]
    assert 0 < cost["trainable_params"] < sum(p.numel() for p in pretrained.parameters()) * 3
    # the start point is evaluated per set, as a zero-shot classifier is (Table 3's "Standard training" row)
    main(["evaluate", "--params", json.dumps({"batch_size": 7, "ece_bins": 15, "workers": 0}), "--classifier",
          "timm/stu", "--eval-name", "mw-photo", "--eval-set", json.dumps(sets["mw-photo"]["eval_set"]), *data,
          "--out", "m/s.parquet", *common])
    start_rows = pd.read_parquet("m/s.parquet")
    assert set(start_rows["model_id"]) == {"timm/stu"} and set(start_rows["method"]) == {"pretrained"}
    assert start_rows["n"].eq(tiny_world_cfg.test_per_domain).all()

    # FT from the same classifier, then its WiSE-FT sweep with the timm start as the α = 0 end
    main(["finetune", "--params", json.dumps({**recipe, "lr": 1e-2}), "--method", "ft", "--model-name", "stu",
          "--zeroshot", "timm/stu", *data, "--domain", "photo", "--train-dataset", "miniworld", "--out", "ft",
          "--seed", "0", *common])
    tuned, finfo = load_classifier("ft")
    assert finfo["model_id"] == "ft/stu/ft/s0" and finfo["family"] == "timm"
    with torch.no_grad():
        assert not torch.equal(tuned(x), pretrained(x))
    main(["evaluate-tuned", *ev, "--classifier", "ft", "--zeroshot", "timm/stu", "--wise-alphas", "[0, 1]",
          "--out-dir", "m/ft", "--wise-out-dir", "m/wise", *common])
    ft_acc = pd.read_parquet("m/ft/mw-photo.parquet").set_index("metric")["value"]
    ends = [pd.read_parquet(f"m/wise/a{a}/mw-photo.parquet").set_index("metric")["value"] for a in (0, 1)]
    assert ends[0]["accuracy"] == start_rows.set_index("metric")["value"]["accuracy"]
    assert ends[1]["accuracy"] == ft_acc["accuracy"] and "energy_gap" not in ft_acc

    with pytest.raises(SystemExit, match="method 'zs-ft' .* needs a CLIP start point .* timm/stu is a timm classifier"):
        main(["finetune", "--params", json.dumps(recipe), "--method", "zs-ft", "--model-name", "stu",
              "--zeroshot", "timm/stu", *data, "--domain", "photo", "--out", "z", *common])
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=5).state_dict().items()},
              "ckpt/five.safetensors")
    with pytest.raises(SystemExit, match=f"models.five: the checkpoint ckpt/five.safetensors has a 5-class head, "
                                         f"but dataset 'miniworld' has {classes} classes"):
        main(["import-timm", "--model-name", "five", "--model-spec", json.dumps({**spec, "checkpoint": "ckpt/five.safetensors"}),
              *data, "--train-dataset", "miniworld", "--out", "timm/five", *common])
    assert not Path("timm/five/classifier.json").exists()
