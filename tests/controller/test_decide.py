"""The pure reconcile decision, as a table of named situations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api import (
    Artifacts,
    EvalMetrics,
    ExitCode,
    FineTuneJob,
    GateResult,
    MetricsStatus,
    Progress,
    TrainerResult,
    child_name,
    make_run_id,
)
from kubetune.controller.conditions import phase_of
from kubetune.controller.decide import Observed, ObservedJob, decide
from kubetune.controller.settings import OperatorSettings
from tests.conftest import valid_job

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
RUN = make_run_id("uid-1", 1)
NAME = child_name("sql-lora", RUN)


def job(**spec: Any) -> FineTuneJob:
    doc = valid_job()
    doc["metadata"].update(uid="uid-1", generation=1)
    doc["spec"].update(spec)
    return FineTuneJob.model_validate(doc)


def result(code: ExitCode, message: str = "") -> TrainerResult:
    passed = code == ExitCode.SUCCEEDED
    return TrainerResult(
        run_id=RUN,
        outcome={0: "Succeeded", 4: "GatesFailed"}.get(int(code), "Failed"),
        exit_code=code,
        message=message,
        metrics=MetricsStatus(
            tuned=EvalMetrics(exact_match=0.8 if passed else 0.3), base=EvalMetrics(exact_match=0.0)
        ),
        gates=[
            GateResult(
                metric="exactMatch",
                bound="min",
                threshold=0.5,
                value=0.8 if passed else 0.3,
                passed=passed,
            )
        ],
        artifacts=Artifacts(adapter_uri=f"s3://models/sql/runs/{RUN}/adapter/"),
    )


# fmt: off
CASES = [
    pytest.param(job(), Observed(), "Pending", ["ConfigMap", "Job"], id="new-job-creates-children"),
    pytest.param(job(queueName="team"), Observed(), "Queued", ["ConfigMap", "Job"], id="queued-job-creates-children"),
    pytest.param(job(queueName="team"), Observed(job=ObservedJob(NAME, suspended=True), configmap=True), "Queued", [], id="waiting-for-kueue"),
    pytest.param(job(), Observed(job=ObservedJob(NAME), configmap=True), "Pending", [], id="pod-not-started"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="train"), "Running", [], id="training"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="baseline"), "Running", [], id="baseline-shows-as-running"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="evaluate"), "Evaluating", [], id="evaluating"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, complete=True), configmap=True, result=result(ExitCode.SUCCEEDED, "promoted")), "Succeeded", [], id="succeeded"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="PodFailurePolicy"), configmap=True, result=result(ExitCode.GATES_FAILED, "gates failed")), "Failed", [], id="gates-failed"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="PodFailurePolicy"), configmap=True, result=result(ExitCode.DATA_ERROR, "line 3: invalid JSON")), "Failed", [], id="data-error"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="BackoffLimitExceeded", failed_message="Job has reached the specified backoff limit"), configmap=True), "Failed", [], id="backoff-limit"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="DeadlineExceeded"), configmap=True), "Failed", [], id="deadline"),
    pytest.param(job(suspend=True), Observed(job=ObservedJob(NAME, suspended=True), configmap=True), "Suspended", [], id="suspended"),
    pytest.param(job(), Observed(configmap=True), "Pending", ["Job"], id="job-lost-is-recreated"),
]
# fmt: on


@pytest.mark.parametrize(("ftj", "observed", "phase", "creates"), CASES)
def test_decision(ftj: FineTuneJob, observed: Observed, phase: str, creates: list[str]) -> None:
    decision = decide(ftj, observed, SETTINGS, NOW)
    assert decision.status.phase == phase
    assert phase_of(decision.status.conditions) == phase
    assert [m["kind"] for m in decision.create] == creates
    assert decision.status.observed_generation == 1 and decision.status.run_id == RUN
    assert all(c.observed_generation == 1 for c in decision.status.conditions)
    assert decision == decide(ftj, observed, SETTINGS, NOW), "the decision must be deterministic"


def test_failure_reasons_and_messages() -> None:
    observed = Observed(
        job=ObservedJob(NAME, failed_reason="PodFailurePolicy"),
        configmap=True,
        result=result(ExitCode.GATES_FAILED, "gates failed: exactMatch >= 0.5: 0.3"),
    )
    status = decide(job(), observed, SETTINGS, NOW).status
    failed = next(c for c in status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "GatesFailed")
    assert status.message == "gates failed: exactMatch >= 0.5: 0.3"
    assert status.gates_summary == "0/1 passed" and status.metrics.tuned.exact_match == 0.3


def test_success_fills_metrics_gates_and_artifacts() -> None:
    observed = Observed(
        job=ObservedJob(
            NAME, complete=True, start_time=NOW - timedelta(minutes=5), completion_time=NOW
        ),
        configmap=True,
        result=result(ExitCode.SUCCEEDED),
    )
    status = decide(job(), observed, SETTINGS, NOW).status
    assert status.gates_summary == "1/1 passed"
    assert status.artifacts.adapter_uri.endswith("/adapter/")
    assert (status.start_time, status.completion_time) == (NOW - timedelta(minutes=5), NOW)
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "Succeeded")


def test_transition_time_changes_only_when_status_flips() -> None:
    ftj = job()
    first = decide(
        ftj, Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="train"), SETTINGS, NOW
    ).status
    ftj = ftj.model_copy(update={"status": first})
    later = NOW + timedelta(minutes=3)
    second = decide(
        ftj,
        Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="evaluate"),
        SETTINGS,
        later,
    ).status
    running = {c.type: c for c in second.conditions}["Running"]
    assert running.reason == "Evaluating" and running.last_transition_time == NOW
    ftj = ftj.model_copy(update={"status": second})
    done = decide(
        ftj,
        Observed(
            job=ObservedJob(NAME, complete=True), configmap=True, result=result(ExitCode.SUCCEEDED)
        ),
        SETTINGS,
        later,
    ).status
    assert {c.type: c for c in done.conditions}["Running"].last_transition_time == later


def test_events_only_on_transitions() -> None:
    observed = Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="train")
    first = decide(job(), observed, SETTINGS, NOW)
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Running")]
    again = decide(job().model_copy(update={"status": first.status}), observed, SETTINGS, NOW)
    assert again.events == []


def test_progress_is_copied_while_running() -> None:
    progress = Progress(step=40, total_steps=100, percent=40, loss=0.5, updated_at=NOW)
    status = decide(
        job(),
        Observed(job=ObservedJob(NAME, active=1), configmap=True, stage="train", progress=progress),
        SETTINGS,
        NOW,
    ).status
    assert status.progress == progress


def test_spec_suspend_is_applied_to_the_job_and_back() -> None:
    running = Observed(job=ObservedJob(NAME, active=1), configmap=True)
    assert decide(job(suspend=True), running, SETTINGS, NOW).set_suspend is True
    paused = Observed(job=ObservedJob(NAME, suspended=True), configmap=True)
    assert decide(job(), paused, SETTINGS, NOW).set_suspend is False
    assert decide(job(queueName="team"), paused, SETTINGS, NOW).set_suspend is None  # Kueue decides


def test_policy_problem_creates_nothing_and_removes_old_runs() -> None:
    stale = (("Job", "sql-lora-00000000"), ("ConfigMap", "sql-lora-00000000"))
    decision = decide(
        job(),
        Observed(stale=stale),
        SETTINGS,
        NOW,
        problems=["spec.resources.gpus: 9 is more than this cluster allows per job (8)"],
    )
    assert decision.create == [] and decision.delete == list(stale)
    assert decision.status.phase == "Failed"
    ready = next(c for c in decision.status.conditions if c.type == "Ready")
    assert (ready.reason, ready.message) == (
        "InvalidSpec",
        "spec.resources.gpus: 9 is more than this cluster allows per job (8)",
    )
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "InvalidSpec")]
