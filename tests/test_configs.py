"""Paper-scale configs are valid and dry-run against a fixture data root (real sources are
prepared by the `prepare` jobs, so a dry run only needs the source folders and checkpoints to exist).
Configs that fine-tune are also checked job by job in the printed (`-n -p`) plan: every run × seed is
one `finetune` job asking for the run's recipe and method parameters with the configured resources,
and the post-hoc jobs (TPGM / TPGM-C, soups) and their evaluations are all there."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustify.config import deep_merge, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# The Lipsum-FT paper's recipe (App. B.1: batch 256, peak lr 1e-5, 10% warm-up, evaluation every 1000
# iterations; steps from the authors' README: --optim_ni 50000 for ImageNet, 5000 for DomainNet) and
# Lipsum-FT's own parameters (§5.1 / App. B.3: M = 80 random texts of L = 8 tokens, λ = 1).
LIPSUM_FT_STEPS = {"lipsum-ft-imagenet-vitb16": 50000, "lipsum-ft-domainnet-vitb16": 5000}
PAPER_RECIPE = {"batch_size": 256, "lr": 1e-5, "warmup": 0.1, "eval_every": 1000, "weight_decay": 0.0}
PAPER_LIPSUM = {"lam": 1.0, "texts": 80, "length": 8, "vocab": "full"}
# the paper's (student, teacher): Table 1 CLIP ViT-L/14@336 from ViT-B/16, Table 3 unimodal ViT-L from ViT-Small
DISTILL_ARCHS = {"distill-imagenet-clip-vitl14-336": ("ViT-L-14-336", "vit_base_patch16_224"),
                 "distill-imagenet-vitl16-unimodal": ("vit_large_patch16_224", "vit_small_patch16_224")}
MINIWORLD_RUNS = {"ft", "lipsum-ft", "scratch-ft", "lp", "lp-ft", "ema", "l2sp", "kd", "car-ft", "featkd"}


def _jobs(out: str) -> list[dict[str, str]]:
    """The dry run's job blocks: {'rule', 'wildcards', 'resources', 'shell'} (the lines `-n -p` prints)."""
    jobs: list[dict[str, str]] = []
    for line in out.splitlines():
        head = re.match(r"(?:local)?rule (\S+):$", line)
        if head:
            jobs.append({"rule": head.group(1)})
        elif jobs and line.startswith("Shell command:"):
            jobs[-1]["shell"] = line.removeprefix("Shell command:").strip()
        elif jobs and re.match(r"\s+(wildcards|resources): ", line):
            key, value = line.strip().split(": ", 1)
            jobs[-1][key] = value
    return jobs


def _fields(line: str) -> dict[str, str]:
    """`a=1, b=x` (a wildcards or resources line) → {'a': '1', 'b': 'x'}."""
    return dict(item.split("=", 1) for item in line.split(", "))


def _option(shell: str, name: str) -> str:
    args = shlex.split(shell)
    return args[args.index(name) + 1]


