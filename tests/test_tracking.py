"""Every job is an MLflow run with params, metrics, artifacts and the DESIGN §4 tags, whether it logs
live or spools its run for the pipeline to load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from robustify import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts go to ./mlartifacts
    monkeypatch.setenv("ROBUSTIFY_PIPELINE_RUN_ID", "pipe123")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv(tracking.ENV_SPOOL, raising=False)
    return MlflowClient(uri)


@pytest.fixture()
def spool(store, tmp_path, monkeypatch):
    path = tmp_path / "spool"
    monkeypatch.setenv(tracking.ENV_SPOOL, str(path))
    return path


def test_job_run_records_params_metrics_artifacts_and_tags(store, tmp_path, monkeypatch):
    parent = tracking.init_store("exp")
    monkeypatch.setenv("ROBUSTIFY_PARENT_RUN_ID", parent)
    artifact = tmp_path / "table.md"
    artifact.write_text("| a |\n")
    params = {"pretrain": {"steps": 10, "lr": 0.002}, "seed": 1}
    with tracking.job_run("pretrain", params, "exp", {"model": "tinyclip"}) as run:
        run.log_metrics({"loss": 1.5}, step=10)
        run.log_artifact(artifact)
    rec = store.get_run(run.run_id)
    assert rec.info.status == "FINISHED"
    assert rec.data.params == {"pretrain.steps": "10", "pretrain.lr": "0.002", "seed": "1"}
    assert rec.data.metrics == {"loss": 1.5}
    tags = rec.data.tags
    assert tags["stage"] == "pretrain" and tags["wildcard.model"] == "tinyclip"
    assert tags["pipeline_run_id"] == "pipe123" and tags["slurm_job_id"] == "4242"
    assert tags["mlflow.parentRunId"] == parent
    assert tags["params_hash"] == tracking.params_hash(params) and "git_commit" in tags
    assert [a.path for a in store.list_artifacts(run.run_id)] == ["table.md"]
    assert tags[tracking.RUN_ID_TAG] == run.run_id  # what result rows store in `run_id`
    assert (tmp_path / "mlflow.db").is_file()


def _only_run(store, experiment="exp"):
    runs = store.search_runs([store.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_spooled_run_is_loaded_by_sync_with_everything_a_live_run_has(store, spool, tmp_path, monkeypatch):
    parent = tracking.init_store("exp")
    monkeypatch.setenv("ROBUSTIFY_PARENT_RUN_ID", parent)
    artifact = tmp_path / "table.md"
    artifact.write_text("| a |\n")
    params = {"pretrain": {"steps": 10, "lr": 0.002}, "seed": 1}
    with tracking.job_run("pretrain", params, "exp2", {"model": "tinyclip"}) as run:
        run.log_metrics({"loss": 2.5}, step=5)
        run.log_metrics({"loss": 1.5, "acc": 0.25}, step=10)
        run.log_artifact(artifact, "tables")
        run.set_tags({"model_id": "ft/tinyclip"})
    artifact.write_text("changed after the job")  # the spool keeps the job's copy
    assert store.get_experiment_by_name("exp2") is None  # nothing reached MLflow yet
    assert tracking.sync_spool() == 1
    assert not any(spool.iterdir())
    rec = _only_run(store, "exp2")
    assert rec.info.status == "FINISHED" and rec.info.run_name == "pretrain/tinyclip"
    assert rec.info.start_time <= rec.info.end_time
    assert rec.data.params == {"pretrain.steps": "10", "pretrain.lr": "0.002", "seed": "1"}
    assert rec.data.metrics == {"loss": 1.5, "acc": 0.25}
    history = store.get_metric_history(rec.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(5, 2.5), (10, 1.5)]
    tags = rec.data.tags
    assert tags["stage"] == "pretrain" and tags["wildcard.model"] == "tinyclip" and tags["model_id"] == "ft/tinyclip"
    assert tags["pipeline_run_id"] == "pipe123" and tags["slurm_job_id"] == "4242"
    assert tags["mlflow.parentRunId"] == parent
    assert tags["params_hash"] == tracking.params_hash(params)
    assert tags[tracking.RUN_ID_TAG] == run.run_id != rec.info.run_id
    assert [a.path for a in store.list_artifacts(rec.info.run_id, "tables")] == ["tables/table.md"]
    local = store.download_artifacts(rec.info.run_id, "tables/table.md", str(tmp_path))
    assert open(local).read() == "| a |\n"


def test_spooled_failed_job_is_loaded_as_failed(store, spool):
    with pytest.raises(RuntimeError), tracking.job_run("evaluate", {}, "exp"):
        raise RuntimeError("boom")
    tracking.sync_spool()
    assert _only_run(store).info.status == "FAILED"


def test_killed_job_waits_for_finalize_and_keeps_what_it_logged(store, spool):
    with tracking.job_run("finetune", {"steps": 3}, "exp") as run:
        run.log_metrics({"loss": 0.5}, step=1)
    record = spool / run.run_id / "run.jsonl"
    lines = record.read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "end"
    record.write_text("\n".join(lines[:-1]) + '\n{"event":"metr')  # killed while writing a line
    assert tracking.sync_spool() == 0 and record.is_file()  # may still be running: left alone
    assert tracking.sync_spool(finalize=True) == 1
    rec = _only_run(store)
    assert rec.info.status == "KILLED" and rec.data.metrics == {"loss": 0.5}


def test_sync_that_died_half_way_is_redone_without_a_duplicate(store, spool, monkeypatch):
    with tracking.job_run("report", {"a": 1}, "exp") as run:
        run.log_metrics({"x": 1.0})
    calls = {"n": 0}
    real = store.__class__.set_terminated

    def dies_once(self, *args, **kwargs):  # the sync process dies before closing the run
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store.__class__, "set_terminated", dies_once)
    with pytest.raises(KeyboardInterrupt):
        tracking.sync_spool()
    assert (spool / run.run_id).is_dir()
    assert tracking.sync_spool() == 1
    rec = _only_run(store)  # the half-loaded copy was deleted
    assert rec.info.status == "FINISHED" and rec.data.metrics == {"x": 1.0}


def test_finish_pipeline_loads_the_spool_before_closing_the_parent(store, spool, monkeypatch):
    parent = tracking.init_store("exp")
    monkeypatch.setenv("ROBUSTIFY_PARENT_RUN_ID", parent)
    with tracking.job_run("report", {}, "exp"):
        pass
    tracking.finish_pipeline(parent)
    assert store.get_run(parent).info.lifecycle_stage == "active"  # it has a child now
    runs = store.search_runs([store.get_experiment_by_name("exp").experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs) == ["pipeline", "report"]


def test_a_spooling_job_never_imports_mlflow(spool, tmp_path):
    code = ("import sys; from robustify import tracking\n"
            "with tracking.job_run('corrupt', {'a': 1}, 'exp') as run:\n"
            "    run.log_metrics({'images': 50})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'sqlalchemy')))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(list(spool.iterdir())) == 1


def test_failed_job_is_marked_failed(store):
    with pytest.raises(RuntimeError), tracking.job_run("evaluate", {}, "exp") as run:
        raise RuntimeError("boom")
    assert store.get_run(run.run_id).info.status == "FAILED"


def test_an_exported_mlflow_run_id_is_not_resumed(store, monkeypatch):
    with tracking.job_run("a", {}, "exp") as first:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id)
    with tracking.job_run("b", {}, "exp") as second:
        pass
    assert second.run_id != first.run_id
    assert store.get_run(first.run_id).data.tags["stage"] == "a"


def test_pipeline_run_without_jobs_is_deleted(store, monkeypatch):
    idle = tracking.init_store("exp")
    tracking.finish_pipeline(idle)
    assert store.get_run(idle).info.lifecycle_stage == "deleted"
    busy = tracking.init_store("exp")
    monkeypatch.setenv("ROBUSTIFY_PARENT_RUN_ID", busy)
    with tracking.job_run("report", {}, "exp"):
        pass
    tracking.finish_pipeline(busy)
    assert store.get_run(busy).info.lifecycle_stage == "active"
    assert store.get_run(busy).info.status == "FINISHED"
