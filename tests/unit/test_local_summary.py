"""`kubetune run`'s closing summary: the numbers a gate compared, which way they moved."""

from __future__ import annotations

from kubetune.api import (
    EvalMetrics,
    ExitCode,
    FineTuneJob,
    GateResult,
    MetricsStatus,
    RegressionMetrics,
    TrainerResult,
)
from kubetune.console import summary
from tests.conftest import valid_job


def test_the_summary_shows_the_champion_and_the_regression_set_when_gates_use_them() -> None:
    doc = valid_job()
    doc["spec"]["evaluation"] = {"metrics": ["loss"], "regressionUri": "s3://data/general.jsonl"}
    doc["spec"]["gates"] = [
        {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"},
        {"metric": "loss", "maxRegression": 0.5, "evalSet": "regression"},
    ]
    job = FineTuneJob.model_validate(doc)
    result = TrainerResult(
        run_id="5eed0002",
        outcome="Succeeded",
        exit_code=ExitCode.SUCCEEDED,
        message="promoted",
        metrics=MetricsStatus(
            tuned=EvalMetrics(loss=1.625),
            base=EvalMetrics(loss=3.28),
            promoted=EvalMetrics(loss=1.7),
            promoted_run_id="5eed0001",
            regression=RegressionMetrics(
                tuned=EvalMetrics(loss=1.625), base=EvalMetrics(loss=3.28)
            ),
        ),
        gates=[
            GateResult(metric="loss", bound="minImprovement", threshold=0.0, value=0.075,
                       passed=True, compared_with="promoted 5eed0001"),
            GateResult(metric="loss", bound="maxRegression", threshold=0.5, value=1.655,
                       passed=True, compared_with="base", eval_set="regression"),
        ],
    )  # fmt: skip
    lines = summary(job, result).splitlines()
    header = next(line for line in lines if line.strip().startswith("metric"))
    assert header.split() == ["metric", "base", "promoted", "5eed0001", "tuned"]
    rows = {
        row.split()[0] + (" R" if "regression set" in row else ""): row
        for row in lines
        if row.strip()
    }
    assert rows["loss"].split()[1:] == ["3.2800", "1.7000", "1.6250"]
    assert rows["loss R"].split()[-3:] == ["3.2800", "-", "1.6250"]
    gate = next(line for line in lines if "regression set regresses by" in line)
    assert gate.strip() == (
        "PASS  loss on the regression set regresses by <= 0.5 vs base: improved by 1.655 (passed)"
    )


def test_without_a_champion_the_table_has_base_and_tuned() -> None:
    job = FineTuneJob.model_validate(valid_job())
    result = TrainerResult(
        run_id="5eed0003", outcome="Succeeded", exit_code=ExitCode.SUCCEEDED, message="promoted",
        metrics=MetricsStatus(tuned=EvalMetrics(loss=1.0, exact_match=0.6),
                              base=EvalMetrics(loss=2.0, exact_match=0.1)),
    )  # fmt: skip
    header = next(line for line in summary(job, result).splitlines() if "metric" in line)
    assert header.split() == ["metric", "base", "tuned"]