def _selected_runs(ft: dict) -> dict:
    select = ft.get("select", "all")
    return dict(ft["runs"]) if select == "all" else {k: v for k, v in ft["runs"].items() if k in select}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_dry_runs(repo, tmp_path, config):
    params = deep_merge(load_yaml(repo / "params.yaml"), load_yaml(config))
    data, ckpts = tmp_path / "datasets", tmp_path / "checkpoints"
    for spec in params["datasets"].values():
        (data / spec["source"]).mkdir(parents=True, exist_ok=True)
    for name in params["zeroshot"]["models"]:
        ckpt = ckpts / params["models"][name]["checkpoint"]
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"")
    (tmp_path / "fixture.yaml").write_text(yaml.safe_dump({"paths": {"data": str(data), "checkpoints": str(ckpts)}}))
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-n", "-p", "--cores", "4", "all",
         "--configfile", "params.yaml", str(config), "fixture.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}
    assert {"prepare", "zeroshot", "evaluate", "report"} <= jobs
    assert "pretrain" not in jobs and "miniworld" not in jobs  # nothing of the mini-world is built
    n_eval = sum(1 for line in out.splitlines() if line.startswith("rule evaluate:"))
    # zero-shot classifiers on the evaluate sets, and an imported timm start point on its stages' sets
    starts = {s for sec, key in (("finetune", "model"), ("distill", "student")) if (m := params[sec][key]) is not None
              and params["models"][m]["family"] == "timm" for s in params[sec]["eval_sets"]}
    assert n_eval == len(params["evaluate"]["sets"]) * len(params["zeroshot"]["models"]) + len(starts)
    built = [k for k in params["corrupt"] if k in {params["eval_sets"][s]["dataset"] for s in params["evaluate"]["sets"]}]
    n_corrupt = sum(1 for line in out.splitlines() if line.startswith("rule corrupt:"))
    expected = sum(15 * len(params["corrupt"][k]["severities"]) * params["corrupt"][k]["shards"] for k in built)
    assert n_corrupt == expected  # ObjectNet-C: 15 corruptions x 5 severities x 20 shards, built here
    n_sources = sum(1 for line in out.splitlines() if line.startswith("rule corrupt_sources:"))
    assert n_sources == sum(params["corrupt"][k]["shards"] for k in built)  # each shard decoded once
    if params["distill"]["student"] is None:
        assert not jobs & {"teacher", "distill", "evaluate_distilled"}
    else:
        _check_distill_plan(params, _jobs(out))
    if config.stem.startswith("distill-"):  # the paper's Tables 1 and 3 settings (App. G hyper-parameters)
        d = params["distill"]
        student, teacher = DISTILL_ARCHS[config.stem]
        assert params["models"][d["student"]]["arch"].startswith(student)
        assert params["models"][params["teachers"][d["teacher"]]["model"]]["arch"].startswith(teacher)
        assert {k: d["recipe"][k] for k in ("batch_size", "lr", "weight_decay")} == {"batch_size": 256, "lr": 1e-3,
                                                                                     "weight_decay": 0.0}
        assert {k: d["defaults"][k] for k in ("a", "dropout", "head_fraction")} == {"a": 0.5, "dropout": 0.25,
                                                                                    "head_fraction": 0.2}
        assert params["teachers"][d["teacher"]]["params"]["jsd_weight"] == 12
    if params["finetune"]["model"] is None:
        assert not jobs & {"finetune", "evaluate_finetuned", "tpgm", "soups", "evaluate_posthoc"}
        return
    _check_finetune_plan(params, config.stem, _jobs(out))


PARTIAL = {"three-head", "three-head-no-kd", "single-teacher", "only-kd", "combined-head", "apt"}


def _check_distill_plan(params: dict, jobs: list[dict[str, str]]) -> None:
    """One teacher job with its recipe; every distill run x seed once, with distill.defaults under the run's
    params for the partial-tuning methods, the teacher handed over, and the configured resources."""
    d, res = params["distill"], params["resources"]
    runs = _selected_runs(d)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        by_rule.setdefault(job["rule"], []).append(job)
    (teacher,) = by_rule["teacher"]
    assert _fields(teacher["wildcards"])["teacher"] == d["teacher"]
    spec = params["teachers"][d["teacher"]]
    assert json.loads(_option(teacher["shell"], "--params")) == spec["recipe"]
    assert json.loads(_option(teacher["shell"], "--method-params")) == spec.get("params", {})
    assert json.loads(_option(teacher["shell"], "--model-spec"))["family"] == "timm"
    planned = sorted((w["drun"], int(w["seed"])) for w in (_fields(j["wildcards"]) for j in by_rule["distill"]))
    assert planned == sorted((run, seed) for run, r in runs.items() for seed in r.get("seeds", [0]))
    timm_student = params["models"][d["student"]]["family"] == "timm"
    start = f"models/{'timm' if timm_student else 'zeroshot'}/{d['student']}"
    assert len(by_rule["evaluate_distilled"]) == len(planned) + 1  # + the teacher
    if timm_student:  # its start point: imported once, evaluated per set (Table 3's "Standard training" row)
        evaluated = {_fields(j["wildcards"])["clf"] for j in by_rule["evaluate"]}
        assert f"timm/{d['student']}" in evaluated
        (imported,) = by_rule["import_timm"]
        spec = json.loads(_option(imported["shell"], "--model-spec"))
        assert spec["arch"] == params["models"][d["student"]]["arch"]
        assert spec["checkpoint"].endswith("/checkpoints/" + params["models"][d["student"]]["checkpoint"])
        assert _option(imported["shell"], "--out") == start
    else:
        assert "import_timm" not in by_rule
    for job in by_rule["distill"]:
        run = runs[_fields(job["wildcards"])["drun"]]
        base = d["defaults"] if run["method"] in PARTIAL else {}
        assert json.loads(_option(job["shell"], "--method-params")) == {**base, **run.get("params", {})}
        assert json.loads(_option(job["shell"], "--params")) == {**d["recipe"], **run.get("recipe", {})}
        assert _option(job["shell"], "--teacher") == f"models/teachers/{d['teacher']}"
        assert _option(job["shell"], "--zeroshot") == start
        got = _fields(job["resources"])
        assert (int(got["gpu"]), int(got["runtime"])) == (res["distill"]["gpu"], res["distill"]["runtime"])


