"""status.usage: GPU- and CPU-seconds of every pod of every attempt, tokens, wall time and the
estimated cost, kept on the status while the pods come and go; and the operator's counters."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import (
    ExitCode,
    FineTuneJobStatus,
    FineTuneProfile,
    PodUsage,
    Pricing,
    ProfileRef,
    TrainerResult,
    Usage,
)
from kubetune.api.status import MAX_USAGE_PODS
from kubetune.controller.finetunejob_controller import reconcile
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.usage import PodRun, account, ledger
from tests.controller.test_reconcile import SETTINGS, FakeKube, ftj

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def stamp(minutes: float) -> str:
    return at(minutes).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(kube: FakeKube, minutes: float, **kwargs: Any) -> list[tuple[str, ...]]:
    start = len(kube.writes)
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=at(minutes), **kwargs)
    return kube.writes[start:]


def the_job(kube: FakeKube) -> dict[str, Any]:
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    return kube.objects["Job", name]


def add_pod(kube: FakeKube, suffix: str, started: float, controlled: bool = True) -> str:
    """A pod of the run's Job, made from its template as the Job controller makes it (the
    resources are the operator's), its trainer running since `started`."""
    job = the_job(kube)
    job["status"] = {"active": 1, "startTime": stamp(0)}
    template = copy.deepcopy(job["spec"]["template"])
    name = f"{job['metadata']['name']}-{suffix}"
    owner = [{"kind": "Job", "uid": job["metadata"]["uid"], "controller": True}]
    kube.objects["Pod", name] = {
        "metadata": {
            "name": name,
            "labels": template["metadata"]["labels"],
            "ownerReferences": owner if controlled else [],
        },
        "spec": template["spec"],
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [
                {"name": "trainer", "state": {"running": {"startedAt": stamp(started)}}}
            ],
        },
    }
    return name


def end_pod(kube: FakeKube, name: str, started: float, finished: float, result: Any = None) -> None:
    pod = kube.objects["Pod", name]
    pod["status"]["phase"] = "Succeeded" if result is not None else "Failed"
    terminated: dict[str, Any] = {
        "exitCode": 0 if result is not None else 1,
        "startedAt": stamp(started),
        "finishedAt": stamp(finished),
    }
    if result is not None:
        terminated["message"] = result.model_dump_json(by_alias=True, exclude_none=True)
    pod["status"]["containerStatuses"][0]["state"] = {"terminated": terminated}


def usage(kube: FakeKube) -> Usage:
    return Usage.model_validate(kube.ftj["status"]["usage"])


