"""MLflow tracking: one run per pipeline job, tagged so any number can be traced to its job.

The tracking store defaults to `sqlite:///mlflow.db` at the working directory (override with
`MLFLOW_TRACKING_URI`). It is created once at workflow start (`robustify tracking init`, called from
the Snakefile's `onstart`), which also opens a parent run for the whole pipeline invocation; every
job's run links to it through `ROBUSTIFY_PARENT_RUN_ID`. `MLFLOW_RUN_ID` is removed from a job's
environment because MLflow would otherwise *resume* that run instead of starting the job's own.

Inside the pipeline, jobs *spool* their run instead of writing the store: `ROBUSTIFY_TRACKING_SPOOL`
names a directory where each job appends its run (tags, params, metrics, artifacts, status) to its own
JSON-lines file, and `robustify tracking sync` loads the spooled runs into MLflow in one process (the
Snakefile calls it at `onsuccess`/`onerror`; run it yourself to see finished jobs mid-pipeline). Why:
importing MLflow and its SQLAlchemy store costs ~2 s of CPU per job, as much as a small job's work,
and hundreds of Slurm jobs writing one SQLite file on a network filesystem contend for its lock. A
job killed before it ends is loaded as KILLED with the metrics it had logged. Every run carries the
tag `robustify.run_id`, the id that result rows store in their `run_id` column (in live mode it is
the MLflow run id itself). Without the variable (standalone CLI calls, tests) jobs log live.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
ENV_SPOOL = "ROBUSTIFY_TRACKING_SPOOL"
RUN_ID_TAG = "robustify.run_id"
_MAX_PARAM_LEN = 6000  # MLflow's limit on one param value
_RECORD = "run.jsonl"
_IMPORTED = "mlflow_run_id"  # written by a sync once the MLflow run exists: a crashed sync redoes it
T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def spool_dir() -> Path | None:
    """The spool directory jobs write to, or None when jobs log to MLflow directly."""
    path = os.environ.get(ENV_SPOOL, "").strip()
    return Path(path) if path else None


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


def _now_ms() -> int:
    return int(time.time() * 1000)


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
    """Create the store and experiment once, open the pipeline's parent run, return its id.

    Runs that an earlier invocation spooled but never loaded (it was interrupted) are loaded first.
    """
    client = _client()
    exp_id = get_or_create_experiment(client, experiment)
    sync_spool(finalize=False, client=client)
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
    """Handle given to a stage: log metrics, artifacts and tags into the job's run (live)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            _retry(lambda chunk=batch[i : i + 500]: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            _retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))


