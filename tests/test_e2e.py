"""The whole DAG on the tiny CI world in a temp directory: Snakemake, MLflow and DVC together.

The workflow files are copied into the temp directory (with tests/configs/ci.yaml merged into its
params.yaml) so that `dvc repro`, which reads params.yaml and runs `snakemake <target>` in the
repository root, sees exactly what a user's checkout holds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from robustify.config import deep_merge, load_yaml

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
CHANCE = 1 / 12


def _run(args: list[str], cwd: Path, timeout: int = 600) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, repo) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    for name in ("Snakefile", "dvc.yaml", "environment.yml", "workflow", "profiles"):
        src = repo / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    # DVC stages depend on the code they run; the installed package still runs it.
    shutil.copytree(repo / "src/robustify", work / "src/robustify", ignore=shutil.ignore_patterns("__pycache__"))
    params = deep_merge(load_yaml(repo / "params.yaml"), load_yaml(repo / "tests/configs/ci.yaml"))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([str(BIN / "snakemake"), "--cores", "2", "all"], work)
    return work


def test_table_is_sane(workdir):
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    df = df[df["model_id"] == "zeroshot/tinyclip"]
    domains = df[df["eval_dataset"].str.fullmatch(r"miniworld-(photo|sketch|clipart|painting|infographic)")]
    acc = domains[domains["metric"] == "accuracy"].set_index("eval_dataset")["value"]
    assert len(acc) == 5 and domains["n"].eq(300).all()
    # The full run is far above chance on photo, sketch and clipart; the tiny world at least on these.
    assert acc["miniworld-sketch"] > 2 * CHANCE and acc["miniworld-clipart"] > 2 * CHANCE
    assert acc["miniworld-photo"] > CHANCE
    ece = df[df["metric"] == "ece"]["value"]
    assert ece.between(0, 1).all() and df[df["metric"] == "nll"]["value"].gt(0).all()
    table = (workdir / "results/tables/zeroshot.md").read_text()
    assert "zeroshot/tinyclip" in table and "miniworld-infographic" in table
    assert "zeroshot/tinyclip" in (workdir / "results/summary.json").read_text()


def test_corrupted_and_sequence_sets_are_built_and_scored(workdir):
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    df = df[df["model_id"] == "zeroshot/tinyclip"]
    cells = df[(df["eval_dataset"] == "miniworld-c") & (df["metric"] == "accuracy")]
    assert len(cells) == 3 * 5 and cells["n"].eq(60).all() and cells["severity"].notna().all()
    mce = df[(df["eval_dataset"] == "miniworld-c") & (df["metric"] == "relative_mce_subset")]
    assert mce["corruption"].item() == "gaussian_noise+defocus_blur+contrast" and mce["value"].notna().all()
    manifest = pd.read_parquet(workdir / "data/miniworld-c/manifest.parquet")
    assert len(manifest) == 3 * 5 * 60 and manifest["sha256"].nunique() == len(manifest)
    fp = df[(df["eval_dataset"] == "miniworld-p") & (df["metric"] == "flip_probability")]
    assert sorted(fp["corruption"]) == ["gaussian_noise", "rotate", "translate"] and fp["n"].eq(20).all()
    assert fp["value"].between(0, 1).all() and fp["value"].gt(0).any()
    mfr = df[(df["eval_dataset"] == "miniworld-p") & (df["metric"] == "mfr")]
    assert mfr["value"].item() == pytest.approx(1.0)  # the zero-shot model is its own flip-rate baseline
    table = (workdir / "results/tables/robustness.md").read_text()
    assert "miniworld-c: top-1 accuracy (%) per corruption" in table and "miniworld-p: flip probability" in table


def test_one_mlflow_run_per_job(workdir):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("robustify-ci")
    runs = client.search_runs([exp.experiment_id])
    stages = sorted(r.data.tags["stage"] for r in runs)
    # evaluate: 7 zero-shot sets, 4 fine-tuned runs (+ their WiSE sweeps), 4 post-hoc models, the teacher and
    # 6 distillation runs; finetune: 4 fine-tuning + 6 distillation runs (one loop); posthoc: TPGM, TPGM-C, soups
    expected = (["corrupt"] * 30 + ["corrupt_merge"] + ["corrupt_sources"] * 2 + ["evaluate"] * 22
                + ["finetune"] * 10 + ["miniworld", "perturb", "perturb", "perturb", "perturb_merge", "pipeline"]
                + ["posthoc"] * 3 + ["pretrain", "report", "teacher", "zeroshot"])
    assert stages == expected
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    jobs = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in jobs)
    assert all(r.info.status == "FINISHED" for r in runs)
    evaluate = [r for r in jobs if r.data.tags["stage"] == "evaluate"]
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    assert set(df["run_id"]) == {r.data.tags["robustify.run_id"] for r in evaluate}
    assert not any((workdir / ".robustify/tracking-spool").iterdir())  # every spooled run was loaded


def test_second_run_does_nothing_and_param_change_reruns_only_dependents(workdir):
    out = _run([str(BIN / "snakemake"), "--cores", "2", "all"], workdir)
    assert "Nothing to be done" in out
    override = workdir / "change.yaml"
    override.write_text("evaluate: {ece_bins: 10}\n")
    out = _run([str(BIN / "snakemake"), "-n", "--cores", "2", "all", "--configfile", "params.yaml", str(override)], workdir)
    jobs = [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))]
    assert sorted(set(jobs)) == ["all", "evaluate", "evaluate_distilled", "evaluate_finetuned",
                                 "evaluate_finetuned_alone", "evaluate_posthoc", "report"]
    assert jobs.count("evaluate") == 7 and jobs.count("evaluate_posthoc") == 4
    assert jobs.count("evaluate_distilled") == 7  # the teacher and the 6 distillation runs
    # ft ×2 and lipsum-ft sweep WiSE α (posthoc.wise.runs); lp is evaluated alone
    assert jobs.count("evaluate_finetuned") == 3 and jobs.count("evaluate_finetuned_alone") == 1


def test_dvc_repro_records_without_rerunning_then_follows_params(workdir):
    dvc = str(BIN / "dvc")
    _run([dvc, "init", "--no-scm", "-q"], workdir)
    before = {p: p.stat().st_mtime_ns for p in (workdir / "results/metrics").rglob("*.parquet")}
    out = _run([dvc, "repro"], workdir)
    assert out.count("Nothing to be done") == 11, out
    assert {p: p.stat().st_mtime_ns for p in before} == before
    out = _run([dvc, "status"], workdir)
    assert "up to date" in out

    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["evaluate"]["ece_bins"] = 10
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([dvc, "repro"], workdir)
    ran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    assert ran == ["evaluate", "report"], out
    assert "Finished jobid" in out and "rule pretrain" not in out and "rule miniworld" not in out
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    assert df["run_id"].nunique() == 22


def test_fine_tuning_family_is_trained_evaluated_and_reported(workdir):
    """Every fine-tuning stage ran: runs, WiSE sweeps, TPGM(-C), soups; energy gaps; tables, plots, claims."""
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    acc = df[(df["metric"] == "accuracy") & (df["eval_dataset"] == "miniworld-sketch")]
    assert set(acc["model_id"]) >= {"ft/tinyclip/ft/s0", "ft/tinyclip/ft/s1", "ft/tinyclip/lipsum-ft/s0",
                                    "ft/tinyclip/lp/s0", "wise/tinyclip/ft/s0/a0.5", "tpgm/tinyclip/ft/s0",
                                    "tpgm-c/tinyclip/lipsum-ft/s0", "uniform-soup/tinyclip/ft",
                                    "greedy-ensemble/tinyclip/ft"}
    by_id = acc.set_index("model_id")["value"]
    zero_shot = df[(df["model_id"] == "zeroshot/tinyclip") & (df["metric"] == "accuracy")
                   & (df["eval_dataset"] == "miniworld-sketch")]["value"].item()
    assert by_id["wise/tinyclip/ft/s0/a0"] == pytest.approx(zero_shot, abs=1e-6)  # WiSE α=0 is the zero-shot model
    assert by_id["wise/tinyclip/ft/s0/a1"] == by_id["ft/tinyclip/ft/s0"]
    gaps = df[(df["metric"] == "energy_gap") & (df["eval_dataset"] == "miniworld-sketch")].set_index("model_id")["value"]
    assert gaps["wise/tinyclip/ft/s0/a0"] == 0 and gaps["ft/tinyclip/ft/s0"] > 0
    assert gaps["ft/tinyclip/lp/s0"] == 0  # LP leaves the image tower at θ0
    assert not acc["model_id"].str.startswith("wise/tinyclip/lp/").any()  # lp is not in posthoc.wise.runs
    table = (workdir / "results/tables/finetune.md").read_text()
    assert "| Lipsum-FT |" in table and "| WiSE-FT (α=0.5) on FT |" in table and "TPGM on FT" in table
    assert "\\begin{tabular}" in (workdir / "results/tables/finetune.tex").read_text()
    for plot in ("wise_curves.png", "energy_gap.png"):
        assert (workdir / "results/plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    claims = (workdir / "results/claims.md").read_text()
    assert claims.count("- **PASS**") + claims.count("- **FAIL**") + claims.count("- **NOT RUN**") == 8


def test_distillation_family_is_trained_evaluated_and_reported(workdir):
    """Teacher, three-head student with head selection, baselines, cost rows, tables, Pareto plot."""
    df = pd.read_parquet(workdir / "results/all_metrics.parquet")
    base = "distill/tinyclip/rn-augmix-da"
    photo = df[(df["eval_dataset"] == "miniworld-photo") & df["corruption"].isna()]
    acc = photo[photo["metric"] == "accuracy"].set_index("model_id")["value"]
    assert set(acc.index) >= {"teachers/rn-augmix-da", f"{base}/ours/s0", f"{base}/ours-no-kd/s0", f"{base}/only-kd/s0",
                              f"{base}/apt/s0", f"{base}/vpt/s0", f"{base}/zs-ours/s0"}
    ours = photo[photo["model_id"] == f"{base}/ours/s0"].set_index("metric")["value"]
    assert ours["accuracy"] == pytest.approx(ours["accuracy_select_ours"], abs=1e-6)  # the prediction is Eq. 6's head (float32 vs counts)
    assert {f"{m}_{r}" for m in ("accuracy_select", "f_correct") for r in ("ours", "no_kl", "no_uncertainty", "max_logit")
            } <= set(ours.index) and {"accuracy_head_clean", "accuracy_head_unclean"} <= set(ours.index)
    assert "f_correct_ours" not in photo[photo["model_id"] == f"{base}/apt/s0"]["metric"].tolist()  # one head
    cells = df[(df["model_id"] == f"{base}/ours/s0") & (df["eval_dataset"] == "miniworld-c") & df["severity"].notna()
               & (df["metric"] == "f_correct_no_kl")]
    assert len(cells) == 15  # 3 corruptions x 5 severities, head selection per cell
    cost = df[df["shift_type"] == "cost"].pivot_table(index="model_id", columns="metric", values="value")
    assert cost.loc[f"{base}/ours/s0", "trainable_params"] > cost.loc[f"{base}/apt/s0", "trainable_params"]  # 3 heads
    assert cost.loc[f"{base}/ours/s0", "inference_gflops_overhead"] > 0  # 10 MC passes through the tuned part
    assert cost.loc["ft/tinyclip/ft/s0", "inference_gflops_overhead"] == 0
    assert (cost["train_ms_per_image"] > 0).all()
    table = (workdir / "results/tables/distill.md").read_text()
    assert "Ours" in table and "APT" in table and "F_correct" in table
    assert (workdir / "results/plots/distill_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Efficiently Robustify" in (workdir / "results/claims.md").read_text()
