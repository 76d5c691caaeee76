"""One reconcile of one FineTuneJob: read → parse → policy → observe → decide → apply.

Level-based: it reads the FineTuneJob and its children afresh every time, so every trigger
(create, update, resume after an operator restart, a child Job's event, the poll timer) runs the
same code and running it twice is harmless. The I/O goes through a `Kube` (kube.py); deciding is
pure (policy.py, observe.py, decide.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from kubetune.api import (
    FineTuneJob,
    FineTuneJobStatus,
    ObjectMeta,
    describe_errors,
    make_run_id,
)
from kubetune.controller.build import CONTAINER, RUN_LABEL
from kubetune.controller.decide import Decision, decide, decide_unparseable
from kubetune.controller.errors import Rejected
from kubetune.controller.observe import current_run_id, observe
from kubetune.controller.policy import policy_problems
from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.controller")

FINAL_PHASES = ("Succeeded", "Failed")


class KubeIO(Protocol):
    """What reconcile needs from the API layer (kube.Kube; a fake in unit tests)."""

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def children(self, namespace: str, job_name: str) -> dict[str, list[dict[str, Any]]]: ...
    def metrics(self, pod: dict[str, Any], port: int) -> str | None: ...
    def create(self, obj: dict[str, Any]) -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...
    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None: ...
    def patch_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool: ...
    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None: ...


@dataclass(frozen=True)
class Outcome:
    before: FineTuneJobStatus
    after: FineTuneJobStatus
    status_written: bool

    @property
    def phase(self) -> str | None:
        return self.after.phase

    @property
    def final(self) -> bool:
        return self.after.phase in FINAL_PHASES


def _status_dict(status: FineTuneJobStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns old into new."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            nested = merge_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif old.get(key) != value:
            patch[key] = value
    return patch


def _previous_status(raw: dict[str, Any]) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        log.warning("ignoring an unreadable status on %s", raw["metadata"].get("name"))
        return FineTuneJobStatus()


def _running_pod(pods: list[dict[str, Any]], run_id: str) -> dict[str, Any] | None:
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        status = pod.get("status") or {}
        if labels.get(RUN_LABEL) == run_id and status.get("phase") == "Running":
            names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
            if CONTAINER in names:
                return pod
    return None


def _metrics_port(pod: dict[str, Any], default: int) -> int:
    """The pod's own `metrics` container port: the pod, not today's settings, says where."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "metrics" and port.get("containerPort"):
                return int(port["containerPort"])
    return default


def reconcile(
    kube: KubeIO,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    *,
    read_progress: bool = False,
    now: datetime | None = None,
) -> Outcome | None:
    """Bring one FineTuneJob's children and status in line with its spec. None: it is gone."""
    now = now or datetime.now(UTC)
    raw = kube.get_finetunejob(namespace, name)
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return None  # deleted: the garbage collector removes the children via ownerReferences
    previous = _previous_status(raw)
    meta = raw.get("metadata") or {}
    uid, generation = meta.get("uid") or "", int(meta.get("generation") or 0)
    children = kube.children(namespace, name)

    try:
        job = FineTuneJob.model_validate({k: v for k, v in raw.items() if k != "status"})
    except ValidationError as exc:
        # The API server validates against the CRD, so this means the CRD is older than the
        # operator or was bypassed: report, create nothing, remove earlier runs.
        run_id = make_run_id(uid, generation)
        observed = observe(run_id, children["jobs"], children["configmaps"], [])
        decision = decide_unparseable(
            uid,
            generation,
            previous,
            observed.stale,
            describe_errors(exc, FineTuneJob),
            now,
        )
        return _apply(kube, raw, previous, decision, now)
    job = job.model_copy(update={"status": previous, "metadata": ObjectMeta.model_validate(meta)})
    problems = policy_problems(job, settings)
    run_id = current_run_id(job, children["jobs"])
    metrics_text = None
    if read_progress and not problems:
        pod = _running_pod(children["pods"], run_id)
        if pod is not None:
            metrics_text = kube.metrics(pod, _metrics_port(pod, settings.trainer_metrics_port))
    observed = observe(
        run_id, children["jobs"], children["configmaps"], children["pods"], metrics_text, now
    )
    decision = decide(job, observed, settings, now, problems, run_id)
    try:
        return _apply(kube, raw, previous, decision, now)
    except Rejected as exc:
        # The API server refused a child (e.g. an admission policy): report it like a bad spec.
        decision = decide(job, observed, settings, now, [str(exc)], run_id)
        decision.create.clear()
        return _apply(kube, raw, previous, decision, now)


def _apply(
    kube: KubeIO,
    raw: dict[str, Any],
    previous: FineTuneJobStatus,
    decision: Decision,
    now: datetime,
) -> Outcome:
    meta = raw["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for kind, child in decision.delete:
        kube.delete(kind, namespace, child)
    for obj in decision.create:  # the ConfigMap first: the Job's pod mounts it
        kube.create(obj)
    if decision.set_suspend is not None and decision.status.job_name:
        kube.set_suspend(namespace, decision.status.job_name, decision.set_suspend)
    new = _status_dict(decision.status)
    patch = merge_patch(_status_dict(previous), new)
    # Keys the model does not know (e.g. left by an older operator) are dropped too.
    for key in raw.get("status") or {}:
        if key not in new and key not in patch:
            patch[key] = None
    written = False
    if patch:
        written = kube.patch_status(namespace, name, patch)
        if written:
            log.info("status of %s/%s: %s", namespace, name, decision.status.phase)
    if written:
        for event in decision.events:
            kube.event(raw, event.type, event.reason, event.message, now)
    return Outcome(before=previous, after=decision.status, status_written=written)
