"""Paper-scale configs are valid and dry-run against a fixture data root (real sources are
prepared by the `prepare` jobs, so a dry run only needs the source folders and checkpoints to exist)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from robustify.config import deep_merge, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-n", "--cores", "4", "all",
         "--configfile", "params.yaml", str(config), "fixture.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    jobs = {line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(("rule ", "localrule "))}
    assert {"prepare", "zeroshot", "evaluate", "report"} <= jobs
    assert "pretrain" not in jobs and "miniworld" not in jobs  # nothing of the mini-world is built
    n_eval = sum(1 for line in out.splitlines() if line.startswith("rule evaluate:"))
    assert n_eval == len(params["evaluate"]["sets"]) * len(params["zeroshot"]["models"])
    built = [k for k in params["corrupt"] if k in {params["eval_sets"][s]["dataset"] for s in params["evaluate"]["sets"]}]
    n_corrupt = sum(1 for line in out.splitlines() if line.startswith("rule corrupt:"))
    expected = sum(15 * len(params["corrupt"][k]["severities"]) * params["corrupt"][k]["shards"] for k in built)
    assert n_corrupt == expected  # ObjectNet-C: 15 corruptions x 5 severities x 20 shards, built here
    n_sources = sum(1 for line in out.splitlines() if line.startswith("rule corrupt_sources:"))
    assert n_sources == sum(params["corrupt"][k]["shards"] for k in built)  # each shard decoded once
