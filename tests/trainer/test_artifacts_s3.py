"""Artifacts in a real S3 server (SeaweedFS, auth on): checksums match, the adapter reloads with
stock peft and answers as the trainer's own evaluation did; failed gates promote nothing."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from kubetune.api import ExitCode, TrainerResult
from kubetune_trainer import storage
from tests.support.s3 import S3Server
from tests.trainer.conftest import job_manifest, run_job


def test_artifacts_in_s3_match_manifest_and_adapter_reloads(
    s3_env: S3Server, tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = "s3://models/reviews"
    gates = [{"metric": "exactMatch", "min": 0.6}, {"metric": "loss", "minImprovement": 1.0}]
    doc = job_manifest(tiny_model, task_file, out, "lora", gates=gates, output__mergeAdapter=True)
    result, _ = run_job(doc, tmp_path / "work", run_id="5eed0001")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    assert result.promoted and all(g.passed for g in result.gates)

    run = f"{out}/runs/5eed0001"
    manifest = json.loads(storage.read_bytes(f"{run}/manifest.json"))
    stored = set(storage.list_keys(run)) - {"manifest.json", "baseline.json"}
    stored = {k for k in stored if not k.startswith("checkpoints/")}
    assert {f["path"] for f in manifest["files"]} == stored
    for entry in manifest["files"]:
        blob = storage.read_bytes(f"{run}/{entry['path']}")
        assert len(blob) == entry["size"]
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"], entry["path"]
    assert {
        "adapter/adapter_config.json",
        "merged/config.json",
        "result.json",
        "report.md",
        "loss.png",
        "trainer.log",
    } <= stored
    # the trainer's log survives its pod, up to the upload
    trainer_log = storage.read_bytes(f"{run}/trainer.log").decode()
    assert "Gate passed" in trainer_log
    # every step's line: step, loss, learning rate, throughput
    assert re.search(r"Step 1/\d+ loss=\d+\.\d{4} lr=\S+ tokens/s=\d+", trainer_log), trainer_log
    written = json.loads(storage.read_bytes(f"{run}/result.json"))
    assert written["tokensPerSecond"] > 0 and written["tokens"] > 0

    # The adapter is portable: its config names the base model as the spec did (not the pod's
    # cache), and its README.md is the run's model card.
    adapter_config = json.loads(storage.read_bytes(f"{run}/adapter/adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == doc["spec"]["model"]["uri"]
    card = storage.read_bytes(f"{run}/report.md").decode()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == doc["spec"]["model"]["uri"] and meta["library_name"] == "peft"
    (index,) = meta["model-index"]
    scored = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert scored["exact_match"] == pytest.approx(result.metrics.tuned.exact_match)
    readme = storage.read_bytes(f"{run}/adapter/README.md").decode()
    assert readme.startswith("---\n") and "](../loss.png)" in readme
    for section in ("## Method", "## Data", "## Evaluation", "## Gates", "## Environment",
                    "## Limitations", "LoRA: r ", "torch ", "hardware: "):  # fmt: skip
        assert section in body, section
    sha = hashlib.sha256(task_file.read_bytes()).hexdigest()
    assert f"sha256 `{sha}`" in body
    # the loss improvement gate: the report shows the improvement and both values
    assert "improvement over the base" in body
    data = json.loads(storage.read_bytes(f"{run}/metrics.json"))["data"]
    assert data["sha256"] == sha and data["leakage"]["test"] == data["test"]
    # a classification task: answers repeat by nature, prompts do not (the task file has no
    # duplicate reviews), so no warning
    assert data["leakage"]["promptsInTrain"] == 0 and result.warnings == []

    latest = json.loads(storage.read_bytes(f"{out}/latest.json"))
    assert latest["runId"] == "5eed0001" and latest["adapterUri"] == f"{run}/adapter/"
    assert TrainerResult.model_validate_json(storage.read_bytes(f"{run}/result.json")) == result

    # Stock peft, from what is in S3: the same answers as the trainer's own tuned evaluation.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = storage.download(f"{run}/adapter", tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), adapter
    ).eval()
    samples = [
        json.loads(line)
        for line in storage.read_bytes(f"{run}/eval_samples.jsonl").decode().splitlines()
    ]
    tokenizer.padding_side = "left"
    for sample in samples[:8]:
        ids = tokenizer(sample["prompt"], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(
                **ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(
            gen[0][ids["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        assert answer == sample["tuned"]
    # each sample carries its own scores; their mean is the test-set score
    per_sample = [s["scores"]["tuned"]["exactMatch"] for s in samples]
    assert set(per_sample) <= {0.0, 1.0}
    assert sum(per_sample) / len(per_sample) == pytest.approx(result.metrics.tuned.exact_match)
    tuned_right = sum(s["tuned"] == s["reference"] for s in samples)
    base_right = sum(s["base"] == s["reference"] for s in samples)
    assert tuned_right > base_right


def test_failed_gates_promote_nothing(
    s3_env: S3Server, tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = "s3://models/strict"
    gates = [{"metric": "loss", "max": 0.0001}, {"metric": "exactMatch", "minImprovement": 0.1}]
    doc = job_manifest(tiny_model, task_file, out, "lora", gates=gates, output__mergeAdapter=True)
    result, _ = run_job(doc, tmp_path / "work", run_id="5eed0002")

    assert result.exit_code == ExitCode.GATES_FAILED
    assert result.outcome == "GatesFailed" and not result.promoted
    failed = [g for g in result.gates if not g.passed]
    assert [g.metric for g in failed] == ["loss"]
    assert "gates failed: loss <= 0.0001:" in result.message and "failed by" in result.message
    assert not storage.exists(f"{out}/latest.json")
    keys = storage.list_keys(f"{out}/runs/5eed0002")
    assert "manifest.json" in keys and not any(k.startswith("merged/") for k in keys)
    message = json.loads(result.to_termination_message())
    assert message["outcome"] == "GatesFailed" and message["exitCode"] == 4


def test_wrong_credentials_fail_clearly(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(storage.TrainerError, match=r"cannot write s3://models/x"):
        storage.write_bytes("s3://models/x", b"1")
