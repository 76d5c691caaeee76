"""Every method trains the tiny model on the toy task: eval loss drops, and lora, qlora and full
beat the base model on exactMatch. Artifacts land where the design says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import ExitCode
from tests.trainer.conftest import config_for, job_manifest, run_job

METHODS = ["lora", "qlora", "dora", "ia3", "prefix", "prompt", "full"]


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_eval_loss_drops(
    method: str, tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), method)
    result, recorder = run_job(doc, tmp_path / "work")

    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    assert result.steps == 60
    tuned, base = result.metrics.tuned, result.metrics.base
    assert tuned.loss < base.loss - 1.0, (tuned.loss, base.loss)
    assert recorder.eval_losses and recorder.eval_losses[-1] < recorder.eval_losses[0] + 1e-6
    if method in ("lora", "qlora", "full"):
        assert tuned.exact_match > base.exact_match + 0.3, (tuned.exact_match, base.exact_match)

    run_dir = out / "runs" / "0123abcd"
    model_dir = "merged" if method == "full" else "adapter"
    expected = {
        "metrics.json",
        "result.json",
        "eval_samples.jsonl",
        "report.md",
        "loss.png",
        "manifest.json",
    }
    assert expected <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / model_dir).is_dir()
    assert json.loads((out / "latest.json").read_text())["runId"] == "0123abcd"
    assert [s for s in recorder.stages] == [
        "model",
        "data",
        "baseline",
        "train",
        "evaluate",
        "export",
        "done",
    ]
    # Tokens: the trainer's running count grows every step and the result has the last; the
    # report's Usage section says it and what the attempt took.
    tokens = [s.tokens for s in recorder.steps]
    assert all(t is not None and t > 0 for t in tokens) and tokens == sorted(set(tokens))
    assert result.tokens == tokens[-1]
    # Every step's 16 examples hold at least two real tokens each (a prompt's and the answer's
    # end) and at most the longest sequence's worth.
    max_len = config_for(doc).spec.dataset.max_seq_length
    assert 16 * 2 * result.steps <= result.tokens <= 16 * max_len * result.steps
    report = (run_dir / "report.md").read_text()
    usage = report.split("## Usage", 1)[1].split("##", 1)[0]
    assert f"tokens trained: {result.tokens:,}" in usage
    assert "- time: training" in usage and "this attempt until this report" in usage
    assert "no GPU: CPU time of this process" in usage  # this machine has no GPU
