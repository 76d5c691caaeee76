"""Reading the cluster into an `Observed`: raw Job and Pod objects and the trainer's metrics text
in, the few facts the decision needs out. Pure: the I/O layer fetches, this module interprets."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from kubetune.api import FineTuneJob, Progress, TrainerResult, make_run_id
from kubetune.controller.build import CONTAINER, RUN_LABEL, SPEC_HASH_ANNOTATION, spec_hash
from kubetune.controller.decide import Observed, ObservedJob


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def observe_job(raw: dict[str, Any]) -> ObservedJob:
    status = raw.get("status") or {}
    failed = _condition(raw, "Failed")
    return ObservedJob(
        name=raw["metadata"]["name"],
        suspended=bool((raw.get("spec") or {}).get("suspend")),
        active=int(status.get("active") or 0),
        complete=_condition(raw, "Complete") is not None,
        failed_reason=(failed.get("reason") or "Failed") if failed else None,
        failed_message=(failed or {}).get("message") or "",
        start_time=_time(status.get("startTime")),
        completion_time=_time(status.get("completionTime"))
        or _time((failed or {}).get("lastTransitionTime")),
    )


def termination_result(pod: dict[str, Any]) -> TrainerResult | None:
    """The TrainerResult in a terminated trainer container's termination message, if any."""
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") != CONTAINER:
            continue
        terminated = (container.get("state") or {}).get("terminated") or {}
        message = terminated.get("message")
        if not message:
            return None
        try:
            return TrainerResult.model_validate_json(message)
        except ValidationError:
            return None  # FallbackToLogsOnError: the message is the log tail, not a result
    return None


def _finished_at(pod: dict[str, Any]) -> str:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        finished = ((container.get("state") or {}).get("terminated") or {}).get("finishedAt")
        if finished:
            return finished
    return ""


def current_run_id(job: FineTuneJob, jobs: Iterable[dict[str, Any]]) -> str:
    """The run the spec asks for: an existing Job's run when it was built from this same spec
    (only `suspend` changed since), else a new run id for this generation."""
    wanted = spec_hash(job)
    for raw in jobs:
        meta = raw.get("metadata") or {}
        run_id = (meta.get("labels") or {}).get(RUN_LABEL)
        if run_id and (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == wanted:
            return run_id
    return make_run_id(job.metadata.uid or "", job.metadata.generation or 0)


def observe(
    run_id: str,
    jobs: Iterable[dict[str, Any]],
    configmaps: Iterable[dict[str, Any]],
    pods: Iterable[dict[str, Any]],
    metrics_text: str | None = None,
    now: datetime | None = None,
) -> Observed:
    """What exists for one FineTuneJob: its children (by run-id label) and its current pods."""
    jobs, configmaps = list(jobs), list(configmaps)

    def run_of(obj: dict[str, Any]) -> str | None:
        return ((obj.get("metadata") or {}).get("labels") or {}).get(RUN_LABEL)

    current = [j for j in jobs if run_of(j) == run_id]
    stale = tuple(("Job", j["metadata"]["name"]) for j in jobs if run_of(j) != run_id) + tuple(
        ("ConfigMap", c["metadata"]["name"]) for c in configmaps if run_of(c) != run_id
    )
    run_pods = [p for p in pods if run_of(p) == run_id]
    finished = sorted((p for p in run_pods if termination_result(p)), key=_finished_at)
    progress, stage = parse_metrics(metrics_text, now) if metrics_text else (None, None)
    return Observed(
        job=observe_job(current[0]) if current else None,
        configmap=any(run_of(c) == run_id for c in configmaps),
        stale=stale,
        pods_started=len(run_pods),
        result=termination_result(finished[-1]) if finished else None,
        progress=progress,
        stage=stage,
    )


def parse_metrics(text: str, now: datetime | None = None) -> tuple[Progress | None, str | None]:
    """status.progress and the pipeline stage from the trainer's Prometheus metrics."""
    values: dict[str, float] = {}
    stage = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubetune_trainer_stage":
                if sample.value == 1:
                    stage = sample.labels.get("kubetune_trainer_stage")
            elif not sample.labels:
                values[sample.name] = sample.value
    if "kubetune_trainer_step" not in values:
        return None, stage
    step = int(values["kubetune_trainer_step"])
    total = int(values.get("kubetune_trainer_total_steps", 0)) or None
    eta = values.get("kubetune_trainer_eta_seconds")
    return (
        Progress(
            step=step,
            total_steps=total,
            percent=min(100, int(100 * step / total)) if total else None,
            epoch=values.get("kubetune_trainer_epoch"),
            loss=values.get("kubetune_trainer_train_loss"),
            tokens_per_second=values.get("kubetune_trainer_tokens_per_second"),
            eta_seconds=int(eta) if eta is not None else None,
            updated_at=now,
        ),
        stage,
    )