def _check_finetune_plan(params: dict, stem: str, jobs: list[dict[str, str]]) -> None:
    ft, post, res = params["finetune"], params["posthoc"], params["resources"]
    runs = _selected_runs(ft)
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        by_rule.setdefault(job["rule"], []).append(job)
    n_tpgm = sum(len(post[k]["runs"]) * len(post[k]["seeds"]) for k in ("tpgm", "tpgm-c"))
    n_soups = len(post["soups"]["runs"]) if post["soups"]["kinds"] else 0
    assert {"finetune", "evaluate_finetuned"} <= set(by_rule)
    assert ("tpgm" in by_rule) == (n_tpgm > 0) and ("soups" in by_rule) == (n_soups > 0)
    # every run x seed once, nothing else (in particular no mini-world run or recipe leaks into the config)
    planned = sorted((w["run"], int(w["seed"])) for w in (_fields(j["wildcards"]) for j in by_rule["finetune"]))
    assert planned == sorted((run, seed) for run, spec in runs.items() for seed in spec.get("seeds", [0]))
    assert len(by_rule["evaluate_finetuned"]) == len(planned)
    timm_start = params["models"][ft["model"]]["family"] == "timm"
    start = f"models/{'timm' if timm_start else 'zeroshot'}/{ft['model']}"
    for job in by_rule["finetune"] + by_rule["evaluate_finetuned"]:
        assert _option(job["shell"], "--zeroshot") == start  # the start point, and WiSE-FT's α = 0 end
    for job in by_rule["evaluate_finetuned"]:  # the energy gap is against CLIP's text tower: none for timm
        assert ("--energy-gap" in shlex.split(job["shell"])) != timm_start
    for job in by_rule["finetune"]:
        run = _fields(job["wildcards"])["run"]
        assert json.loads(_option(job["shell"], "--params")) == {**ft["recipe"], **runs[run].get("recipe", {})}
        assert json.loads(_option(job["shell"], "--method-params")) == runs[run].get("params", {})
        assert _option(job["shell"], "--method") == runs[run]["method"]
        assert _option(job["shell"], "--train-split") == ft["train_split"]
        assert _option(job["shell"], "--val-split") == ft["val_split"]
        got = _fields(job["resources"])
        assert (int(got["gpu"]), int(got["runtime"]), int(got["mem_mb"])) == (
            res["finetune"]["gpu"], res["finetune"]["runtime"], res["finetune"]["mem_mb"])
    assert len(by_rule.get("tpgm", [])) == n_tpgm
    assert len(by_rule.get("soups", [])) == n_soups
    assert len(by_rule.get("evaluate_posthoc", [])) == n_tpgm + n_soups * len(post["soups"]["kinds"])
    for job in by_rule.get("tpgm", []):
        kind = _fields(job["wildcards"])["kind"]
        assert json.loads(_option(job["shell"], "--params")) == post[kind]["params"]
        assert _option(job["shell"], "--val-split") == ft["val_split"]
    wise = json.loads(_option(by_rule["evaluate_finetuned"][0]["shell"], "--wise-alphas"))
    assert wise == post["wise"]["alphas"]
    if stem not in LIPSUM_FT_STEPS:
        return
    # The Lipsum-FT paper's scenarios: its recipe on GPUs, all runs of the paper, post-hoc on FT and Lipsum-FT.
    assert set(runs) == MINIWORLD_RUNS  # the same run names as params.yaml, so none of its runs survives
    for job in by_rule["finetune"] + by_rule["tpgm"] + by_rule["evaluate_finetuned"] + by_rule["evaluate_posthoc"]:
        assert _fields(job["resources"])["gpu"] == "1", job
    for job in by_rule["finetune"]:
        run = _fields(job["wildcards"])["run"]
        recipe = json.loads(_option(job["shell"], "--params"))
        assert recipe["steps"] == LIPSUM_FT_STEPS[stem]
        if run in ("ft", "lipsum-ft"):
            assert {k: recipe[k] for k in PAPER_RECIPE} == PAPER_RECIPE
        if run == "lipsum-ft":
            assert json.loads(_option(job["shell"], "--method-params")) == PAPER_LIPSUM
    assert wise == [round(0.1 * i, 1) for i in range(11)]  # α ∈ {0, 0.1, ..., 1}
    for run in ("ft", "lipsum-ft"):
        assert len(runs[run]["seeds"]) >= 3  # means ± std, and soups of several ingredients
    assert {"ft", "lipsum-ft"} <= set(post["tpgm"]["runs"]) & set(post["tpgm-c"]["runs"]) & set(post["soups"]["runs"])
    assert params["report"]["wise_alpha"] == 0.5
    assert ft["energy_gap"] == {"texts": 10000, "length": 8, "vocab": "full", "seed": 0}  # paper §4.2
