"""Champion and challenger: gates that compare with the promoted run, evaluated in the same run
on the same test set, and latest.json naming what a server needs. Three real runs of the tiny
model into one output: the first (nothing promoted yet) is judged against the base model and
promoted; a second, worse than the first but better than the base, is not promoted and says
why; a third, better than the first, is promoted and remembers the first for a rollback."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kubetune.api import ExitCode, PromotionRecord
from kubetune_trainer.champion import _kept
from tests.trainer.conftest import job_manifest, run_job

CHAMPION_GATE = {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}


def _run(tiny_model: Path, task_file: Path, out: str, steps: int, run_id: str, tmp: Path):
    doc = job_manifest(
        tiny_model,
        task_file,
        out,
        "lora",
        hyperparameters__maxSteps=steps,
        evaluation__metrics=["loss"],
        gates=[CHAMPION_GATE],
    )
    return run_job(doc, tmp / run_id, run_id=run_id)[0]


def _latest(out: str) -> PromotionRecord:
    path = Path(urlsplit(out).path) / "latest.json"
    return PromotionRecord.model_validate_json(path.read_text())


def test_a_challenger_is_promoted_only_when_it_beats_the_champion(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = (tmp_path / "out").as_uri()

    first = _run(tiny_model, task_file, out, 40, "c1a1c1a1", tmp_path)
    assert first.exit_code == ExitCode.SUCCEEDED and first.promoted, first.message
    (gate,) = first.gates
    assert gate.compared_with == "base (nothing promoted yet)" and gate.passed
    record = _latest(out)
    assert record.run_id == "c1a1c1a1" and record.previous_run_id is None
    assert record.base_model is not None and record.base_model.uri == tiny_model.as_uri()
    assert record.method == "lora"
    assert record.adapter_uri == f"{out}/runs/c1a1c1a1/adapter/" and record.promoted_at
    assert record.metrics is not None and record.metrics.loss == first.metrics.tuned.loss
    # The result says what latest.json says (the operator announces the promotion from it).
    assert (first.promoted_at, first.previous_run_id) == (record.promoted_at, None)

    second = _run(tiny_model, task_file, out, 3, "c2b2c2b2", tmp_path)
    assert second.exit_code == ExitCode.GATES_FAILED and not second.promoted
    metrics = second.metrics
    assert metrics.promoted_run_id == "c1a1c1a1"
    # The champion evaluated here, on the same test set, scores as it did in its own run.
    assert abs(metrics.promoted.loss - first.metrics.tuned.loss) < 1e-3
    assert metrics.base.loss > metrics.tuned.loss > metrics.promoted.loss  # between the two
    assert "loss improves by >= 0 vs promoted c1a1c1a1" in second.message, second.message
    assert _latest(out).run_id == "c1a1c1a1"
    report = (Path(urlsplit(out).path) / "runs/c2b2c2b2/report.md").read_text()
    assert "| metric | base | promoted (c1a1c1a1) | tuned |" in report
    assert "improvement over the promoted run" in report

    third = _run(tiny_model, task_file, out, 120, "c3c3c3c3", tmp_path)
    assert third.exit_code == ExitCode.SUCCEEDED and third.promoted, third.message
    assert third.metrics.tuned.loss <= third.metrics.promoted.loss
    record = _latest(out)
    assert (record.run_id, record.previous_run_id) == ("c3c3c3c3", "c1a1c1a1")
    assert (third.promoted_at, third.previous_run_id) == (record.promoted_at, "c1a1c1a1")
    stored = json.loads((Path(urlsplit(out).path) / "runs/c3c3c3c3/result.json").read_text())
    assert stored["previousRunId"] == "c1a1c1a1"
    assert second.promoted_at is None and second.previous_run_id is None
    saved = json.loads((Path(urlsplit(out).path) / "runs/c3c3c3c3/metrics.json").read_text())
    assert saved["promoted"]["runId"] == "c1a1c1a1"
    # Each promoted run keeps the record latest.json got (in its manifest): what a rollback
    # writes back; a run that was not promoted has none.
    runs = Path(urlsplit(out).path) / "runs"
    kept = PromotionRecord.model_validate_json((runs / "c3c3c3c3/promotion.json").read_text())
    assert kept == record
    first_kept = (runs / "c1a1c1a1/promotion.json").read_text()
    assert PromotionRecord.model_validate_json(first_kept).run_id == "c1a1c1a1"
    assert not (runs / "c2b2c2b2/promotion.json").exists()
    manifest = json.loads((runs / "c3c3c3c3/manifest.json").read_text())
    assert "promotion.json" in {f["path"] for f in manifest["files"]}


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        pytest.param(b'{"runId": "c1a1', False, id="cut-short"),
        pytest.param(b'{"runId": "c1a1c1a1"}', False, id="older-layout"),
        pytest.param(b'{"runId": "other", "metrics": null, "generations": [], "note": ""}', False, id="another-champion"),
        pytest.param(b'{"runId": "c1a1c1a1", "metrics": {"loss": 0.5}, "generations": ["x"], "note": ""}', True, id="readable"),
    ],
)  # fmt: skip
def test_a_kept_champion_evaluation_is_used_only_when_readable(
    tmp_path: Path, content: bytes, kept: bool
) -> None:
    """An unreadable champion.json (an attempt killed while writing it) is evaluated again,
    not a failure that every retry repeats."""
    cached = tmp_path / "champion.json"
    cached.write_bytes(content)
    record = PromotionRecord(run_id="c1a1c1a1")
    found = _kept(cached.as_uri(), record)
    assert (found is not None) == kept
    if found is not None:
        assert found.metrics.loss == 0.5 and found.generations == ["x"]
