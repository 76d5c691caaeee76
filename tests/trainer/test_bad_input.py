"""Bad input through `kubetune run`: one clear line naming the file, line or field, a distinct
exit code, and nothing half-written or promoted left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kubetune.api import ExitCode, TrainerResult
from kubetune.cli import main
from tests.support.tiny import task_records, write_jsonl
from tests.trainer.conftest import job_manifest

GOOD = {
    "instruction": "Is this review positive or negative?",
    "input": "the soup was great",
    "output": "positive",
}


def lines(*records: object) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


# (dataset bytes, extra --set flags, exit code, expected text in the one-line message)
# fmt: off
CASES = [
    pytest.param(lines(GOOD, GOOD, b'{"instruction": "x", "output": '), [], ExitCode.DATA_ERROR, "data.jsonl line 3: invalid JSON", id="malformed-json-line"),
    pytest.param(lines(GOOD, {"instruction": "x", "input": "y"}), ["spec.dataset.format=alpaca"], ExitCode.DATA_ERROR, "data.jsonl line 2: missing 'output' for the alpaca format", id="missing-field"),
    pytest.param(lines(*[{**GOOD, "output": "  "}] * 5), [], ExitCode.DATA_ERROR, "data.jsonl: no usable records after cleaning (5 read, 5 empty", id="empty-after-cleaning"),
    pytest.param(lines({"question": "a", "answer": "b"}), [], ExitCode.DATA_ERROR, "data.jsonl line 1: cannot tell the format from fields ['answer', 'question']", id="unknown-format"),
    pytest.param(lines(GOOD, GOOD) + b'{"instruction": "caf\xe9", "output": "x"}\n', [], ExitCode.DATA_ERROR, "data.jsonl line 3: not valid UTF-8 (byte 0xe9)", id="non-utf8"),
    pytest.param(lines({"messages": [{"role": "user", "content": "hi"}]}), [], ExitCode.DATA_ERROR, "data.jsonl line 1: the last message must be the assistant's answer", id="chat-without-answer"),
    pytest.param(lines(*[{"text": f"plain text {i}"} for i in range(20)]), [], ExitCode.INVALID_SPEC, "spec.evaluation.metrics: exactMatch need prompt/answer pairs", id="text-with-generation-metric"),
    pytest.param(lines(GOOD), ["spec.dataset.uri=file:///nonexistent/data.jsonl"], ExitCode.DATA_ERROR, "dataset file:///nonexistent/data.jsonl: no such file", id="dataset-missing"),
    pytest.param(lines(GOOD), ["spec.model.uri=file:///nonexistent/model"], ExitCode.INVALID_SPEC, "spec.model.uri: file:///nonexistent/model does not exist", id="model-missing"),
    pytest.param(lines(GOOD), ["spec.method.type=lorra"], ExitCode.INVALID_SPEC, "spec.method.type: 'lorra' is not one of lora", id="invalid-spec"),
]
# fmt: on


@pytest.mark.parametrize(("content", "sets", "code", "message"), CASES)
def test_bad_input_is_one_clear_line(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    sets: list[str],
    code: ExitCode,
    message: str,
) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(tiny_model, data, out.as_uri())))
    flags = [f for s in sets for f in ("--set", s)]

    assert main(["run", str(job), "--workdir", str(tmp_path / "work"), *flags]) == code

    captured = capsys.readouterr()
    reported = [line for line in (captured.out + captured.err).splitlines() if message in line]
    assert len(reported) == 1, captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err
    written = [p.name for p in out.rglob("*")] if out.exists() else []
    assert "manifest.json" not in written and "latest.json" not in written


def test_a_diverging_loss_stops_the_run_with_its_own_verdict(
    nan_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A NaN loss is a verdict (exit code 5, Diverged), not a run that trains on garbage."""
    data = tmp_path / "data.jsonl"
    write_jsonl(data, task_records(60))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_manifest(nan_model, data, out.as_uri())))
    flags = ["--set", "spec.hyperparameters.maxSteps=5"]
    code = main(["run", str(job), "--workdir", str(tmp_path / "work"), *flags])
    assert code == ExitCode.DIVERGED
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "training diverged at step 1: the loss is nan" in text, text
    assert "learningRate" in text and "Traceback" not in text
    written = [p.name for p in out.rglob("*")] if out.exists() else []
    assert "manifest.json" not in written and "latest.json" not in written


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"runId": "0123', id="truncated"),
        pytest.param(b'{"job": "sql"}', id="not-a-record"),
    ],
)
def test_a_corrupt_latest_json_fails_at_once_naming_it(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    """A run whose gate compares with the promoted run reads latest.json; a corrupt one was a
    retryable failure (a retry reads the same bytes), now the user's, naming the file."""
    data = tmp_path / "data.jsonl"
    write_jsonl(data, task_records(40))
    out = tmp_path / "out"
    out.mkdir()
    (out / "latest.json").write_bytes(content)
    doc = job_manifest(tiny_model, data, out.as_uri(), gates=[
        {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}
    ])  # fmt: skip
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    code = main(["run", str(job), "--workdir", str(tmp_path / "work")])
    assert code == ExitCode.INVALID_SPEC
    text = capsys.readouterr()
    text = text.out + text.err
    assert f"spec.output.uri: {(out / 'latest.json').as_uri()} is not a promotion record" in text
    assert "Traceback" not in text and (out / "latest.json").read_bytes() == content
    # What went wrong outlives the run: its result.json and trainer.log in the run's folder,
    # without a manifest.json (the run is not finished: a retry trains).
    (run_dir,) = (out / "runs").iterdir()
    stored = TrainerResult.model_validate_json((run_dir / "result.json").read_text())
    assert (stored.outcome, stored.exit_code) == ("Failed", ExitCode.INVALID_SPEC)
    assert "is not a promotion record" in stored.message
    assert "is not a promotion record" in (run_dir / "trainer.log").read_text()
    assert not (run_dir / "manifest.json").exists()
