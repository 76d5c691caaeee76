"""Reading the cluster into an `Observed`: raw Job and Pod objects and the trainer's metrics text
in, the few facts the decision needs out. Pure: the I/O layer fetches, this module interprets.

What the Job and its pods say, read as Kubernetes means it:
- Since Kubernetes 1.31 the Job controller first adds `SuccessCriteriaMet` (or `FailureTarget`)
  and adds `Complete` (or `Failed`) only once every pod has terminated; the interim condition
  already announces the outcome, so it is read as the outcome.
- `status.active` counts pods that are not terminal, Pending ones included; a run is Running only
  while the trainer container itself runs. A pod that waits says why: the scheduler's
  `PodScheduled=False/Unschedulable`, or the container's waiting reason (ImagePullBackOff,
  CreateContainerConfigError for a missing Secret, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import ExitCode, FineTuneJob, PodPhase, TrainerResult, make_run_id
from kubetune.api.compute import DEFAULT_GPU_RESOURCE
from kubetune.api.types import RUN_ID_LENGTH
from kubetune.api.wire import RUN_LABEL, SPEC_HASH_ANNOTATION
from kubetune.controller.build import COMPLETION_INDEX, CONTAINER, spec_hash
from kubetune.controller.decide import Observed, ObservedJob, Waiting
from kubetune.controller.usage import pod_run
from kubetune.progress import parse_metrics

RUN_ID = re.compile(f"[0-9a-f]{{{RUN_ID_LENGTH}}}")  # what make_run_id makes
# Container waiting reasons that are a normal part of starting, not a problem to report.
STARTING = frozenset({"ContainerCreating", "PodInitializing"})
# ErrImagePull and ImagePullBackOff alternate while a pull keeps failing: one reason for both.
SAME_AS = {"ErrImagePull": "ImagePullBackOff"}


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp (RFC 3339, `...Z`), or None when unset."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _condition(obj: dict[str, Any], *kinds: str) -> dict[str, Any] | None:
    """The first of `kinds` that is True on obj (in the order given)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    for kind in kinds:
        for cond in conditions:
            if cond.get("type") == kind and cond.get("status") == "True":
                return cond
    return None


def observe_job(raw: dict[str, Any]) -> ObservedJob:
    status = raw.get("status") or {}
    failed = _condition(raw, "Failed", "FailureTarget")
    succeeded = _condition(raw, "Complete", "SuccessCriteriaMet")
    finished = failed or succeeded or {}
    return ObservedJob(
        name=raw["metadata"]["name"],
        suspended=bool((raw.get("spec") or {}).get("suspend")),
        active=int(status.get("active") or 0),
        complete=succeeded is not None and failed is None,
        failed_reason=(failed.get("reason") or "Failed") if failed else None,
        failed_message=(failed or {}).get("message") or "",
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(status.get("completionTime"))
        or parse_time(finished.get("lastTransitionTime")),
        deleting=bool((raw.get("metadata") or {}).get("deletionTimestamp")),
    )


