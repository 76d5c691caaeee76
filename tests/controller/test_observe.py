"""Reading Jobs, Pods and trainer metrics into an Observed."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import generate_latest

from kubetune.api import ExitCode, TrainerResult, make_run_id
from kubetune.controller.build import build_configmap, build_job
from kubetune.controller.decide import decide
from kubetune.controller.observe import observe, parse_metrics
from kubetune.controller.settings import OperatorSettings
from kubetune_trainer.telemetry import PrometheusReporter, StepInfo, TrainerMetrics
from tests.controller.test_decide import job

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings()
RUN = make_run_id("uid-1", 1)


def pod(
    run_id: str, name: str, message: str | None = None, finished: str = "2026-11-22T11:59:00Z"
) -> dict:
    state = (
        {"terminated": {"exitCode": 4, "message": message, "finishedAt": finished}}
        if message is not None
        else {"running": {}}
    )
    return {
        "metadata": {"name": name, "labels": {"kubetune.dev/run-id": run_id}},
        "status": {"containerStatuses": [{"name": "trainer", "state": state}]},
    }


def with_status(manifest: dict, status: dict) -> dict:
    return {**manifest, "status": status}


def test_metrics_text_becomes_progress_and_stage() -> None:
    metrics = TrainerMetrics()
    reporter = PrometheusReporter(metrics)
    reporter.stage("train")
    reporter.step(
        StepInfo(
            step=40,
            total_steps=160,
            epoch=0.5,
            loss=0.75,
            learning_rate=1e-4,
            tokens_per_second=1200.0,
            eta_seconds=90.4,
        )
    )
    progress, stage = parse_metrics(generate_latest(metrics.registry).decode(), NOW)
    assert stage == "train"
    assert (progress.step, progress.total_steps, progress.percent, progress.epoch) == (
        40,
        160,
        25,
        0.5,
    )
    assert (
        progress.loss,
        progress.tokens_per_second,
        progress.eta_seconds,
        progress.updated_at,
    ) == (0.75, 1200.0, 90, NOW)


def test_metrics_before_training_show_step_zero_without_a_percentage() -> None:
    metrics = TrainerMetrics()
    PrometheusReporter(metrics).stage("data")
    progress, stage = parse_metrics(generate_latest(metrics.registry).decode(), NOW)
    assert stage == "data"
    assert (progress.step, progress.total_steps, progress.percent) == (0, None, None)


def test_children_are_sorted_into_current_and_stale() -> None:
    ftj = job()
    old_job = build_job(ftj, "00000000", SETTINGS)
    old_cm = build_configmap(ftj, "00000000", SETTINGS)
    current = with_status(
        build_job(ftj, RUN, SETTINGS), {"active": 1, "startTime": "2026-11-22T11:00:00Z"}
    )
    observed = observe(
        RUN, [old_job, current], [old_cm, build_configmap(ftj, RUN, SETTINGS)], [pod(RUN, "p1")]
    )
    assert observed.job is not None and observed.job.active == 1
    assert observed.job.start_time == datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    assert observed.configmap and observed.pods_started == 1
    assert set(observed.stale) == {
        ("Job", old_job["metadata"]["name"]),
        ("ConfigMap", old_cm["metadata"]["name"]),
    }


def test_the_newest_termination_message_is_the_result() -> None:
    ftj = job()
    first = TrainerResult(
        run_id=RUN, outcome="Failed", exit_code=ExitCode.RUNTIME_ERROR, message="CUDA out of memory"
    )
    second = TrainerResult(
        run_id=RUN, outcome="GatesFailed", exit_code=ExitCode.GATES_FAILED, message="gates failed"
    )
    failed_job = with_status(
        build_job(ftj, RUN, SETTINGS),
        {
            "failed": 2,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": "exit code 4",
                }
            ],
        },
    )
    pods = [
        pod(RUN, "p2", second.to_termination_message(), "2026-11-22T11:59:00Z"),
        pod(RUN, "p1", first.to_termination_message(), "2026-11-22T11:30:00Z"),
        pod(
            RUN, "p3", "Traceback (most recent call last): ...", "2026-11-22T11:10:00Z"
        ),  # a log tail, not JSON
    ]
    observed = observe(RUN, [failed_job], [], pods)
    assert observed.result == second and observed.pods_started == 3
    assert observed.job.failed_reason == "PodFailurePolicy"
    status = decide(ftj, observed, SETTINGS, NOW).status
    assert (status.phase, status.message, status.attempts) == ("Failed", "gates failed", 3)
