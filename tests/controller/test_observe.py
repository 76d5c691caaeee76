"""Reading Jobs, Pods and trainer metrics into an Observed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest

from kubetune.api import ExitCode, TrainerResult, make_run_id
from kubetune.controller.build import build_configmap, build_job
from kubetune.controller.decide import decide
from kubetune.controller.observe import observe
from kubetune.controller.settings import OperatorSettings
from kubetune.progress import parse_metrics
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
            tokens=48_000,
        )
    )
    progress, stage = parse_metrics(generate_latest(metrics.registry).decode(), NOW)
    assert stage == "train"
    assert progress.tokens == 48_000  # the trainer's gauge, read by name
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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("<html>not metrics</html>\n{", None, id="not-prometheus-text"),
        pytest.param("kubetune_trainer_step -3\n", None, id="negative-step"),
        pytest.param("kubetune_trainer_step 1e300\n", None, id="step-beyond-int64"),
        pytest.param(
            "kubetune_trainer_step 4\nkubetune_trainer_total_steps -1\n"
            "kubetune_trainer_tokens -10\nkubetune_trainer_tokens_per_second -2\n"
            "kubetune_trainer_epoch -1\nkubetune_trainer_eta_seconds 1e300\n",
            {"step": 4},
            id="impossible-values-left-out",
        ),
    ],
)
def test_what_a_pods_port_answers_never_fails_a_reconcile(
    text: str, expected: dict[str, int] | None
) -> None:
    """Whatever answers on the trainer pod's port (an allowed custom image serves what it
    likes) is read without raising, and nothing the API would refuse reaches the status."""
    progress, _ = parse_metrics(text, NOW)
    if expected is None:
        assert progress is None
    else:
        assert progress is not None
        dumped = progress.model_dump(by_alias=True, exclude_none=True, mode="json")
        assert dumped == {**expected, "updatedAt": "2026-11-22T12:00:00Z"}


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


def _indexed_pod(
    index: int, name: str, created: str, phase: str, message: str | None = None
) -> dict:
    raw = pod(RUN, name, message)
    raw["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    raw["metadata"]["creationTimestamp"] = created
    raw["status"]["phase"] = phase
    return raw


def test_a_group_of_pods_counts_its_rounds_and_shows_each_indexs_newest_pod() -> None:
    ftj = job(resources={"nodes": 2, "gpus": 1})
    lost = TrainerResult(
        run_id=RUN, outcome="Failed", exit_code=ExitCode.PEER_LOST, message="lost", rank=0
    )
    killed = TrainerResult(
        run_id=RUN, outcome="Failed", exit_code=ExitCode.RUNTIME_ERROR, message="oom", rank=1
    )
    pods = [
        # Round 1: index 1 was killed (its own failure), index 0 lost its peer, later.
        _indexed_pod(1, "r-1-a", "2026-11-22T11:00:00Z", "Failed", killed.to_termination_message()),
        _indexed_pod(0, "r-0-a", "2026-11-22T11:00:00Z", "Failed", lost.to_termination_message()),
        # Round 2: both replaced, running.
        _indexed_pod(0, "r-0-b", "2026-11-22T11:05:00Z", "Running"),
        _indexed_pod(1, "r-1-b", "2026-11-22T11:05:00Z", "Running"),
    ]
    pods[1]["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = (
        "2026-11-22T11:59:30Z"  # the peer's failure is the newest, yet not the one reported
    )
    current = with_status(build_job(ftj, RUN, SETTINGS), {"active": 2})
    observed = observe(RUN, [current], [build_configmap(ftj, RUN, SETTINGS)], pods)
    assert observed.pods_started == 2  # two rounds of the group, not four pods
    assert [(p.index, p.name, p.phase) for p in observed.pods] == [
        (0, "r-0-b", "Running"),
        (1, "r-1-b", "Running"),
    ]
    assert observed.result == killed
    status = decide(ftj, observed, SETTINGS, NOW).status
    assert status.attempts == 2
    assert status.distributed is not None
    assert (status.distributed.nodes, status.distributed.world_size) == (2, 2)
    assert status.distributed.strategy == "ddp"
    assert [p.name for p in status.distributed.pods] == ["r-0-b", "r-1-b"]


def test_a_run_of_several_pods_gets_its_service_first_and_loses_it_with_the_run() -> None:
    ftj = job(resources={"nodes": 2, "gpus": 1})
    decision = decide(ftj, observe(RUN, [], [], []), SETTINGS, NOW, run_id=RUN)
    assert [c["kind"] for c in decision.create] == ["ConfigMap", "Service", "Job"]
    service = decision.create[1]
    assert (
        service["metadata"]["name"] == decision.create[2]["spec"]["template"]["spec"]["subdomain"]
    )
    # A new run: the old run's Service is deleted with its other children.
    observed = observe("feedbeef", [], [], [], services=[service])
    assert ("Service", service["metadata"]["name"]) in observed.stale
    # One pod (the default): no Service, and no distributed status.
    single = decide(job(), observe(RUN, [], [], []), SETTINGS, NOW, run_id=RUN)
    assert [c["kind"] for c in single.create] == ["ConfigMap", "Job"]
    assert single.status.distributed is None