def _trainer_status(pod: dict[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            return container
    return {}


def termination_result(pod: dict[str, Any]) -> TrainerResult | None:
    """The TrainerResult in a terminated trainer container's termination message, if any."""
    terminated = (_trainer_status(pod).get("state") or {}).get("terminated") or {}
    message = terminated.get("message")
    if not message:
        return None
    try:
        return TrainerResult.model_validate_json(message)
    except ValidationError:
        return None  # FallbackToLogsOnError: the message is the log tail, not a result


def _finished_at(pod: dict[str, Any]) -> str:
    terminated = (_trainer_status(pod).get("state") or {}).get("terminated") or {}
    return terminated.get("finishedAt") or ""


def _started_at(pod: dict[str, Any]) -> datetime | None:
    state = _trainer_status(pod).get("state") or {}
    for key in ("running", "terminated"):
        started = parse_time((state.get(key) or {}).get("startedAt"))
        if started is not None:
            return started
    return None


def _trainer_running(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running" and "running" in (
        _trainer_status(pod).get("state") or {}
    )


def pod_waiting(pod: dict[str, Any]) -> Waiting | None:
    """Why a Pending pod's trainer does not run, when it is a problem rather than a start-up."""
    status = pod.get("status") or {}
    if status.get("phase", "Pending") != "Pending":
        return None
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            return Waiting("Unschedulable", cond.get("message") or "no node fits the pod")
    waiting = (_trainer_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if not reason or reason in STARTING:
        return None
    return Waiting(SAME_AS.get(reason, reason), waiting.get("message") or "")


def _controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def controlled(children: dict[str, list[dict[str, Any]]], uid: str) -> dict[str, list[Any]]:
    """The children the FineTuneJob with this uid controls, as controller-runtime's
    `metav1.IsControlledBy` decides: Jobs, ConfigMaps and Services whose controller reference
    is the FineTuneJob, and the pods whose controller is one of those Jobs. A tenant writes
    objects in its namespace with any labels; one that merely carries a run's labels is not the
    run's (and is neither trusted nor deleted). A controller reference can be written by a
    tenant too, so a ConfigMap's contents are checked as well (trusted_configmap)."""
    if not uid:
        return {kind: [] for kind in children}
    mine = {
        kind: [obj for obj in objs if _controller_uid(obj) == uid]
        for kind, objs in children.items()
        if kind != "pods"
    }
    jobs = {(j.get("metadata") or {}).get("uid") for j in mine.get("jobs", [])} - {None}
    mine["pods"] = [p for p in children.get("pods", []) if _controller_uid(p) in jobs]
    return mine


def run_configmap(configmaps: Iterable[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    return next(
        (
            c
            for c in configmaps
            if ((c.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL) == run_id
        ),
        None,
    )


def current_run_id(
    job: FineTuneJob, jobs: Iterable[dict[str, Any]], configmaps: Iterable[dict[str, Any]] = ()
) -> str:
    """The run the spec asks for: the run of an existing child built from this same spec (only
    `suspend` changed since), else a new run id for this generation. The ConfigMap counts too: it
    outlives the run's Job (after ttlSecondsAfterFinished, or a suspension under Kueue)."""
    wanted = spec_hash(job)
    for raw in (*jobs, *configmaps):
        meta = raw.get("metadata") or {}
        run_id = (meta.get("labels") or {}).get(RUN_LABEL) or ""
        if (
            RUN_ID.fullmatch(run_id)
            and (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == wanted
        ):
            return run_id
    return make_run_id(job.metadata.uid or "", job.metadata.generation or 0)


def completion_index(pod: dict[str, Any]) -> int | None:
    """The pod's index in an Indexed Job (its node rank); None for a one-pod run's pod."""
    meta = pod.get("metadata") or {}
    value = (meta.get("annotations") or {}).get(COMPLETION_INDEX) or (meta.get("labels") or {}).get(
        COMPLETION_INDEX
    )
    return int(value) if value is not None and str(value).isdigit() else None


def running_pod(pods: Iterable[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    """The run's pod whose trainer container runs now (where its metrics can be read): rank 0's
    pod of a distributed run, the one that serves them."""
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if (
            labels.get(RUN_LABEL) == run_id
            and completion_index(pod) in (None, 0)
            and _trainer_running(pod)
        ):
            return pod
    return None


def _created(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("creationTimestamp") or ""


def pod_groups(pods: list[dict[str, Any]]) -> tuple[int, tuple[PodPhase, ...]]:
    """(starts of the run's trainer, the newest pod of each index). A one-pod run starts once per
    pod; a group of pods starts once per round of pods, so its count is the most pods that any
    one index has had (the Job replaces each failed pod of a group)."""
    by_index: dict[int | None, list[dict[str, Any]]] = {}
    for pod in pods:
        by_index.setdefault(completion_index(pod), []).append(pod)
    starts = max((len(group) for group in by_index.values()), default=0)
    phases = tuple(
        PodPhase(
            index=index or 0,  # the one pod of a run of several processes in one pod
            name=newest["metadata"]["name"],
            phase=(newest.get("status") or {}).get("phase") or "Pending",
        )
        for index, group in sorted(by_index.items(), key=lambda item: item[0] or 0)
        for newest in [max(group, key=lambda p: (_created(p), p["metadata"]["name"]))]
    )
    return starts, phases


def _result_order(pod: dict[str, Any]) -> tuple[bool, str]:
    """Results by what they say: a pod whose processes only lost a peer tells less than the pod
    whose process failed first; then the newest."""
    result = termination_result(pod)
    lost = result is not None and result.exit_code == ExitCode.PEER_LOST
    return (not lost, _finished_at(pod))


def metrics_target(pod: dict[str, Any], default_port: int) -> tuple[str, int] | None:
    """(pod IP, port) of a trainer's metrics: the pod's own `metrics` port, not today's setting."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics" and port.get("containerPort"):
                return ip, int(port["containerPort"])
    return ip, default_port


def observe(
    run_id: str,
    jobs: Iterable[dict[str, Any]],
    configmaps: Iterable[dict[str, Any]],
    pods: Iterable[dict[str, Any]],
    metrics_text: str | None = None,
    now: datetime | None = None,
    services: Iterable[dict[str, Any]] = (),
    gpu_resource: str = DEFAULT_GPU_RESOURCE,
) -> Observed:
    """What exists for one FineTuneJob: its children (by run-id label) and its current pods.
    gpu_resource: the extended resource the run's GPUs are (for status.usage)."""
    jobs, configmaps, services = list(jobs), list(configmaps), list(services)

    def run_of(obj: dict[str, Any]) -> str | None:
        return ((obj.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL)

    current = [j for j in jobs if run_of(j) == run_id]
    stale = (
        tuple(("Job", j["metadata"]["name"]) for j in jobs if run_of(j) != run_id)
        + tuple(("ConfigMap", c["metadata"]["name"]) for c in configmaps if run_of(c) != run_id)
        + tuple(("Service", v["metadata"]["name"]) for v in services if run_of(v) != run_id)
    )
    run_pods = [p for p in pods if run_of(p) == run_id]
    finished = sorted((p for p in run_pods if termination_result(p)), key=_result_order)
    group_starts, phases = pod_groups(run_pods)
    progress, stage = parse_metrics(metrics_text, now) if metrics_text else (None, None)
    starts = [t for t in map(_started_at, run_pods) if t is not None]
    waiting = [w for w in map(pod_waiting, run_pods) if w is not None]
    return Observed(
        job=observe_job(current[0]) if current else None,
        configmap=any(run_of(c) == run_id for c in configmaps),
        service=any(run_of(v) == run_id for v in services),
        stale=stale,
        pods_started=group_starts,
        pods=phases,
        result=termination_result(finished[-1]) if finished else None,
        progress=progress,
        stage=stage,
        trainer_running=any(map(_trainer_running, run_pods)),
        trainer_started=min(starts) if starts else None,
        waiting=waiting[0] if waiting else None,
        pod_runs=tuple(
            run
            for pod in run_pods
            if (
                run := pod_run(
                    pod, CONTAINER, gpu_resource, _started_at(pod), parse_time(_finished_at(pod))
                )
            )
            is not None
        ),
    )
