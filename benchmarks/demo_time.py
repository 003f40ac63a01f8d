"""Time the `make demo` pipeline (install excluded): the embedded default DAG from scratch.

Runs `snakemake --cores 2 all` in a fresh copy of the workflow (so the checkout's own results and
mlflow.db are untouched) and prints per-stage wall time from the job logs' timestamps.
Budget (issue #2): <= 900 s on the 2-core CI machine. Last line: `RESULT demo_seconds <n> s`.

    python benchmarks/demo_time.py [--keep DIR] [--cores 2] [--configfile extra.yaml]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 900


def stage_times(log: str) -> dict[str, float]:
    """Sum of job durations per rule, from Snakemake's '[timestamp] rule X' / 'Finished jobid' lines."""
    started: dict[str, tuple[str, datetime]] = {}
    totals: dict[str, float] = {}
    stamp = None
    rule = None
    for line in log.splitlines():
        if m := re.match(r"\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]", line):
            stamp = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        elif m := re.match(r"(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif m := re.match(r"\s+jobid: (\d+)", line):
            if rule and stamp:
                started[m.group(1)] = (rule, stamp)
        elif (m := re.match(r"Finished jobid: (\d+)", line)) and stamp and m.group(1) in started:
            name, t0 = started.pop(m.group(1))
            totals[name] = totals.get(name, 0.0) + (stamp - t0).total_seconds()
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    ap.add_argument("--configfile", type=Path, help="extra config merged over params.yaml")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="robustify-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "params.yaml", "environment.yml", "workflow", "profiles"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, work / name, dirs_exist_ok=True)
        else:
            shutil.copy(src, work / name)
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--cores", str(args.cores), "all"]
    if args.configfile:
        cmd += ["--configfile", "params.yaml", str(args.configfile.resolve())]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"demo pipeline failed (rc {proc.returncode}) in {work}")
    for rule, secs in sorted(stage_times(proc.stdout + proc.stderr).items(), key=lambda kv: -kv[1]):
        print(f"  {rule:<12} {secs:7.0f} s (summed over its jobs)")
    table = work / "results/tables/zeroshot.md"
    print(table.read_text().split("## ECE")[0].strip())
    print(f"demo pipeline: {seconds:.0f} s of a {BUDGET_S} s budget (ratio {seconds / BUDGET_S:.2f})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT demo_seconds {seconds:.0f} s")


if __name__ == "__main__":
    main()
