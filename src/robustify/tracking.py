"""MLflow tracking: one run per pipeline job, tagged so any number can be traced to its job.

The tracking store defaults to `sqlite:///mlflow.db` at the working directory (override with
`MLFLOW_TRACKING_URI`). It is created once at workflow start (`robustify tracking init`, called from
the Snakefile's `onstart`), which also opens a parent run for the whole pipeline invocation; every
job's run links to it through `ROBUSTIFY_PARENT_RUN_ID`. `MLFLOW_RUN_ID` is removed from a job's
environment because MLflow would otherwise *resume* that run instead of starting the job's own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from robustify.io import canonical_json, params_hash

DEFAULT_URI = "sqlite:///mlflow.db"
ENV_PIPELINE_RUN = "ROBUSTIFY_PIPELINE_RUN_ID"
ENV_PARENT_RUN = "ROBUSTIFY_PARENT_RUN_ID"
_MAX_PARAM_LEN = 6000  # MLflow's limit on one param value
T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _client():  # imported lazily: mlflow costs seconds to import and most helpers don't need it
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """SQLite allows one writer; concurrent jobs can briefly see 'database is locked'."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors in its own types
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def git_commit(cwd: str | Path = ".") -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params → {'a.b': 'value'} as MLflow params (lists kept as compact JSON)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else canonical_json(v)
            out[key] = text[:_MAX_PARAM_LEN]
    return out


def get_or_create_experiment(client: Any, name: str) -> str:
    exp = _retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    artifacts = Path("mlartifacts").resolve() / name
    try:
        return _retry(lambda: client.create_experiment(name, artifact_location=artifacts.as_uri()))
    except Exception:  # noqa: BLE001 - another job created it between our two calls
        exp = _retry(lambda: client.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def init_store(experiment: str) -> str:
    """Create the store and experiment once, open the pipeline's parent run, return its id."""
    client = _client()
    exp_id = get_or_create_experiment(client, experiment)
    pipeline_id = os.environ.get(ENV_PIPELINE_RUN) or uuid.uuid4().hex[:12]
    run = _retry(
        lambda: client.create_run(
            exp_id,
            run_name=f"pipeline-{pipeline_id}",
            tags={"stage": "pipeline", "pipeline_run_id": pipeline_id, "git_commit": git_commit(),
                  "mlflow.source.git.commit": git_commit(), "host": socket.gethostname()},
        )
    )
    return run.info.run_id


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    _retry(lambda: _client().set_terminated(run_id, status=status))


class JobRun:
    """Handle given to a stage: log metrics and artifacts into the job's run."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            _retry(lambda chunk=batch[i : i + 500]: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            _retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))


@contextlib.contextmanager
def job_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str,
    wildcards: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Iterator[JobRun]:
    """One MLflow run for one job; marked FAILED (and the error re-raised) if the job fails."""
    from mlflow.entities import Param

    os.environ.pop("MLFLOW_RUN_ID", None)
    client = _client()
    exp_id = get_or_create_experiment(client, experiment)
    wildcards = dict(wildcards or {})
    commit = git_commit()
    tags = {
        "stage": stage,
        "pipeline_run_id": os.environ.get(ENV_PIPELINE_RUN, "standalone"),
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "params_hash": params_hash(params),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", "none"),
        "host": socket.gethostname(),
        **{f"wildcard.{k}": str(v) for k, v in wildcards.items()},
    }
    if parent := os.environ.get(ENV_PARENT_RUN):
        tags["mlflow.parentRunId"] = parent
    name = run_name or "/".join([stage, *map(str, wildcards.values())])
    run = _retry(lambda: client.create_run(exp_id, run_name=name, tags=tags))
    run_id = run.info.run_id
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        _retry(lambda chunk=flat[i : i + 100]: client.log_batch(run_id, params=chunk))
    try:
        yield JobRun(client, run_id)
    except BaseException:
        _retry(lambda: client.set_terminated(run_id, status="FAILED"))
        raise
    _retry(lambda: client.set_terminated(run_id, status="FINISHED"))


def finish_pipeline(run_id: str, status: str = "FINISHED") -> None:
    """Close the pipeline's parent run; delete it if no job ran under it (a no-op invocation)."""
    client = _client()
    run = _retry(lambda: client.get_run(run_id))
    children = _retry(
        lambda: client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1
        )
    )
    _retry(lambda: client.set_terminated(run_id, status=status))
    if not children:
        _retry(lambda: client.delete_run(run_id))
