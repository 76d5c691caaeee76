"""The FineTuneSchedule controller: its reconcile, its I/O, and the events that wake it.

One reconcile of one FineTuneSchedule: stamp and delete FineTuneJobs as schedules.py decides
(pure), write the schedule's status, and come back when its next time is due.

What wakes it (`ScheduleController.wakes`; the trigger label in parentheses):
- the schedule added, its spec changed (generation), or its status changed by someone else
  (schedule); its own status writes wake nothing, and a deleted schedule nothing either (the
  garbage collector deletes what it stamped);
- a FineTuneJob it stamped came, went, finished or was promoted (stamped): its phase or
  promotion changed, whether the watch saw it or the operator wrote it (not at every progress
  write), except its own stamping;
- its next scheduled time (timer): the reconcile's Result.requeue_after;
- its kubetune.dev/rollback annotation changed (schedule): `kubetune rollback SCHEDULE` wrote
  latest.json; the reconcile reads latest.json (results.read_latest, with the template's output
  Secret, as the FineTuneJob controller reads result.json) once per annotation value, and the
  status shows the rollback only when latest.json records it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from kubetune.api import SCHEDULE_LABEL, FineTuneScheduleStatus, PromotionRecord
from kubetune.controller import results
from kubetune.controller.cached import CachedKube
from kubetune.controller.errors import Misconfigured, Rejected, Retry
from kubetune.controller.metrics import OperatorMetrics, Trigger
from kubetune.controller.patch import status_dict, write_status
from kubetune.controller.runtime import Enqueue, Object, Request, Result
from kubetune.controller.schedules import (
    ScheduleDecision,
    decide_schedule,
    refused,
    rollback_annotation,
    rollback_output,
    rollback_time,
    rollback_to_check,
    rolled_back,
)
from kubetune.controller.settings import OperatorSettings

KIND = "finetuneschedules"
log = logging.getLogger("kubetune.operator")
ROLLBACK_RETRY = 60.0  # seconds before latest.json is asked again after no answer
LatestReader = Callable[[str, dict[str, str]], PromotionRecord | None]


class ScheduleIO(Protocol):
    """What a schedule's reconcile needs from the API layer (cached.CachedKube; a fake in
    unit tests)."""

    def get_schedule(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def stamped(self, namespace: str, name: str) -> list[dict[str, Any]]: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def create(self, obj: dict[str, Any]) -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...
    def patch_schedule_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
    ) -> Any: ...
    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None: ...


def reconcile(
    kube: ScheduleIO,
    namespace: str,
    name: str,
    now: datetime | None = None,
    read_latest: LatestReader = results.read_latest,
) -> Result | None:
    """One FineTuneSchedule: stamp and delete FineTuneJobs as schedules.py decides, write its
    status; returns when it is due again (requeue_after None: only a change wakes it), or None:
    it is gone."""
    raw = kube.get_schedule(namespace, name)
    if raw is None:
        return None
    now = now or datetime.now(UTC)
    decision = decide_schedule(raw, kube.stamped(namespace, name), now)
    decision = _check_rollback(kube, raw, decision, read_latest, now)
    for job in decision.delete:
        kube.delete("FineTuneJob", namespace, job)
    for obj in list(decision.create):
        try:
            kube.create(obj)
        except Rejected as exc:  # the API server refused the stamped FineTuneJob for good
            stamped = obj["metadata"]["name"]
            problem = f"the stamped FineTuneJob {stamped} was refused: {exc}"
            decision = refused(decision, raw, stamped, problem, now)
            break
    try:
        previous = status_dict(FineTuneScheduleStatus.model_validate(raw.get("status") or {}))
    except ValidationError:
        previous = {}  # garbage: every key of the new status is written, the rest dropped
    if write_status(raw, previous, status_dict(decision.status), kube.patch_schedule_status):
        for event in decision.events:
            kube.event(raw, event.type, event.reason, event.message, now)
    return Result(requeue_after=decision.requeue_after)


def _check_rollback(
    kube: ScheduleIO,
    raw: dict[str, Any],
    decision: ScheduleDecision,
    read_latest: LatestReader,
    now: datetime,
) -> ScheduleDecision:
    """The decision with a new kubetune.dev/rollback annotation checked against latest.json.
    Storage that does not answer now leaves the value unobserved and the rest of the decision
    goes on (the schedule keeps stamping); the check comes back with the next reconcile."""
    value = rollback_to_check(raw)
    if value is None:
        return decision
    output = rollback_output(raw)
    record = None
    if output is not None and rollback_time(value) is not None:  # no read for a malformed one
        uri, secret = output
        namespace = (raw.get("metadata") or {}).get("namespace") or ""
        try:
            credentials = kube.secret_data(namespace, secret) if secret else {}
            record = read_latest(uri, credentials) if credentials is not None else None
        except Misconfigured as exc:  # the operator may not read the namespace's Secrets
            log.warning("latest.json of %s not read: %s", uri, exc)
        except Retry as exc:
            log.info("latest.json of %s not read yet: %s", uri, exc)
            later = max(exc.delay, ROLLBACK_RETRY)  # a slow store holds a worker: not often
            after = decision.requeue_after
            return replace(decision, requeue_after=later if after is None else min(after, later))
    return rolled_back(decision, value, output[0] if output else None, record, now)


class ScheduleController:
    """The FineTuneSchedule controller as the runtime runs it."""

    kind = KIND

    def __init__(
        self,
        cached: CachedKube,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        enqueue: Enqueue,
    ) -> None:
        self.cached = cached

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}

    def resume(self, obj: Object) -> Trigger:
        return Trigger.RESUME

    def wakes(
        self, kind: str, old: Object | None, new: Object | None, own: bool
    ) -> Iterator[tuple[Request, Trigger]]:
        obj = new if new is not None else old
        meta = (obj or {}).get("metadata") or {}
        namespace = meta.get("namespace") or ""
        if kind == KIND:
            if own or new is None:
                return
            before = (old or {}).get("metadata") or {}
            if (
                old is None
                or before.get("generation") != meta.get("generation")
                or (old.get("status") or {}) != (new.get("status") or {})
                or rollback_annotation(old) != rollback_annotation(new)
            ):
                yield Request(KIND, namespace, meta.get("name") or ""), Trigger.SCHEDULE
        elif kind == "finetunejobs":
            owner = (meta.get("labels") or {}).get(SCHEDULE_LABEL)
            if not owner or (own and old is None):  # not stamped, or just stamped by it
                return
            if old is None or new is None or _seen(old) != _seen(new):
                yield Request(KIND, namespace, owner), Trigger.STAMPED

    def refresh(self, namespace: str, name: str) -> None:
        self.cached.refresh_schedule(namespace, name)

    def reconcile(self, namespace: str, name: str) -> Result | None:
        return reconcile(self.cached, namespace, name)


def _seen(job: Object) -> tuple[Any, ...]:
    """What a schedule looks at in a run it stamped."""
    status = job.get("status") or {}
    return status.get("phase"), status.get("promotion")