class SpooledRun:
    """The same handle, appending to the job's own record in the spool (no MLflow import).

    One JSON object per line, each line written whole and flushed, so a job killed at any point
    leaves a readable record of everything it logged before.
    """

    def __init__(self, root: Path, header: dict[str, Any]) -> None:
        self.run_id = uuid.uuid4().hex  # same form as an MLflow run id
        self.dir = root / self.run_id
        self.dir.mkdir(parents=True)
        self._append({"event": "start", "time": _now_ms(), **header})

    def _append(self, event: Mapping[str, Any]) -> None:
        with open(self.dir / _RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._append({"event": "metrics", "time": _now_ms(), "step": step or 0,
                      "values": {k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        rel = Path("artifacts") / (artifact_path or "") / Path(path).name
        (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.dir / rel)  # a copy: the job's output may change before the sync
        self._append({"event": "artifact", "file": rel.as_posix(), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._append({"event": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def end(self, status: str) -> None:
        self._append({"event": "end", "time": _now_ms(), "status": status})


def _job_tags(stage: str, params: Mapping[str, Any], wildcards: Mapping[str, str]) -> dict[str, str]:
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
    return tags


@contextlib.contextmanager
def job_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str,
    wildcards: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Iterator[JobRun | SpooledRun]:
    """One MLflow run for one job; marked FAILED (and the error re-raised) if the job fails."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    wildcards = dict(wildcards or {})
    tags = _job_tags(stage, params, wildcards)
    name = run_name or "/".join([stage, *map(str, wildcards.values())])
    if (root := spool_dir()) is not None:
        spooled = SpooledRun(root, {"experiment": experiment, "run_name": name, "tags": tags,
                                    "params": flatten(params)})
        try:
            yield spooled
        except BaseException:
            spooled.end("FAILED")
            raise
        spooled.end("FINISHED")
        return
    with _live_run(experiment, name, tags, params) as run:
        yield run


@contextlib.contextmanager
def _live_run(experiment: str, name: str, tags: dict[str, str], params: Mapping[str, Any]) -> Iterator[JobRun]:
    from mlflow.entities import Param

    client = _client()
    exp_id = get_or_create_experiment(client, experiment)
    run = _retry(lambda: client.create_run(exp_id, run_name=name, tags=tags))
    run_id = run.info.run_id
    _retry(lambda: client.set_tag(run_id, RUN_ID_TAG, run_id))
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(flat), 100):
        _retry(lambda chunk=flat[i : i + 100]: client.log_batch(run_id, params=chunk))
    try:
        yield JobRun(client, run_id)
    except BaseException:
        _retry(lambda: client.set_terminated(run_id, status="FAILED"))
        raise
    _retry(lambda: client.set_terminated(run_id, status="FINISHED"))


def _read_record(path: Path) -> list[dict[str, Any]]:
    """The record's events; a last line cut short by a kill is dropped."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return events


def _load_run(client: Any, run_dir: Path, events: list[dict[str, Any]], finalize: bool) -> bool:
    """One spooled run → one MLflow run; False if it is still running and not `finalize`."""
    from mlflow.entities import Metric, Param, RunTag

    start = events[0]
    end = next((e for e in events if e["event"] == "end"), None)
    if end is None and not finalize:
        return False
    previous = run_dir / _IMPORTED
    if previous.is_file():  # an earlier sync died half-way through this run: replace its copy
        with contextlib.suppress(Exception):
            _retry(lambda: client.delete_run(previous.read_text().strip()))
    exp_id = get_or_create_experiment(client, start["experiment"])
    tags = {**start["tags"], RUN_ID_TAG: run_dir.name}
    run = _retry(lambda: client.create_run(exp_id, start_time=start["time"], tags=tags,
                                           run_name=start["run_name"]))
    run_id = run.info.run_id
    previous.write_text(run_id)
    params = [Param(k, v) for k, v in start["params"].items()]
    metrics = [Metric(k, v, e["time"], e["step"]) for e in events if e["event"] == "metrics"
               for k, v in e["values"].items()]
    extra = [RunTag(k, v) for e in events if e["event"] == "tags" for k, v in e["tags"].items()]
    for i in range(0, len(params), 100):
        _retry(lambda chunk=params[i : i + 100]: client.log_batch(run_id, params=chunk))
    for i in range(0, len(metrics), 1000):
        _retry(lambda chunk=metrics[i : i + 1000]: client.log_batch(run_id, metrics=chunk))
    for i in range(0, len(extra), 100):
        _retry(lambda chunk=extra[i : i + 100]: client.log_batch(run_id, tags=chunk))
    for e in events:
        if e["event"] == "artifact":
            _retry(lambda e=e: client.log_artifact(run_id, str(run_dir / e["file"]), e["artifact_path"]))
    # killed: it ended some time after its last timed event
    status, end_time = (end["status"], end["time"]) if end else ("KILLED", max(e.get("time", 0) for e in events))
    _retry(lambda: client.set_terminated(run_id, status=status, end_time=end_time))
    return True


def sync_spool(finalize: bool = False, client: Any = None, root: str | Path | None = None) -> int:
    """Load spooled job runs into MLflow and remove them from the spool; returns how many.

    Runs that have not ended are left for later unless `finalize` (no job of the pipeline can still
    be running: its `onsuccess`/`onerror`), which loads them as KILLED.
    """
    root = Path(root) if root is not None else spool_dir()
    if root is None or not root.is_dir():
        return 0
    client = client or _client()
    loaded = 0
    runs = [(d, _read_record(d / _RECORD)) for d in root.iterdir() if (d / _RECORD).is_file()]
    for run_dir, events in sorted(runs, key=lambda r: r[1][0]["time"] if r[1] else 0):
        if not events:  # killed before its first line was whole: nothing to record
            if finalize:
                shutil.rmtree(run_dir)
            continue
        if _load_run(client, run_dir, events, finalize):
            shutil.rmtree(run_dir)
            loaded += 1
    return loaded


def finish_pipeline(run_id: str, status: str = "FINISHED") -> None:
    """Load the spooled job runs, then close the pipeline's parent run; delete it if no job ran
    under it (a no-op invocation)."""
    client = _client()
    sync_spool(finalize=True, client=client)
    run = _retry(lambda: client.get_run(run_id))
    children = _retry(
        lambda: client.search_runs(
            [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=1
        )
    )
    _retry(lambda: client.set_terminated(run_id, status=status))
    if not children:
        _retry(lambda: client.delete_run(run_id))
