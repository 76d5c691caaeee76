"""A trainer killed mid-run (as by preemption) resumes from its newest complete checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import ExitCode, PromotionRecord, TrainerResult
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.pipeline import finished_run
from kubetune_trainer.training import complete_checkpoints
from tests.trainer.conftest import (
    config_for,
    job_manifest,
    preempt_after_first_checkpoint,
    run_job,
    start_trainer,
)


def test_killed_trainer_resumes_from_its_checkpoint(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(
        tiny_model,
        task_file,
        out.as_uri(),
        "lora",
        hyperparameters__maxSteps=300,
        hyperparameters__checkpointEverySteps=20,
    )
    termination = tmp_path / "termination-log"
    config = config_for(doc, "feed0001").model_copy(
        update={"termination_message_path": str(termination)}
    )
    config_path = tmp_path / "config.json"
    config_path.write_text(config.model_dump_json())
    checkpoints = f"{config.output_prefix}/checkpoints"
    log = tmp_path / "trainer.log"

    first = start_trainer(config_path, tmp_path / "work1", log)
    killed_at = preempt_after_first_checkpoint(first, checkpoints, log, timeout=120)
    assert 0 < killed_at < 300
    assert not (out / "latest.json").exists() and not termination.exists()

    second = start_trainer(config_path, tmp_path / "work2", log)
    assert second.wait(timeout=300) == ExitCode.SUCCEEDED, log.read_text()[-3000:]
    result = TrainerResult.model_validate_json(termination.read_text())
    assert result.resumed_from_step is not None and result.resumed_from_step >= killed_at
    assert result.steps == 300
    assert f"Resuming step={result.resumed_from_step}" in log.read_text()
    assert len(complete_checkpoints(checkpoints)) <= 2
    assert (out / "latest.json").exists()


def test_a_finished_run_is_never_reopened(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """Running a finished run again (the same spec with `kubetune run`, a retried pod) returns
    its stored result and writes nothing: resuming is for an interrupted run only."""
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), "lora")
    run_dir = out / "runs" / "f1f1f1f1"
    run_dir.mkdir(parents=True)
    stored = TrainerResult(
        run_id="f1f1f1f1", outcome="Succeeded", exit_code=ExitCode.SUCCEEDED,
        message="promoted", promoted=True, steps=30,
    )  # fmt: skip
    (run_dir / "result.json").write_text(stored.model_dump_json())
    (run_dir / "manifest.json").write_text('{"runId": "f1f1f1f1", "files": []}')
    (out / "latest.json").write_text(_record("f1f1f1f1", "2026-12-01T10:00:00Z"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    result, recorder = run_job(doc, tmp_path / "work", run_id="f1f1f1f1")

    assert (result.outcome, result.exit_code, result.steps) == ("Succeeded", 0, 30)
    assert "had already finished (Succeeded); nothing was trained" in result.warnings[-1]
    assert recorder.stages == ["done"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Interrupted (no manifest yet): the run goes on as before.
    (run_dir / "manifest.json").unlink()
    assert finished_run(config_for(doc, "f1f1f1f1")) is None


def _record(run_id: str, at: str) -> str:
    return PromotionRecord.model_validate_json(json.dumps(
        {"runId": run_id, "job": "j", "namespace": "ns", "baseModel": {"uri": "hf://m"},
         "method": "lora", "specHash": "h", "promotedAt": at}
    )).model_dump_json(by_alias=True, exclude_none=True)  # fmt: skip


def _finished(out: Path, run_id: str, **fields: object) -> Path:
    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    stored = TrainerResult.model_validate_json(json.dumps(
        {"runId": run_id, "outcome": "Succeeded", "exitCode": 0, "message": "promoted",
         "promoted": True, "promotedAt": "2026-12-01T10:00:00Z",
         "artifacts": {"adapterUri": f"{out.as_uri()}/runs/{run_id}/adapter/"}, **fields}
    ))  # fmt: skip
    (run_dir / "result.json").write_text(stored.model_dump_json(by_alias=True))
    (run_dir / "manifest.json").write_text(json.dumps({"runId": run_id, "files": []}))
    return run_dir


def test_a_run_stopped_before_its_promotion_is_promoted_when_run_again(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """The pod died after manifest.json and before latest.json: the retried pod finishes the
    promotion instead of reporting one that never happened."""
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), "lora")
    _finished(out, "f1f1f1f1")

    result = finished_run(config_for(doc, "f1f1f1f1"))

    assert result is not None and result.promoted
    latest = PromotionRecord.model_validate_json((out / "latest.json").read_text())
    assert (latest.run_id, latest.promoted_at.isoformat()) == (
        "f1f1f1f1",
        "2026-12-01T10:00:00+00:00",
    )
    assert finished_run(config_for(doc, "f1f1f1f1")).promoted  # latest.json names it: as is
    # Another run holds latest.json, promoted after this one's time: it stays the champion and
    # this run is not reported as promoted (that would announce it and send serving back).
    (out / "latest.json").write_text(_record("later000", "2026-12-02T10:00:00Z"))
    again = finished_run(config_for(doc, "f1f1f1f1"))
    assert again is not None and not again.promoted and again.exit_code == ExitCode.GATES_FAILED
    assert "not promoted: run later000 is the promoted run now" in again.message
    assert json.loads((out / "latest.json").read_text())["runId"] == "later000"
    stored = TrainerResult.model_validate_json((out / "runs/f1f1f1f1/result.json").read_text())
    assert not stored.promoted  # the next retried pod reads the same


def test_files_that_are_not_the_runs_own_do_not_finish_it(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """A result.json naming another run, or artifacts outside the run's prefix (a tenant's
    bucket is untrusted), does not make the run finished: it trains afresh."""
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), "lora")
    _finished(out, "f1f1f1f1", runId="other000")
    assert finished_run(config_for(doc, "f1f1f1f1")) is None
    _finished(out, "f2f2f2f2", artifacts={"adapterUri": "s3://elsewhere/adapter/"})
    assert finished_run(config_for(doc, "f2f2f2f2")) is None
    climbing = f"{out.as_uri()}/runs/f3f3f3f3/../../../elsewhere/adapter/"
    _finished(out, "f3f3f3f3", artifacts={"adapterUri": climbing})
    assert finished_run(config_for(doc, "f3f3f3f3")) is None
    assert not (out / "latest.json").exists()


def test_a_finished_run_whose_result_cannot_be_read_fails_retryably(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), "lora")
    (_finished(out, "f1f1f1f1") / "result.json").write_text("{not json")

    with pytest.raises(TrainerError, match=r"has a manifest\.json but its result\.json cannot"):
        finished_run(config_for(doc, "f1f1f1f1"))
    result, _ = run_job(doc, tmp_path / "work", run_id="f1f1f1f1")
    assert (result.outcome, result.exit_code) == ("Failed", ExitCode.RUNTIME_ERROR)