def test_usage_counts_every_pod_of_every_attempt_and_nothing_else() -> None:
    kube = FakeKube(ftj(resources={"gpus": 2, "cpu": "4"}))
    run(kube, 0)
    first = add_pod(kube, "a", started=1)
    # A pod carrying the run's labels that the run's Job does not control (a tenant's): its
    # time is nobody's GPU-time of this run.
    add_pod(kube, "forged", started=1, controlled=False)
    run(kube, 5)  # Running: written, so usage is brought up to now
    u = usage(kube)
    assert (u.gpu_seconds, u.cpu_seconds, u.as_of) == (2 * 240, 4 * 240, at(5))
    assert [(p.name, p.gpus, p.cpu) for p in u.pods] == [(first, 2, 4.0)]

    # Nothing else to write: usage alone never writes (it stays as of the last write).
    assert run(kube, 10) == []
    assert usage(kube).as_of == at(5)

    # A progress reading is written, and usage with it.
    text = (
        "kubetune_trainer_step 5\nkubetune_trainer_total_steps 50\nkubetune_trainer_tokens 1000\n"
    )
    assert run(kube, 20, metrics_text=text) == [("status", "None")]
    u = usage(kube)
    assert (u.gpu_seconds, u.tokens, u.as_of) == (2 * 19 * 60, 1000, at(20))

    # The first pod fails at 12:30 and is gone (preempted, say); the Job starts another.
    end_pod(kube, first, started=1, finished=30)
    run(kube, 31)
    del kube.objects["Pod", first]
    second = add_pod(kube, "b", started=40)
    run(kube, 45, metrics_text=text.replace("step 5", "step 6"))
    assert [p.name for p in usage(kube).pods] == [first, second]

    done = TrainerResult(
        run_id=kube.ftj["status"]["runId"],
        outcome="Succeeded",
        exit_code=ExitCode.SUCCEEDED,
        message="promoted",
        tokens=5000,
    )
    end_pod(kube, second, started=40, finished=60, result=done)
    the_job(kube)["status"] = {
        "succeeded": 1,
        "startTime": stamp(0),
        "completionTime": stamp(60),
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    run(kube, 61)
    status = kube.ftj["status"]
    assert status["phase"] == "Succeeded"
    u = usage(kube)
    ran = (30 - 1) * 60 + (60 - 40) * 60  # seconds the two trainers ran
    assert (u.gpu_seconds, u.cpu_seconds, u.tokens) == (2 * ran, 4 * ran, 5000)
    assert u.wall_seconds == 59 * 60  # first trainer start to completion
    assert u.as_of == at(60) and u.estimated_cost is None  # no profile prices it
    # Final: the TTL deletes the Job and its pods; later reconciles change nothing.
    for key in [k for k in kube.objects if k[0] in ("Job", "Pod")]:
        del kube.objects[key]
    assert run(kube, 600) == []
    assert usage(kube) == u


def test_a_pod_deleted_before_its_end_was_seen_counts_until_it_was_found_gone() -> None:
    kube = FakeKube(ftj(resources={"gpus": 1}))
    run(kube, 0)
    pod = add_pod(kube, "a", started=1)
    run(kube, 2)
    del kube.objects["Pod", pod]  # force-deleted: no terminated state ever seen
    run(kube, 11)
    (entry,) = usage(kube).pods
    assert entry.finished_at == at(11)
    assert usage(kube).gpu_seconds == 10 * 60


def test_a_profile_prices_the_usage() -> None:
    kube = FakeKube(ftj(profile="a100", resources={"gpus": 4}))
    kube.profile_objects = [
        FineTuneProfile.model_validate(
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneProfile",
                "metadata": {"name": "a100", "generation": 3},
                "spec": {
                    "resources": {"cpu": "8"},
                    "pricing": {"gpuHour": "2.50", "cpuHour": "0.05", "currency": "EUR"},
                },
            },
            by_name=False,
        )
    ]
    run(kube, 0)
    add_pod(kube, "a", started=0)
    run(kube, 30)
    u = usage(kube)
    # 4 GPUs and 8 cores for half an hour: 2 GPU-hours at 2.50 and 4 core-hours at 0.05.
    assert (u.gpu_seconds, u.cpu_seconds) == (4 * 1800, 8 * 1800)
    assert (u.estimated_cost, u.currency) == (5.2, "EUR")


def test_the_ledger_sums_what_it_cannot_list_and_keeps_the_totals() -> None:
    runs = tuple(
        PodRun(f"p{i:03}", gpus=1, cpu=2, started_at=at(i), finished_at=at(i + 0.5))
        for i in range(MAX_USAGE_PODS + 6)
    )
    u = account(
        None,
        runs,
        now=at(200),
        refresh=True,
        tokens=None,
        started=at(0),
        ended=None,
        pricing=None,
    )
    assert u is not None and len(u.pods) == MAX_USAGE_PODS
    assert u.earlier is not None and u.earlier.pods == 6
    assert u.gpu_seconds == len(runs) * 30 and u.cpu_seconds == len(runs) * 60
    # The pods listed are the newest; counted again, nothing changes (no pod counted twice).
    assert u.pods[0].name == "p006"
    again = account(
        u, runs, now=at(300), refresh=True, tokens=None, started=at(0), ended=None, pricing=None
    )
    assert again is not None and again.gpu_seconds == u.gpu_seconds


