"""What `kubetune run` shows a user: its stages, the bar and the trainer's own warnings; the
libraries' warnings (transformers' own logger too) in trainer.log, their progress bars nowhere,
and transformers' logging restored as it was found once the run ends."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import ExitCode
from kubetune.cli import main
from tests.support.tiny import task_records, write_jsonl
from tests.trainer.conftest import job_manifest


def test_library_warnings_and_bars_stay_off_the_console(
    tiny_model: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers.utils import logging as hf_logging

    from kubetune_trainer import modeling

    load = modeling.load_tokenizer

    def loud(*args: Any) -> Any:
        # transformers' own logger (it does not propagate; it has its own stderr handler)
        hf_logging.get_logger("transformers.tokenization_utils_base").warning("probe warning")
        return load(*args)

    monkeypatch.setattr(modeling, "load_tokenizer", loud)
    library = logging.getLogger("transformers")
    hf_logging.get_logger("transformers")
    # its own stderr handler writes where this test captures
    monkeypatch.setattr(hf_logging._default_handler, "stream", sys.stderr)
    # As in the kubetune CLI's process: no handlers on the root logger (pytest adds its own).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    before = (list(library.handlers), library.propagate, hf_logging.is_progress_bar_enabled())
    data = tmp_path / "data.jsonl"
    write_jsonl(data, task_records(40))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(tiny_model, data, out.as_uri())))
    flags = ["--set", "spec.hyperparameters.maxSteps=2", "--set", "spec.evaluation.maxSamples=4"]
    code = main(["run", str(job), "--workdir", str(tmp_path / "work"), *flags])
    assert code == ExitCode.SUCCEEDED
    console = "".join(capfd.readouterr())
    assert "probe warning" not in console
    assert "Loading weights" not in console and "Writing model shards" not in console
    assert "promoted" in console  # the run's own lines are still there
    logs = list(out.rglob("trainer.log"))
    assert len(logs) == 1 and "probe warning" in logs[0].read_text()
    # transformers as the run found it
    after = (list(library.handlers), library.propagate, hf_logging.is_progress_bar_enabled())
    assert after == before
