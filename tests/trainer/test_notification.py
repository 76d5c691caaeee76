"""`kubetune run --print-notification`: after a real promoted run, the CloudEvent the operator
would POST, built as the operator builds it (from the run's result), names exactly what the
trainer wrote to latest.json — the hand-off to serving says the same thing both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event

from kubetune.api import PROMOTED_EVENT_TYPE, PromotionRecord
from kubetune.cli import main
from tests.support.tiny import task_records, write_jsonl
from tests.trainer.conftest import job_manifest


def test_the_printed_notification_says_what_latest_json_says(
    tiny_model: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), hyperparameters__maxSteps=20)
    doc["spec"]["notify"] = {"webhook": {"url": "https://deploy.example.com/hooks/kubetune"}}
    held_out = write_jsonl(tmp_path / "test.jsonl", task_records(30, seed=9)).as_uri()
    doc["spec"]["dataset"]["testUri"] = held_out
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    flags = ["--workdir", str(tmp_path / "work"), "--run-id", "feedf00d", "--print-notification"]
    assert main(["run", str(job), *flags]) == 0

    text = capsys.readouterr().out
    _, _, rest = text.partition(
        "==> notification: POST to https://deploy.example.com/hooks/kubetune\n"
    )
    assert rest, text
    headers_text, _, body = rest.partition("\n\n")
    headers = dict(line.split(": ", 1) for line in headers_text.splitlines())
    assert headers["webhook-id"] == "feedf00d" and "webhook-signature" not in headers
    event = from_structured_event(
        HTTPMessage(headers={"content-type": headers["Content-Type"]}, body=body.encode())
    )
    assert event.get_attributes()["type"] == PROMOTED_EVENT_TYPE
    assert event.get_attributes()["source"].endswith("/namespaces/test/finetunejobs/tiny")
    data = event.get_data()
    latest = json.loads((out / "latest.json").read_text())
    record = PromotionRecord.model_validate(latest)
    # Every field latest.json has, the notification has, with the same value.
    assert {k: data[k] for k in latest} == latest, (data, latest)
    assert record.run_id == "feedf00d" and data["latestUri"] == f"{out.as_uri()}/latest.json"
    assert data["evaluation"]["base"]["loss"] > data["evaluation"]["tuned"]["loss"]
    # The model card names the test set the scores came from.
    card = yaml.safe_load((out / "runs" / "feedf00d" / "report.md").read_text().split("---")[1])
    assert card["model-index"][0]["results"][0]["dataset"] == {"name": "test set", "type": held_out}
    report = (out / "runs/feedf00d/report.md").read_text()
    assert f"examples of the test set `{held_out}`" in report
    assert "## Evaluation (test set)" in report


def test_a_run_that_is_not_promoted_prints_no_notification(
    tiny_model: Path, task_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(
        tiny_model, task_file, out.as_uri(), hyperparameters__maxSteps=2,
        gates=[{"metric": "exactMatch", "min": 1.01}],
    )  # fmt: skip
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    flags = ["--workdir", str(tmp_path / "work"), "--run-id", "0badf00d", "--print-notification"]
    assert main(["run", str(job), *flags]) == 4
    assert "==> no notification: run 0badf00d was not promoted" in capsys.readouterr().out
