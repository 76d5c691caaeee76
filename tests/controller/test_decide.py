"""The pure reconcile decision, as a table of named situations."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api import (
    PHASES,
    Artifacts,
    EvalMetrics,
    ExitCode,
    FineTuneJob,
    FineTuneJobStatus,
    GateResult,
    MetricsStatus,
    Progress,
    TrainerResult,
    child_name,
    make_run_id,
)
from kubetune.controller.conditions import (
    FAILED_REASONS,
    FORBIDDEN,
    WAITING_REASONS,
    State,
    conditions_for,
    forbidden,
    phase_of,
)
from kubetune.controller.decide import Observed, ObservedJob, Waiting, decide
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
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, pods_started=1), "Pending", [], id="pod-counted-active-but-not-running"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, pods_started=1, waiting=Waiting("Unschedulable", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")), "Pending", [], id="unschedulable-pod"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, stage="train"), "Running", [], id="training"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, stage="baseline"), "Running", [], id="baseline-shows-as-running"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, stage="evaluate"), "Evaluating", [], id="evaluating"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, complete=True), configmap=True), "Succeeded", [], id="success-criteria-met-before-complete"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, complete=True), configmap=True, result=result(ExitCode.SUCCEEDED, "promoted")), "Succeeded", [], id="succeeded"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="PodFailurePolicy"), configmap=True, result=result(ExitCode.GATES_FAILED, "gates failed")), "Failed", [], id="gates-failed"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="PodFailurePolicy"), configmap=True, result=result(ExitCode.DATA_ERROR, "line 3: invalid JSON")), "Failed", [], id="data-error"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="BackoffLimitExceeded", failed_message="Job has reached the specified backoff limit"), configmap=True), "Failed", [], id="backoff-limit"),
    pytest.param(job(), Observed(job=ObservedJob(NAME, failed_reason="DeadlineExceeded"), configmap=True), "Failed", [], id="deadline"),
    pytest.param(job(suspend=True), Observed(job=ObservedJob(NAME, suspended=True), configmap=True), "Suspended", [], id="suspended"),
    pytest.param(job(), Observed(configmap=True), "Pending", ["Job"], id="job-lost-is-recreated"),
    pytest.param(job(), Observed(configmap=True, result=result(ExitCode.SUCCEEDED)), "Succeeded", [], id="job-gone-result-json-says-done"),
    pytest.param(job(), Observed(configmap=True, result=result(ExitCode.RUNTIME_ERROR)), "Pending", ["Job"], id="job-gone-retryable-result-is-recreated"),
    pytest.param(job(queueName="team", suspend=True), Observed(configmap=True), "Suspended", [], id="suspended-in-kueue-has-no-job"),
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
        ftj,
        Observed(job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True),
        SETTINGS,
        NOW,
    ).status
    ftj = ftj.model_copy(update={"status": first})
    later = NOW + timedelta(minutes=3)
    second = decide(
        ftj,
        Observed(
            job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, stage="evaluate"
        ),
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
    observed = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, stage="train"
    )
    first = decide(job(), observed, SETTINGS, NOW)
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Running")]
    again = decide(job().model_copy(update={"status": first.status}), observed, SETTINGS, NOW)
    assert again.events == []


def test_a_finished_runs_warnings_become_warning_events_once() -> None:
    warned = result(ExitCode.SUCCEEDED).model_copy(
        update={"warnings": ["23 of 29 test answers (79%) also occur in the training data"]}
    )
    observed = Observed(job=ObservedJob(NAME, complete=True), configmap=True, result=warned)
    done = decide(job(), observed, SETTINGS, NOW)
    assert [(e.type, e.reason) for e in done.events] == [
        ("Normal", "Succeeded"),
        ("Warning", "TrainerWarning"),
    ]
    assert "23 of 29 test answers" in done.events[1].message
    again = decide(job().model_copy(update={"status": done.status}), observed, SETTINGS, NOW)
    assert again.events == []


def test_progress_is_copied_while_running() -> None:
    progress = Progress(step=40, total_steps=100, percent=40, loss=0.5, updated_at=NOW)
    status = decide(
        job(),
        Observed(
            job=ObservedJob(NAME, active=1),
            configmap=True,
            trainer_running=True,
            stage="train",
            progress=progress,
        ),
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
        refusal=State(
            "PolicyViolation", "spec.resources.gpus: 9 is more than this cluster allows per job (8)"
        ),
    )
    assert decision.create == [] and decision.delete == list(stale)
    assert decision.status.phase == "Failed"
    ready = next(c for c in decision.status.conditions if c.type == "Ready")
    assert (ready.reason, ready.message) == (
        "PolicyViolation",
        "spec.resources.gpus: 9 is more than this cluster allows per job (8)",
    )
    assert [(e.type, e.reason) for e in decision.events] == [("Warning", "PolicyViolation")]


def with_status(ftj: FineTuneJob, status: FineTuneJobStatus) -> FineTuneJob:
    return ftj.model_copy(update={"status": status})


def test_a_finished_run_whose_job_was_deleted_is_not_run_again() -> None:
    """ttlSecondsAfterFinished deletes the Job (and its pods): the run stays Succeeded."""
    done = Observed(
        job=ObservedJob(NAME, complete=True, completion_time=NOW),
        configmap=True,
        pods_started=1,
        trainer_started=NOW - timedelta(minutes=5),
        result=result(ExitCode.SUCCEEDED, "promoted"),
    )
    finished = decide(job(), done, SETTINGS, NOW).status
    gone = decide(with_status(job(), finished), Observed(configmap=True), SETTINGS, NOW)
    assert gone.create == [] and gone.events == []
    assert gone.status == finished  # metrics, gates, artifacts and times kept
    # ...also when nothing at all is left (the ConfigMap gone too) and after a restart.
    assert decide(with_status(job(), finished), Observed(), SETTINGS, NOW).create == []


def test_a_refusal_does_not_stop_a_run_that_has_its_job() -> None:
    """A policy that changed under a running run: it finishes under the policy it started with."""
    running = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, pods_started=1
    )
    refusal = State("PolicyViolation", "spec.resources.gpus: 2 is more than allowed (1)")
    decision = decide(job(), running, SETTINGS, NOW, refusal=refusal)
    assert decision.status.phase == "Running" and decision.delete == []


def test_suspending_a_queued_run_gives_its_job_back() -> None:
    admitted = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, pods_started=1
    )
    decision = decide(job(queueName="team", suspend=True), admitted, SETTINGS, NOW)
    assert decision.delete == [("Job", NAME)] and decision.set_suspend is None
    assert decision.status.phase == "Suspended"
    resumed = decide(job(queueName="team"), Observed(configmap=True), SETTINGS, NOW)
    assert [m["kind"] for m in resumed.create] == ["Job"] and resumed.status.phase == "Queued"


def test_progress_is_written_only_when_it_changed() -> None:
    running = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, trainer_running=True, pods_started=1
    )
    reading = Progress(step=40, total_steps=100, percent=40, loss=0.5, updated_at=NOW)
    first = decide(job(), replace(running, progress=reading), SETTINGS, NOW).status
    later = reading.model_copy(update={"updated_at": NOW + timedelta(seconds=15)})
    again = decide(with_status(job(), first), replace(running, progress=later), SETTINGS, NOW)
    assert again.status == first  # same step, only a newer updatedAt: nothing to write
    moved = later.model_copy(update={"step": 41})
    third = decide(with_status(job(), first), replace(running, progress=moved), SETTINGS, NOW)
    assert third.status.progress == moved


def test_a_missing_credentials_secret_is_named_with_the_fix() -> None:
    waiting = Waiting("CreateContainerConfigError", 'secret "s3-credentials" not found')
    observed = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, pods_started=1, waiting=waiting
    )
    ftj = job(output={"uri": "s3://models/sql", "credentialsSecret": "s3-credentials"})
    decision = decide(ftj, observed, SETTINGS, NOW)
    assert decision.status.phase == "Pending"
    ready = next(c for c in decision.status.conditions if c.type == "Ready")
    assert ready.reason == "CreateContainerConfigError"
    assert "create the Secret 's3-credentials' in namespace" in ready.message
    assert "spec.output.credentialsSecret" in ready.message
    assert [(e.type, e.reason) for e in decision.events] == [
        ("Warning", "CreateContainerConfigError")
    ]
    assert decision.status.start_time is None  # the trainer never started


def test_a_missing_tracker_secret_names_its_own_field() -> None:
    waiting = Waiting("CreateContainerConfigError", 'secret "mlflow-auth" not found')
    observed = Observed(
        job=ObservedJob(NAME, active=1), configmap=True, pods_started=1, waiting=waiting
    )
    ftj = job(
        output={"uri": "s3://models/sql", "credentialsSecret": "s3-credentials"},
        tracking={
            "mlflow": {"trackingUri": "http://mlflow:5000", "credentialsSecret": "mlflow-auth"}
        },
    )
    ready = next(
        c for c in decide(ftj, observed, SETTINGS, NOW).status.conditions if c.type == "Ready"
    )
    assert "create the Secret 'mlflow-auth' in namespace" in ready.message
    assert ready.message.endswith("or fix spec.tracking.mlflow.credentialsSecret")


def test_an_operator_error_is_a_condition_not_a_failure() -> None:
    error = State("OperatorForbidden", "create Job: HTTP 403 ... cannot create resource jobs")
    decision = decide(job(), Observed(), SETTINGS, NOW, error=error)
    conditions = {c.type: c for c in decision.status.conditions}
    assert decision.status.phase == "Pending"
    assert (conditions["ReconcileError"].status, conditions["ReconcileError"].reason) == (
        "True",
        "OperatorForbidden",
    )
    assert conditions["Failed"].status == "False"
    cleared = decide(with_status(job(), decision.status), Observed(), SETTINGS, NOW).status
    assert {c.type: c for c in cleared.conditions}["ReconcileError"].status == "False"


# What each phase looks like to the decision, for one run of a queued job (attempt 1).
def _phase_world(phase: str) -> tuple[FineTuneJob, Observed]:
    queued = job(queueName="team")
    running = ObservedJob(NAME, active=1)
    # fmt: off
    worlds = {
        "Pending": (queued, Observed(job=running, configmap=True, pods_started=1)),
        "Queued": (
            queued,
            Observed(job=ObservedJob(NAME, suspended=True), configmap=True, pods_started=1),
        ),
        "Running": (
            queued,
            Observed(job=running, configmap=True, pods_started=1, trainer_running=True),
        ),
        "Evaluating": (
            queued,
            Observed(
                job=running, configmap=True, pods_started=1, trainer_running=True, stage="evaluate"
            ),
        ),
        "Succeeded": (
            queued,
            Observed(
                job=ObservedJob(NAME, complete=True),
                configmap=True,
                pods_started=1,
                result=result(ExitCode.SUCCEEDED),
            ),
        ),
        "Failed": (
            queued,
            Observed(
                job=ObservedJob(NAME, failed_reason="BackoffLimitExceeded"),
                configmap=True,
                pods_started=1,
            ),
        ),
        "Suspended": (
            job(queueName="team", suspend=True),
            Observed(configmap=True, pods_started=1),
        ),
    }
    # fmt: on
    return worlds[phase]


TRANSITIONS = [
    pytest.param(a, b, id=f"{a}-to-{b}-{'forbidden' if b in FORBIDDEN.get(a, ()) else 'allowed'}")
    for a in PHASES
    for b in PHASES
    if a != b
]


@pytest.mark.parametrize(("before", "after"), TRANSITIONS)
def test_phase_transitions_within_one_attempt(before: str, after: str) -> None:
    ftj, observed = _phase_world(before)
    assert decide(ftj, observed, SETTINGS, NOW, run_id=RUN).status.phase == before
    previous = decide(ftj, observed, SETTINGS, NOW, run_id=RUN).status
    ftj, observed = _phase_world(after)
    phase = decide(with_status(ftj, previous), observed, SETTINGS, NOW, run_id=RUN).status.phase
    assert phase == (before if forbidden(before, after, new_attempt=False) else after)


def test_a_new_attempt_may_go_back_to_waiting_and_training() -> None:
    ftj, evaluating = _phase_world("Evaluating")
    previous = decide(ftj, evaluating, SETTINGS, NOW).status
    retried = Observed(job=ObservedJob(NAME, active=1), configmap=True, pods_started=2)
    assert decide(with_status(ftj, previous), retried, SETTINGS, NOW).status.phase == "Pending"
    assert not forbidden("Running", "Pending", new_attempt=True)
    assert forbidden("Succeeded", "Running", new_attempt=True)


def test_the_terminal_window_writes_the_outcome_once() -> None:
    """SuccessCriteriaMet (at T1) and then Complete with completionTime (T2): one status."""
    t1, t2 = NOW, NOW + timedelta(seconds=1)
    interim = Observed(
        job=ObservedJob(NAME, complete=True, completion_time=t1),
        configmap=True,
        pods_started=1,
        result=result(ExitCode.SUCCEEDED),
    )
    first = decide(job(), interim, SETTINGS, NOW)
    assert first.status.phase == "Succeeded" and first.status.completion_time == t1
    complete = replace(interim, job=ObservedJob(NAME, complete=True, completion_time=t2))
    second = decide(with_status(job(), first.status), complete, SETTINGS, t2)
    assert second.status == first.status and second.events == []


@pytest.mark.parametrize(
    "reason",
    sorted(
        FAILED_REASONS
        | WAITING_REASONS
        | {"Succeeded", "Running", "Evaluating", "Queued", "Suspended", "Pending"}
    ),
)
def test_a_states_phase_is_what_its_conditions_read_back(reason: str) -> None:
    """State.phase (no conditions built, no clock read) agrees with phase_of over the
    conditions written for the state."""
    state = State(reason, "m")
    written = conditions_for(state, [], 1, datetime(2026, 1, 1, tzinfo=UTC))
    assert state.phase == phase_of(written)