def test_a_pod_that_ends_keeps_its_entry_and_a_new_one_is_added() -> None:
    kept = [PodUsage(name="a", gpus=1, started_at=at(0))]
    pods, folded = ledger(
        kept,
        (
            PodRun("a", 1, 0, at(0), at(10)),
            PodRun("b", 1, 0, at(12)),
        ),
        at(15),
        None,
    )
    assert [(p.name, p.finished_at) for p in pods] == [("a", at(10)), ("b", None)]
    assert folded == []


def test_pricing_is_a_decimal_per_hour() -> None:
    assert Pricing(gpu_hour="2.5").cost(3600 * 2, 0) == 5.0
    assert Pricing(gpu_hour="2.5", cpu_hour="0.1").cost(0, 36_000) == 1.0


def _counter(metrics: OperatorMetrics, name: str) -> dict[tuple[str, ...], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        tuple(s.labels[k] for k in ("namespace", "profile", "currency") if k in s.labels): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_the_counters_grow_by_what_each_written_status_adds() -> None:
    metrics = OperatorMetrics()
    pool = ProfileRef(name="pool", generation=1)

    def status(run_id: str, gpu: float, tokens: int, cost: float) -> FineTuneJobStatus:
        return FineTuneJobStatus(
            run_id=run_id,
            phase="Running",
            profile=pool,
            usage=Usage(gpu_seconds=gpu, tokens=tokens, estimated_cost=cost, currency="USD"),
        )

    empty = FineTuneJobStatus(run_id="r1")
    metrics.observe("ml", "a", empty, status("r1", 100, 10, 1.0), written=True)
    metrics.observe("ml", "a", status("r1", 100, 10, 1.0), status("r1", 160, 30, 1.5), True)
    # Not written (a conflict): nothing counted; the next write counts it from the stored one.
    metrics.observe("ml", "a", status("r1", 160, 30, 1.5), status("r1", 200, 40, 2.0), False)
    # An operator restarted meanwhile starts from the stored status: what its write adds.
    fresh = OperatorMetrics()
    fresh.observe("ml", "a", status("r1", 160, 30, 1.5), status("r1", 220, 50, 2.0), True)
    # A new run of the same job counts from zero.
    metrics.observe("ml", "a", status("r1", 160, 30, 1.5), status("r2", 50, 5, 0.5), True)
    gpu = _counter(metrics, "kubetune_operator_usage_gpu_seconds_total")
    assert gpu == {("ml", "pool"): 100 + 60 + 50}
    assert _counter(metrics, "kubetune_operator_usage_tokens_total") == {("ml", "pool"): 35}
    cost = _counter(metrics, "kubetune_operator_usage_estimated_cost_total")
    assert cost == {("ml", "pool", "USD"): 2.0}
    assert _counter(fresh, "kubetune_operator_usage_gpu_seconds_total") == {("ml", "pool"): 60}


def test_a_long_running_pod_stays_listed_while_newer_finished_ones_are_summed() -> None:
    runs = (
        PodRun("old", gpus=1, cpu=0, started_at=at(-5)),
        *(
            PodRun(f"p{i:03}", gpus=1, cpu=0, started_at=at(i), finished_at=at(i + 0.5))
            for i in range(MAX_USAGE_PODS + 10)
        ),
    )
    u = None
    for _ in range(3):  # the same pods, counted again and again: the totals hold
        u = account(
            u,
            runs,
            now=at(300),
            refresh=True,
            tokens=None,
            started=at(-5),
            ended=None,
            pricing=None,
        )
        assert u is not None and len(u.pods) == MAX_USAGE_PODS
        assert u.pods[0].name == "old" and u.pods[0].finished_at is None
        assert u.earlier is not None and u.earlier.pods == 11
        assert u.gpu_seconds == 305 * 60 + (MAX_USAGE_PODS + 10) * 30
