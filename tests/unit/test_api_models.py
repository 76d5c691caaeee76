"""The API types themselves: conventions, defaults per method, the operator-trainer contract."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

import kubetune.api as api
from kubetune.api import (
    MAX_NAME_LENGTH,
    TERMINATION_MESSAGE_LIMIT,
    Artifacts,
    EvalMetrics,
    ExitCode,
    FineTuneJob,
    GateResult,
    MetricsStatus,
    TrainerConfig,
    TrainerResult,
    child_name,
    make_run_id,
    resolve_spec,
    run_prefix,
)
from tests.conftest import valid_job

MODELS = sorted(
    (obj for obj in vars(api).values() if isinstance(obj, type) and issubclass(obj, BaseModel)),
    key=lambda cls: cls.__name__,
)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not field.description]
    assert missing == []


@pytest.mark.parametrize(
    "model", [m for m in MODELS if m is not api.ObjectMeta], ids=lambda m: m.__name__
)
def test_unknown_fields_are_forbidden(model: type[BaseModel]) -> None:
    assert model.model_config.get("extra") == "forbid"


def test_field_names_are_camel_case() -> None:
    job = FineTuneJob.model_validate(valid_job())
    dumped = json.dumps(job.model_dump(mode="json"))
    for snake in (
        "learning_rate",
        "batch_size",
        "compare_with_base",
        "merge_adapter",
        "gpu_resource_name",
    ):
        assert snake not in dumped


def test_run_id_is_stable_and_child_names_fit() -> None:
    run_id = make_run_id("0b6a3c1e-uid", 3)
    assert run_id == make_run_id("0b6a3c1e-uid", 3)
    assert run_id != make_run_id("0b6a3c1e-uid", 4)
    assert len(run_id) == api.RUN_ID_LENGTH and int(run_id, 16) >= 0
    assert len(child_name("x" * MAX_NAME_LENGTH, run_id)) == 63
    assert run_prefix("s3://models/sql/", run_id) == f"s3://models/sql/runs/{run_id}"


@pytest.mark.parametrize(
    ("method", "learning_rate", "checkpointing"),
    [
        pytest.param("lora", 2e-4, False, id="lora"),
        pytest.param("qlora", 2e-4, True, id="qlora"),
        pytest.param("dora", 2e-4, False, id="dora"),
        pytest.param("ia3", 3e-3, False, id="ia3"),
        pytest.param("prefix", 1e-2, False, id="prefix"),
        pytest.param("prompt", 3e-2, False, id="prompt"),
        pytest.param("full", 2e-5, True, id="full"),
    ],
)
def test_resolve_fills_per_method_defaults(
    method: str, learning_rate: float, checkpointing: bool
) -> None:
    job = valid_job()
    job["spec"]["method"] = {"type": method}
    job["spec"]["hyperparameters"] = {"batchSize": 16}
    spec = resolve_spec(FineTuneJob.model_validate(job).spec)
    hp = spec.hyperparameters
    assert hp.learning_rate == learning_rate
    assert hp.epochs == 3 and hp.max_steps is None
    assert hp.micro_batch_size == 16
    assert hp.gradient_checkpointing is checkpointing
    assert (spec.method.lora is not None) == (method in ("lora", "qlora", "dora"))
    assert (spec.method.quantization is not None) == (method == "qlora")
    assert (spec.method.virtual_tokens == 20) == (method in ("prefix", "prompt"))


def test_resolve_keeps_what_the_user_set() -> None:
    job = valid_job()
    job["spec"]["hyperparameters"] = {
        "maxSteps": 10,
        "learningRate": 1e-3,
        "gradientCheckpointing": True,
    }
    hp = resolve_spec(FineTuneJob.model_validate(job).spec).hyperparameters
    assert (hp.max_steps, hp.epochs, hp.learning_rate, hp.gradient_checkpointing) == (
        10,
        None,
        1e-3,
        True,
    )


def test_trainer_config_round_trips_as_json() -> None:
    job = valid_job()
    job["metadata"]["uid"] = "uid-1"
    parsed = FineTuneJob.model_validate(job)
    config = TrainerConfig.for_job(
        parsed, make_run_id("uid-1", 1), termination_message_path="/dev/termination-log"
    )
    text = config.model_dump_json()
    again = TrainerConfig.model_validate_json(text)
    assert again == config
    assert again.output_prefix.startswith("s3://models/sql/runs/")
    assert json.loads(text)["spec"]["hyperparameters"]["learningRate"] == 2e-4


def _worst_case_result(**overrides: Any) -> TrainerResult:
    metrics = EvalMetrics(
        loss=1.234567891,
        perplexity=3.4567891,
        rouge_l=0.123456789,
        bleu=12.3456789,
        exact_match=0.987654321,
    )
    long_uri = "s3://" + "b" * 60 + "/" + "p" * 960
    fields: dict[str, Any] = {
        "run_id": "0123abcd",
        "outcome": "GatesFailed",
        "exit_code": ExitCode.GATES_FAILED,
        "message": "gate exactMatch >= 0.9 failed: 0.41 " * 200,
        "steps": 123456,
        "epochs": 3.0,
        "train_seconds": 12345.678,
        "metrics": MetricsStatus(tuned=metrics, base=metrics),
        "gates": [
            GateResult(
                metric="perplexity",
                bound="minImprovement",
                threshold=0.123456789,
                value=-0.123456789,
                passed=False,
            )
        ]
        * 16,
        "artifacts": Artifacts(
            adapter_uri=long_uri + "/adapter/",
            merged_uri=long_uri + "/merged/",
            manifest_uri=long_uri + "/manifest.json",
            report_uri=long_uri + "/report.md",
            result_uri=long_uri + "/result.json",
        ),
    }
    fields.update(overrides)
    return TrainerResult(**fields)


def test_termination_message_fits_even_in_the_worst_case() -> None:
    result = _worst_case_result()
    text = result.to_termination_message()
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    back = TrainerResult.model_validate_json(text)
    assert back.truncated is True
    assert back.gates == result.gates
    assert back.metrics == result.metrics
    assert (
        back.artifacts is not None and back.artifacts.manifest_uri == result.artifacts.manifest_uri
    )


def test_termination_message_is_whole_when_it_fits() -> None:
    result = _worst_case_result(
        message="trained 40 steps; all gates passed",
        artifacts=Artifacts(adapter_uri="s3://m/runs/a/adapter/"),
    )
    back = TrainerResult.model_validate_json(result.to_termination_message())
    assert back == result
    assert back.truncated is False
