"""The regression guard (the forgetting check): evaluation.regressionUri is a second evaluation
set of behaviour that tuning must not make worse. Two real runs of the tiny model into one
output: the first learns the task and is promoted; the second is trained on fresh data that
contradicts it (the labels the other way round) - it does well on its own test split, but it
forgot what the champion knew, and the guard keeps it from being promoted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.api import ExitCode, TrainerResult
from tests.support.tiny import task_records, write_jsonl
from tests.trainer.conftest import job_manifest, run_job

FLIP = {"positive": "negative", "negative": "positive"}


def test_a_run_that_forgets_is_not_promoted(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    general = write_jsonl(tmp_path / "general.jsonl", task_records(60, seed=7)).as_uri()
    flipped = [{**r, "output": FLIP[r["output"]]} for r in task_records(400, seed=1)]
    contradicting = write_jsonl(tmp_path / "fresh.jsonl", flipped)
    out = (tmp_path / "out").as_uri()

    def run(run_id: str, data: Path, gates: list[dict[str, Any]]) -> TrainerResult:
        doc = job_manifest(
            tiny_model,
            data,
            out,
            "lora",
            hyperparameters__maxSteps=60,
            evaluation__metrics=["loss"],
            evaluation__regressionUri=general,
            evaluation__maxSamples=40,
            gates=gates,
        )
        return run_job(doc, tmp_path / run_id, run_id=run_id)[0]

    learns = {"metric": "loss", "minImprovement": 0.0}
    no_worse_than_base = {"metric": "loss", "maxRegression": 0.0, "evalSet": "regression"}
    first = run("f1f1f1f1", task_file, [learns, no_worse_than_base])
    assert first.exit_code == ExitCode.SUCCEEDED and first.promoted, first.message
    regression = first.metrics.regression
    assert regression is not None and regression.promoted is None
    assert regression.tuned.loss < regression.base.loss
    task_gate, guard = first.gates
    assert guard.eval_set == "regression" and task_gate.eval_set is None
    assert abs(guard.value - (regression.base.loss - regression.tuned.loss)) < 1e-9
    run_dir = Path(urlsplit(out).path) / "runs/f1f1f1f1"
    report = (run_dir / "report.md").read_text()
    assert "## Evaluation (regression set)" in report and "40 examples of" in report
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["regression"]["tuned"]["loss"] == regression.tuned.loss

    no_worse_than_champion = {**no_worse_than_base, "compareWith": "promoted"}
    second = run("f2f2f2f2", contradicting, [learns, no_worse_than_champion])
    assert second.exit_code == ExitCode.GATES_FAILED and not second.promoted
    assert second.gates[0].passed  # it learned its own data...
    assert not second.gates[1].passed  # ...and forgot what the champion knew
    assert second.gates[1].compared_with == "promoted f1f1f1f1"
    assert "loss on the regression set regresses by <= 0 vs promoted f1f1f1f1" in second.message
    measured = second.metrics.regression
    assert measured is not None and measured.promoted is not None
    # The champion, measured again in this run on the same set, scores as it did in its own.
    assert abs(measured.promoted.loss - regression.tuned.loss) < 1e-3
    assert measured.tuned.loss > measured.promoted.loss
    latest = json.loads((Path(urlsplit(out).path) / "latest.json").read_text())
    assert latest["runId"] == "f1f1f1f1"
    report = (run_dir.parent / "f2f2f2f2" / "report.md").read_text()
    guarded = report.partition("## Evaluation (regression set)")[2]
    assert "| metric | base | promoted (f1f1f1f1) | tuned |" in guarded, report
