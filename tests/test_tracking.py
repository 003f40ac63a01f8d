"""Every job is an MLflow run with params, metrics, artifacts and the DESIGN §4 tags."""

from __future__ import annotations

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
    return MlflowClient(uri)


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
    assert (tmp_path / "mlflow.db").is_file()


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
