"""A trainer killed mid-run (as by preemption) resumes from its newest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

from kubetune.api import ExitCode, TrainerResult
from kubetune_trainer.training import complete_checkpoints
from tests.trainer.conftest import (
    config_for,
    job_manifest,
    preempt_after_first_checkpoint,
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
