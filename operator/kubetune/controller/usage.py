"""status.usage: what a run used, for chargeback. Pure: the run's pods and the ledger kept on its
status in, the new ledger and its totals out.

Each trainer pod of the run counts from when its trainer container started until it ended: its
terminated state's finishedAt, or, for a pod that was deleted before a terminated state was seen
(a forced deletion), the time the operator found it gone. Times the GPUs the trainer container
holds (its limit of the run's GPU resource) and the CPU it requested (cores). Scheduling, image
pulls and init containers are not counted: the trainer's own run time is what a retry or a
preemption repeats.

The ledger (`usage.pods`) lives on the status because pods do not: a suspension, Kueue's
preemption, a spec change and the Job's TTL delete them, and each attempt has to stay counted.
Only the operator writes status (the status subresource: a tenant with `edit` cannot), and only
pods controlled by the run's Job are read, so a tenant can neither erase nor forge a line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.api import EarlierUsage, PodUsage, Pricing, Usage
from kubetune.api.status import MAX_USAGE_PODS
from kubetune.api.types import parse_quantity


@dataclass(frozen=True)
class PodRun:
    """One pod's trainer container run, as its pod says it."""

    name: str
    gpus: int
    cpu: float
    started_at: datetime
    finished_at: datetime | None = None


def pod_run(
    pod: dict[str, Any],
    container: str,
    gpu_resource: str,
    started: datetime | None,
    finished: datetime | None,
) -> PodRun | None:
    """The trainer container's run in this pod, None before it started. started, finished: its
    state's startedAt and finishedAt (observe.py reads the container state); the GPUs and CPU
    are the container's resources."""
    if started is None:
        return None
    spec = next(
        (c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == container),
        {},
    )
    resources = spec.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    gpus = limits.get(gpu_resource) or requests.get(gpu_resource) or 0
    cpu = requests.get("cpu") or limits.get("cpu") or 0
    return PodRun(
        name=pod["metadata"]["name"],
        gpus=int(parse_quantity(gpus)),
        cpu=float(parse_quantity(cpu)),
        started_at=started,
        finished_at=finished,
    )


def _seconds(pod: PodUsage, as_of: datetime) -> float:
    end = pod.finished_at or as_of
    return max(0.0, (end - pod.started_at).total_seconds())


def _order(pod: PodUsage | PodRun) -> tuple[datetime, str]:
    return pod.started_at, pod.name


def ledger(
    kept: list[PodUsage], runs: tuple[PodRun, ...], now: datetime, earlier: EarlierUsage | None
) -> tuple[list[PodUsage], list[PodUsage]]:
    """(the run's pods, the oldest finished ones to sum up instead: those beyond
    MAX_USAGE_PODS). A pod seen for the first time is added, unless `earlier` already counted
    it; a pod's end is taken from its terminated state; a pod of the ledger that is gone without
    one ended when it was found gone (now)."""
    seen = {run.name: run for run in runs}
    pods: list[PodUsage] = []
    for pod in kept:
        run = seen.pop(pod.name, None)
        if pod.finished_at is None:
            end = run.finished_at if run is not None else max(now, pod.started_at)
            pod = pod.model_copy(update={"finished_at": end})
        pods.append(pod)
    summed = (earlier.last_started_at, earlier.last_pod) if earlier else None
    for run in seen.values():
        if summed is not None and _order(run) <= summed:
            continue  # counted in earlier (its pod outlived the summing: a Job keeps failed pods)
        pods.append(
            PodUsage(
                name=run.name,
                gpus=run.gpus,
                cpu=run.cpu,
                started_at=run.started_at,
                finished_at=run.finished_at,
            )
        )
    pods.sort(key=_order)
    over = len(pods) - MAX_USAGE_PODS
    if over <= 0:
        return pods, []
    # The oldest finished pods (a running pod is never summed: its time still grows; it stays
    # listed, so that a pod ahead of it in the order can be summed meanwhile).
    folded = [pod for pod in pods if pod.finished_at is not None][:over]
    names = {pod.name for pod in folded}
    return [pod for pod in pods if pod.name not in names], folded


def account(
    kept: Usage | None,
    runs: tuple[PodRun, ...],
    *,
    now: datetime,
    refresh: bool,
    tokens: int | None,
    started: datetime | None,
    ended: datetime | None,
    pricing: Pricing | None,
) -> Usage | None:
    """The run's usage. refresh: count the running pods up to now (the caller does when the
    status is written anyway, so that usage alone never causes a write); otherwise up to the
    kept asOf. None for a run no trainer of which has started."""
    kept = kept or Usage()
    now = now.replace(microsecond=0)  # the precision of the pods' own times
    pods, folded = ledger(kept.pods, runs, now, kept.earlier)
    if not pods and kept.earlier is None:
        return None
    running = any(p.finished_at is None for p in pods)
    as_of = now if refresh or kept.as_of is None else kept.as_of
    if not running:
        as_of = max((p.finished_at for p in pods if p.finished_at), default=as_of)
    earlier = kept.earlier
    if folded:
        last = max(_order(pod) for pod in folded)
        if earlier is not None:
            last = max(last, (earlier.last_started_at, earlier.last_pod))
        earlier = EarlierUsage(
            pods=(earlier.pods if earlier else 0) + len(folded),
            gpu_seconds=(earlier.gpu_seconds if earlier else 0)
            + sum(p.gpus * _seconds(p, as_of) for p in folded),
            cpu_seconds=(earlier.cpu_seconds if earlier else 0)
            + sum(p.cpu * _seconds(p, as_of) for p in folded),
            last_started_at=last[0],
            last_pod=last[1],
        )
    gpu = sum(p.gpus * _seconds(p, as_of) for p in pods) + (earlier.gpu_seconds if earlier else 0)
    cpu = sum(p.cpu * _seconds(p, as_of) for p in pods) + (earlier.cpu_seconds if earlier else 0)
    end = ended or as_of
    return Usage(
        gpu_seconds=round(gpu, 3),
        cpu_seconds=round(cpu, 3),
        tokens=tokens if tokens is not None else kept.tokens,
        wall_seconds=round(max(0.0, (end - started).total_seconds()), 3) if started else None,
        estimated_cost=pricing.cost(gpu, cpu) if pricing else None,
        currency=pricing.currency if pricing else None,
        as_of=as_of,
        pods=pods,
        earlier=earlier,
    )


def added(before: Usage | None, after: Usage | None) -> tuple[float, float, int, float]:
    """(GPU-seconds, CPU-seconds, tokens, cost) that after adds to before: what the operator's
    counters grow by when it writes after over before. Never negative: a pod counted as running
    until the operator saw it end may have ended a moment earlier (its finishedAt), which lowers
    the status's total by that moment and leaves the counter that far ahead."""
    b, a = before or Usage(), after or Usage()
    return (
        max(0.0, a.gpu_seconds - b.gpu_seconds),
        max(0.0, a.cpu_seconds - b.cpu_seconds),
        max(0, (a.tokens or 0) - (b.tokens or 0)),
        max(0.0, (a.estimated_cost or 0) - (b.estimated_cost or 0)),
    )
