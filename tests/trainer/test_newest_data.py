"""A data URI ending in / names the newest data file under that prefix: what a schedule's
template uses so each run picks up the freshest upload. Chosen when the run starts and pinned in
the run (inputs.json), so a resumed run trains on what it started with."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kubetune.api import ExitCode
from kubetune_trainer import storage
from kubetune_trainer.errors import DataError
from kubetune_trainer.pipeline import _pin_inputs
from tests.support.s3 import S3Server
from tests.support.tiny import task_records, write_jsonl
from tests.trainer.conftest import config_for, job_manifest, run_job


def test_the_newest_file_under_a_prefix_is_chosen_and_kept(
    tiny_model: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    older = write_jsonl(data / "2026-11-16" / "reviews.jsonl", task_records(300, seed=1))
    newer = write_jsonl(data / "2026-11-09" / "reviews.jsonl", task_records(300, seed=2))
    (data / "README.md").write_text("not data")
    # Modification time decides, not the name: the 11-09 upload is the later one here.
    os.utime(older, (1_700_000_000, 1_700_000_000))
    os.utime(newer, (1_700_100_000, 1_700_100_000))
    out = (tmp_path / "out").as_uri()
    doc = job_manifest(
        tiny_model, data, out, "lora", hyperparameters__maxSteps=2, evaluation__metrics=["loss"]
    )
    doc["spec"]["dataset"]["uri"] = data.as_uri() + "/"
    config = config_for(doc, "da7a0001")
    assert _pin_inputs(config).spec.dataset.uri == newer.as_uri()

    # Newer data arrives: a resume of the same run keeps its choice; a new run takes it.
    newest = write_jsonl(data / "2026-11-23" / "reviews.jsonl", task_records(300, seed=3))
    os.utime(newest, (1_700_200_000, 1_700_200_000))
    assert _pin_inputs(config).spec.dataset.uri == newer.as_uri()
    pinned = json.loads((tmp_path / "out/runs/da7a0001/inputs.json").read_text())
    assert pinned == {"dataset.uri": newer.as_uri()}
    assert _pin_inputs(config_for(doc, "da7a0002")).spec.dataset.uri == newest.as_uri()

    # The whole run reads the chosen file and says so in its report.
    result, _ = run_job(doc, tmp_path / "work", run_id="da7a0003")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    report = (tmp_path / "out/runs/da7a0003/report.md").read_text()
    assert newest.as_uri() in report

    empty = tmp_path / "empty"
    empty.mkdir()
    doc["spec"]["dataset"]["uri"] = empty.as_uri() + "/"
    with pytest.raises(DataError, match=r"spec.dataset.uri: no data file .* under file:///"):
        _pin_inputs(config_for(doc, "da7a0004"))


def test_newest_under_an_s3_prefix(s3_env: S3Server) -> None:
    storage.write_bytes("s3://models/feeds/reviews/2026-11-01.jsonl", b"{}\n")
    storage.write_bytes("s3://models/feeds/reviews/2026-11-08.jsonl", b"{}\n")
    storage.write_bytes("s3://models/feeds/reviews/notes.txt", b"later, but not data")
    storage.write_bytes("s3://models/feeds/other/2026-12-01.jsonl", b"{}\n")
    # S3's LastModified has whole seconds: within one, the greatest key is the newest.
    found = storage.newest("s3://models/feeds/reviews/", (".jsonl", ".csv"))
    assert found == "s3://models/feeds/reviews/2026-11-08.jsonl"
    assert storage.newest("s3://models/feeds/none/", (".jsonl",)) is None
