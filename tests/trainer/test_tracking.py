"""Experiment tracking against a real MLflow server (started by the tests) and W&B offline mode:
what the trainer reports is what the tracker holds, a resumed run continues its tracked run, and
a tracker that is down or failing never fails training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from kubetune.api import ExitCode, TrainerResult
from tests.support.mlflow import MlflowServer
from tests.support.s3 import _free_ports
from tests.support.wandb import read_run
from tests.trainer.conftest import (
    config_for,
    job_manifest,
    preempt_after_first_checkpoint,
    run_job,
    start_trainer,
)


def _mlflow_runs(server: MlflowServer, experiment: str, run_id: str) -> list[Any]:
    client = MlflowClient(tracking_uri=server.uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`kubetune.runId` = '{run_id}'"
    )


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_is_tracked_in_mlflow_and_wandb_offline(
    tiny_model: Path, task_file: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(
        tiny_model,
        task_file,
        out.as_uri(),
        "lora",
        hyperparameters__maxSteps=30,
        hyperparameters__evalEverySteps=10,
        gates=[{"metric": "exactMatch", "min": 0.0}],
        tracking={
            "mlflow": {
                "trackingUri": mlflow_server.uri,
                "experiment": "tracking-test",
                "tags": {"team": "search"},
            },
            "wandb": {"project": "kubetune-tests", "mode": "offline", "tags": ["tiny"]},
        },
    )
    result, recorder = run_job(doc, tmp_path / "work", run_id="7eac0001")
    assert result.outcome == "Succeeded", result.message
    assert not result.warnings, result.warnings
    run_dir = out / "runs" / "7eac0001"
    metrics_json = json.loads((run_dir / "metrics.json").read_text())
    losses = [(s.step, s.loss) for s in recorder.steps if s.loss is not None]
    assert [step for step, _ in losses] == list(range(1, 31))

    # MLflow: one run, finished, holding the spec, the data, the curves, the result, the files.
    (found,) = _mlflow_runs(mlflow_server, "tracking-test", "7eac0001")
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(found.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-7eac0001"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["method.type"] == "lora"
    assert float(params["hyperparameters.learningRate"]) == 5e-3
    assert params["hyperparameters.maxSteps"] == "30"
    assert params["model.uri"] == tiny_model.as_uri()
    assert params["method.lora.r"] == "16"  # resolved defaults are tracked too
    assert params["data.sha256"] == metrics_json["data"]["sha256"]
    assert int(params["data.train"]) == metrics_json["data"]["train"]
    assert params["gates.0.metric"] == "exactMatch"
    assert tags["team"] == "search" and tags["kubetune.job"] == "tiny"
    assert tags["kubetune.namespace"] == "test"
    assert tags["kubetune.outcome"] == "Succeeded" and tags["kubetune.promoted"] == "true"
    assert tags["kubetune.gate.0"].startswith("passed: exactMatch")
    assert result.artifacts is not None
    assert tags["kubetune.artifacts.adapterUri"] == result.artifacts.adapter_uri
    assert tags["kubetune.artifacts.manifestUri"] == result.artifacts.manifest_uri
    assert tags["kubetune.artifacts.reportUri"] == result.artifacts.report_uri
    mlflow_losses = _history(client, run.info.run_id, "train/loss")
    assert [s for s, _ in mlflow_losses] == [s for s, _ in losses]
    assert [v for _, v in mlflow_losses] == pytest.approx([v for _, v in losses])
    assert [s for s, _ in _history(client, run.info.run_id, "validation/loss")] == [10, 20, 30]
    assert [v for _, v in _history(client, run.info.run_id, "validation/loss")] == pytest.approx(
        recorder.eval_losses
    )
    assert [s for s, _ in _history(client, run.info.run_id, "train/learning_rate")] == list(
        range(1, 31)
    )
    assert result.metrics is not None and result.metrics.tuned and result.metrics.base
    assert metrics["tuned/exactMatch"] == pytest.approx(result.metrics.tuned.exact_match)
    assert metrics["base/exactMatch"] == pytest.approx(result.metrics.base.exact_match)
    assert metrics["tuned/loss"] == pytest.approx(result.metrics.tuned.loss)
    assert metrics["gates/passed"] == 1.0 and metrics["gates/failed"] == 0.0
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"report.md", "loss.png", "metrics.json", "result.json"}
    copy = Path(client.download_artifacts(run.info.run_id, "report.md", str(tmp_path)))
    assert copy.read_text() == (run_dir / "report.md").read_text()

    # W&B offline: the run's records went into the run's folder and its manifest.
    (wandb_file,) = run_dir.glob("wandb/offline-run-*-tiny-7eac0001/run-tiny-7eac0001.wandb")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert str(wandb_file.relative_to(run_dir)) in {f["path"] for f in manifest["files"]}
    offline = read_run(wandb_file)
    assert offline.run_id == "tiny-7eac0001" and offline.project == "kubetune-tests"
    assert offline.tags == ["tiny"]
    assert offline.config["method"]["type"] == "lora"
    assert offline.config["data.sha256"] == metrics_json["data"]["sha256"]
    history = [(h["_step"], h["train/loss"]) for h in offline.history if "train/loss" in h]
    assert [s for s, _ in history] == [s for s, _ in losses]
    assert [v for _, v in history] == pytest.approx([v for _, v in losses])
    assert [h["_step"] for h in offline.history if "validation/loss" in h] == [10, 20, 30]
    assert offline.summary["tuned/exactMatch"] == pytest.approx(result.metrics.tuned.exact_match)
    assert offline.summary["kubetune.artifacts.adapterUri"] == result.artifacts.adapter_uri
    assert offline.summary["kubetune.outcome"] == "Succeeded"
    assert offline.exit_code == 0


def test_gates_failed_is_a_finished_run_that_says_so(
    tiny_model: Path, task_file: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    doc = job_manifest(
        tiny_model,
        task_file,
        (tmp_path / "out").as_uri(),
        "lora",
        hyperparameters__maxSteps=2,
        gates=[{"metric": "exactMatch", "min": 1.01}],
        tracking={"mlflow": {"trackingUri": mlflow_server.uri, "logFiles": False}},
    )
    result, _ = run_job(doc, tmp_path / "work", run_id="7eac0002")
    assert result.outcome == "GatesFailed"
    (found,) = _mlflow_runs(mlflow_server, "test/tiny", "7eac0002")  # the default experiment
    tags = found.data.tags
    assert found.info.status == "FINISHED"
    assert tags["kubetune.outcome"] == "GatesFailed" and tags["kubetune.promoted"] == "false"
    assert tags["kubetune.gate.0"].startswith("FAILED: exactMatch")
    assert "kubetune.artifacts.adapterUri" in tags  # kept, just not promoted
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert client.list_artifacts(found.info.run_id) == []  # logFiles: false


def test_a_failed_run_is_failed_in_mlflow_with_its_message(
    tiny_model: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    doc = job_manifest(
        tiny_model,
        empty,
        (tmp_path / "out").as_uri(),
        "lora",
        tracking={"mlflow": {"trackingUri": mlflow_server.uri}},
    )
    result, _ = run_job(doc, tmp_path / "work", run_id="7eac0003")
    assert result.outcome == "Failed" and result.exit_code == ExitCode.DATA_ERROR
    (found,) = _mlflow_runs(mlflow_server, "test/tiny", "7eac0003")
    assert found.info.status == "FAILED"
    assert found.data.tags["kubetune.outcome"] == "Failed"
    assert found.data.tags["kubetune.message"] == result.message


def test_a_tracker_that_cannot_be_reached_does_not_fail_the_run(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    (port,) = _free_ports(1)  # nothing listens there
    doc = job_manifest(
        tiny_model,
        task_file,
        (tmp_path / "out").as_uri(),
        "lora",
        hyperparameters__maxSteps=2,
        tracking={"mlflow": {"trackingUri": f"http://127.0.0.1:{port}"}},
    )
    result, recorder = run_job(doc, tmp_path / "work", run_id="7eac0004")
    assert result.outcome == "Succeeded", result.message
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("MLflow tracking stopped (start): MlflowException:")
    assert result.warnings[0].endswith("the run went on without it")
    assert [s.step for s in recorder.steps] == [1, 2]
    saved = TrainerResult.model_validate_json(
        (tmp_path / "out" / "runs" / "7eac0004" / "result.json").read_text()
    )
    assert saved.warnings == result.warnings  # and the operator turns it into an Event


def test_a_resumed_run_continues_its_mlflow_run(
    tiny_model: Path, task_file: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(
        tiny_model,
        task_file,
        out.as_uri(),
        "lora",
        hyperparameters__maxSteps=200,
        hyperparameters__checkpointEverySteps=20,
        tracking={"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "resume-test"}},
    )
    config = config_for(doc, "7eac0005")
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    checkpoints = f"{config.output_prefix}/checkpoints"
    log = tmp_path / "trainer.log"

    first = start_trainer(config_path, tmp_path / "work1", log)
    killed_at = preempt_after_first_checkpoint(first, checkpoints, log)
    (interrupted,) = _mlflow_runs(mlflow_server, "resume-test", "7eac0005")
    assert interrupted.info.status == "RUNNING"  # nobody ended it

    second = start_trainer(config_path, tmp_path / "work2", log)
    assert second.wait(timeout=600) == 0, log.read_text()[-3000:]
    (finished,) = _mlflow_runs(mlflow_server, "resume-test", "7eac0005")
    assert finished.info.run_id == interrupted.info.run_id
    assert finished.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    steps = [s for s, _ in _history(client, finished.info.run_id, "train/loss")]
    # Every step is there: those up to the checkpoint were sent before it was saved, the rest by
    # the second attempt (the steps it trained again, after the checkpoint, may be there twice).
    assert set(steps) == set(range(1, 201))
    assert all(steps.count(s) == 1 for s in range(1, killed_at + 1))
    assert max(steps.count(s) for s in range(killed_at + 1, 201)) <= 2
    assert finished.data.tags["kubetune.outcome"] == "Succeeded"


def test_a_tracker_whose_client_is_missing_fails_at_once_with_the_fix(
    tiny_model: Path, task_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer import tracking

    monkeypatch.setattr(tracking, "find_spec", lambda name: None if name == "wandb" else object())
    doc = job_manifest(
        tiny_model,
        task_file,
        (tmp_path / "out").as_uri(),
        "lora",
        tracking={"wandb": {"project": "p", "mode": "offline"}},
    )
    result, recorder = run_job(doc, tmp_path / "work", run_id="7eac0006")
    assert (result.outcome, result.exit_code) == ("Failed", ExitCode.INVALID_SPEC)
    assert result.message == (
        "spec.tracking.wandb: the W&B client (wandb) is not installed here; "
        "pip install 'kubetune[tracking]' (the trainer image has it)"
    )
    assert recorder.steps == []  # said before training, not after
