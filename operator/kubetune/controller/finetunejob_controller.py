"""The FineTuneJob controller: its reconcile, its I/O, and the events that wake it.

One reconcile of one FineTuneJob: read → parse → profile and policy → observe → decide → apply.
Level-based: it reads the FineTuneJob and its children (from the operator's watch-fed caches,
cached.CachedKube) every time, so every trigger runs the same code and running it twice is
harmless. The I/O goes through a `FineTuneJobIO` and, for a finished run whose pod is gone,
results.py; deciding is pure (kubetune.admission: profile and policy; observe.py, decide.py).

What wakes it (`FineTuneJobController.wakes`; the trigger label in parentheses):
- a FineTuneJob added (added), deleted, its spec changed (generation), its deletionTimestamp
  set, or its status changed by someone else (finetunejob); the operator's own status writes
  wake nothing, but a FineTuneJob the operator stamped from a schedule is reconciled (added);
- any change, seen on the watch, of a Job, Pod, ConfigMap or Service labelled as its child
  (child);
- a FineTuneProfile changed (finetuneprofile) or a namespace's labels (namespace): the runs
  that are not final and may wait on it (a run that started keeps its pinned profile);
- its trainer's metrics, when the scraper (scraper.py) saw a new step or stage (poll); the
  text read is handed to the reconcile, which reads no trainer itself;
- the runtime's resync while it is not final, retries, start-up (runtime.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import ValidationError

from kubetune.admission import Admission, admit, admit_pinned, pinned_profile
from kubetune.api import (
    FINAL_PHASES,
    FineTuneJob,
    FineTuneJobStatus,
    FineTuneProfile,
    ObjectMeta,
    TrainerResult,
    describe_errors,
    make_run_id,
)
from kubetune.api.wire import JOB_LABEL
from kubetune.controller import notifications, results
from kubetune.controller.build import (
    RunTemplate,
    build_configmap,
    data_hash,
    spec_hash,
)
from kubetune.controller.cache import DATA_HASH
from kubetune.controller.cached import CHILDREN, CachedKube
from kubetune.controller.conditions import State
from kubetune.controller.decide import Decision, Observed, decide
from kubetune.controller.errors import Conflict, Misconfigured, Rejected, Retry
from kubetune.controller.metrics import OperatorMetrics, Trigger
from kubetune.controller.observe import (
    controlled,
    current_run_id,
    metrics_target,
    observe,
    run_configmap,
    running_pod,
)
from kubetune.controller.patch import finite, status_dict, write_status
from kubetune.controller.runtime import Enqueue, Object, Request, Result
from kubetune.controller.scraper import Scraper
from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

ResultReader = Callable[[str, str, dict[str, str]], TrainerResult | None]


class FineTuneJobIO(Protocol):
    """What a FineTuneJob's reconcile needs from the API layer (cached.CachedKube; a fake in
    unit tests)."""

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def children(self, namespace: str, job_name: str) -> dict[str, list[dict[str, Any]]]: ...
    def profiles(self) -> list[FineTuneProfile]: ...
    def unreadable_profiles(self) -> dict[str, bool]: ...
    def namespace_labels(self, namespace: str) -> dict[str, str] | None: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def create(self, obj: dict[str, Any]) -> None: ...
    def delete(self, kind: str, namespace: str, name: str) -> None: ...
    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None: ...
    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None = None
    ) -> Any: ...
    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None: ...


@dataclass(frozen=True)
class Outcome:
    before: FineTuneJobStatus
    after: FineTuneJobStatus
    status_written: bool
    metrics_target: tuple[str, int] | None = None  # (pod IP, port) of the running trainer

    @property
    def final(self) -> bool:
        return self.after.phase in FINAL_PHASES


KIND = "finetunejobs"


def _previous_status(raw: dict[str, Any]) -> FineTuneJobStatus:
    try:
        return FineTuneJobStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        log.warning("ignoring an unreadable status on %s", raw["metadata"].get("name"))
        return FineTuneJobStatus()


def _needs_stored_result(job: FineTuneJob, observed: Observed, run_id: str) -> bool:
    """Whether the run ended (or its Job vanished) with no pod left to carry the result."""
    previous = job.status or FineTuneJobStatus()
    if observed.result is not None or job.spec.suspend:
        return False
    same_run = previous.run_id == run_id
    if same_run and previous.phase in FINAL_PHASES:
        return False  # finished runs keep the status they were given
    current = observed.job
    if current is not None and observed.trainer_running:
        # The Job says the run ended but the cached pod still runs: the pod's own update (with
        # the termination message) is on its way on the pods' watch; wait for it.
        return False
    if current is not None:
        return current.complete or current.failed_reason is not None
    # The run's Job existed, a trainer started, and it is gone. (A Job never created, e.g. under
    # the operator's own misconfiguration, has no result to look for.)
    return same_run and previous.phase is not None and previous.attempts > 0


# How long a run whose Job ended waits for its pod's report (the termination message on the
# pods' watch) before it is finished from result.json or the Job's own reason.
RESULT_GRACE_SECONDS = 30.0


def _report_on_its_way(observed: Observed, now: datetime) -> float | None:
    """Seconds left to wait for the trainer's report, or None: not waiting. Kubernetes orders
    no events across two watches: the Job's (Complete, or FailureTarget after the trainer's
    exit 4) can arrive before the Pod's update that carries the termination message. While the
    cached pod still runs its trainer, that update is on its way, so no final verdict is made
    from the Job alone; bounded, in case the update never comes."""
    current = observed.job
    if current is None or observed.result is not None or not observed.trainer_running:
        return None
    if not (current.complete or current.failed_reason):
        return None
    if current.completion_time is None:
        return RESULT_GRACE_SECONDS
    left = RESULT_GRACE_SECONDS - (now - current.completion_time).total_seconds()
    return left if left > 0 else None


def _stored_result(
    kube: FineTuneJobIO, job: FineTuneJob, run_id: str, read_result: ResultReader
) -> TrainerResult | None:
    output = job.spec.output
    credentials: dict[str, str] = {}
    if output.credentials_secret:
        # A transient failure (Retry) propagates: the reconcile is retried rather than the run
        # finished without its result (a final status is never revisited).
        try:
            found = kube.secret_data(job.metadata.namespace or "", output.credentials_secret)
        except Misconfigured as exc:
            # The operator may not read it (readStorageSecrets: false, a namespace outside
            # rbac.secretNamespaces): the run ends without its stored result, not never.
            log.warning("result.json of run %s not read: %s", run_id, exc)
            return None
        if found is None:
            return None
        credentials = found
    return read_result(output.uri, run_id, credentials)


def _admit(
    kube: FineTuneJobIO,
    job: FineTuneJob,
    pinned: dict[str, Any] | None,
    settings: OperatorSettings,
) -> Admission:
    """The job admitted under its profile: the one its run started with, if the run's
    ConfigMap is vouched for (pinned); else the one it selects now."""
    if pinned is not None:
        return admit_pinned(job, pinned_profile(pinned), settings)
    namespace = job.metadata.namespace or ""
    profiles = kube.profiles()
    unreadable = kube.unreadable_profiles()
    labels: dict[str, str] | None = {}
    if any(p.spec.namespace_selector is not None for p in profiles):
        labels = kube.namespace_labels(namespace)
        if labels is None:
            # Every namespaced object's namespace exists: the cache has not seen it yet.
            raise Retry(f"namespace {namespace} is not in the cache yet", 1.0)
    return admit(job, profiles, labels, settings, unreadable)


def _own_configmap(
    job: FineTuneJob,
    run_id: str,
    configmap: dict[str, Any] | None,
    previous: FineTuneJobStatus,
    settings: OperatorSettings,
    kube: FineTuneJobIO,
) -> tuple[Admission, str | None]:
    """The job resolved, and the hash of the run's ConfigMap when its contents are the
    operator's: the hash status.configHash recorded for this run, or (status not written yet,
    or by an older operator) the contents the operator would write now. A ConfigMap with any
    other contents was written by someone else (a tenant can create one with the run's name,
    labels and even its owner reference): it is neither believed nor mounted; None."""
    # The cache keeps a ConfigMap's hash, not its data (cache.trim_configmap).
    found = (configmap.get(DATA_HASH) or data_hash(configmap)) if configmap is not None else None
    recorded = previous.config_hash if previous.run_id == run_id else None
    if found is not None and found == recorded:
        return _admit(kube, job, configmap, settings), found
    admission = _admit(kube, job, None, settings)
    if found is None:
        return admission, None
    wanted = data_hash(build_configmap(admission.job, run_id, settings, admission.template))
    return admission, (found if found == wanted else None)


def reconcile(
    kube: FineTuneJobIO,
    settings: OperatorSettings,
    namespace: str,
    name: str,
    *,
    metrics_text: str | None = None,
    read_result: ResultReader = results.read_result,
    now: datetime | None = None,
) -> Outcome | None:
    """Bring one FineTuneJob's children and status in line with its spec. None: it is gone.
    metrics_text: the running trainer's metrics, when the caller read them."""
    now = now or datetime.now(UTC)
    raw = kube.get_finetunejob(namespace, name)
    if raw is None or (raw.get("metadata") or {}).get("deletionTimestamp"):
        return None  # deleted: the garbage collector removes the children via ownerReferences
    previous = _previous_status(raw)
    meta = ObjectMeta.model_validate(raw.get("metadata") or {})
    children = controlled(kube.children(namespace, name), meta.uid or "")
    refusal: State | None = None
    template = RunTemplate()
    waiting: float | None = None
    try:
        job = FineTuneJob.model_validate(
            {k: v for k, v in raw.items() if k != "status"}, by_name=False
        )
    except ValidationError as exc:
        # The API server validates against the CRD, so this means the CRD is older than the
        # operator or was bypassed: report, create nothing, remove earlier runs.
        job = FineTuneJob.model_construct(metadata=meta, spec=None, status=previous)
        run_id = make_run_id(meta.uid or "", meta.generation or 0)
        refusal = State("InvalidSpec", "; ".join(describe_errors(exc, FineTuneJob)))
        observed = observe(
            run_id,
            children["jobs"],
            children["configmaps"],
            [],
            services=children.get("services", ()),
        )
    else:
        job = job.model_copy(update={"status": previous, "metadata": meta})
        run_id = current_run_id(job, children["jobs"], children["configmaps"])
        configmap = run_configmap(children["configmaps"], run_id)
        admission, config_hash = _own_configmap(job, run_id, configmap, previous, settings, kube)
        foreign: tuple[tuple[str, str], ...] = ()
        finished = previous.run_id == run_id and previous.phase in FINAL_PHASES
        if configmap is not None and config_hash is None and not finished:
            # Deleted (the decision recreates it from the spec): never mounted by a trainer. A
            # finished run's is left: no pod mounts it again, and it keeps the run's id (one
            # written before status.configHash existed is not the operator's newest shape).
            log.warning(
                "ConfigMap %s/%s has contents the operator did not write; replacing it",
                namespace,
                configmap["metadata"]["name"],
            )
            children["configmaps"] = [c for c in children["configmaps"] if c is not configmap]
            foreign = (("ConfigMap", configmap["metadata"]["name"]),)
        job, template = admission.job, admission.template
        problems = admission.policy_problems
        if admission.refusal is not None:
            refusal = State(admission.refusal.reason, admission.refusal.message)
        observed = observe(
            run_id,
            children["jobs"],
            children["configmaps"],
            children["pods"],
            metrics_text,
            now,
            services=children.get("services", ()),
            gpu_resource=job.spec.resources.gpu_resource(),
        )
        observed = replace(observed, config_hash=config_hash, stale=(*observed.stale, *foreign))
        if _needs_stored_result(job, observed, run_id):
            stored = _stored_result(kube, job, run_id, read_result)
            observed = replace(observed, result=stored)
        waiting = _report_on_its_way(observed, now)
        if waiting is not None and observed.job is not None:
            # Decided as if the Job still ran; the pod's update (or the timer) decides it.
            ended = replace(observed.job, complete=False, failed_reason=None, failed_message="")
            observed = replace(observed, job=ended)
        if problems and observed.job is not None:
            log.info(
                "run %s of %s/%s started under an earlier policy; it finishes under it: %s",
                run_id,
                namespace,
                name,
                "; ".join(problems),
            )
    running = running_pod(children["pods"], run_id)
    target = metrics_target(running, settings.trainer_metrics_port) if running else None

    def attempt(decision: Decision) -> Outcome:
        return _apply(kube, raw, previous, decision, now, target)

    try:
        outcome = attempt(
            decide(job, observed, settings, now, refusal=refusal, run_id=run_id, template=template)
        )
    except Rejected as exc:
        # The API server or an admission policy refused a child built from the spec.
        denied = State("AdmissionDenied", f"the API server refused the run: {exc}")
        return attempt(
            decide(job, observed, settings, now, denied=denied, run_id=run_id, template=template)
        )
    except Misconfigured as exc:
        # Not the user's doing: show it, keep the phase, and let the caller retry with backoff.
        error = State(exc.reason, str(exc))
        with suppress(Retry):
            attempt(
                decide(
                    job,
                    observed,
                    settings,
                    now,
                    refusal=refusal,
                    run_id=run_id,
                    error=error,
                    template=template,
                )
            )
        raise
    if waiting is not None:
        raise Retry(f"run {run_id}'s Job ended; waiting for its trainer's report", waiting)
    if job.spec is not None:
        hashed = template.spec_hash or spec_hash(job)
        _announce(kube, raw, job, outcome.after, hashed, settings, now)
    return outcome


def _announce(
    kube: FineTuneJobIO,
    raw: dict[str, Any],
    job: FineTuneJob,
    status: FineTuneJobStatus,
    run_spec_hash: str,
    settings: OperatorSettings,
    now: datetime,
) -> None:
    """Deliver the run's promotion notification when one is due (notifications.py); raises Retry to
    come back when the next attempt is."""
    promotion = status.promotion
    note = promotion.notification if promotion else None
    if note is None or note.state != "Pending":
        return
    if notifications.due_in(note, now) > 0:
        raise notifications.retry_later(note, now)
    namespace, name = job.metadata.namespace or "", job.metadata.name or ""
    hook = job.spec.notify.webhook if job.spec.notify else None
    if hook is None:
        error: str | None = "spec.notify.webhook was removed before the notification was sent"
        note = note.model_copy(update={"state": "Failed", "message": error})
    else:
        error = notifications.deliver(kube, hook, job, status, run_spec_hash, note, now, settings)
        note = notifications.after_attempt(note, error, now, settings)
    patch = {"promotion": {"notification": finite(note.model_dump(by_alias=True, mode="json"))}}
    kube.patch_status(namespace, name, patch)
    if note.state == "Delivered":
        log.info("promotion of %s/%s announced (%s)", namespace, name, note.id)
        kube.event(
            raw, "Normal", "Notified", f"the webhook received run {note.id}'s promotion", now
        )
    elif note.state == "Failed":
        kube.event(raw, "Warning", "NotificationFailed", note.message or "", now)
    else:
        log.info("promotion of %s/%s not announced yet: %s", namespace, name, error)
        raise notifications.retry_later(note, now)


def _apply(
    kube: FineTuneJobIO,
    raw: dict[str, Any],
    previous: FineTuneJobStatus,
    decision: Decision,
    now: datetime,
    target: tuple[str, int] | None,
) -> Outcome:
    meta = raw["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for kind, child in decision.delete:
        kube.delete(kind, namespace, child)
    for obj in decision.create:  # the ConfigMap first: the Job's pod mounts it
        kube.create(obj)
    if decision.set_suspend is not None and decision.status.job_name:
        kube.set_suspend(namespace, decision.status.job_name, decision.set_suspend)
    written = write_status(
        raw, status_dict(previous), status_dict(decision.status), kube.patch_status
    )
    if written:
        log.info("status of %s/%s: %s", namespace, name, decision.status.phase)
        for event in decision.events:
            kube.event(raw, event.type, event.reason, event.message, now)
    return Outcome(previous, decision.status, written, target)


class FineTuneJobController:
    """The FineTuneJob controller as the runtime runs it: the reconcile above, the events that
    wake it, and the scraper that reads its running trainers."""

    kind = KIND

    def __init__(
        self,
        cached: CachedKube,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        enqueue: Enqueue,
    ) -> None:
        self.cached = cached
        self.settings = settings
        self.metrics = metrics
        self.enqueue = enqueue
        self._texts: dict[tuple[str, str], str] = {}  # the newest metrics read, by FineTuneJob
        self._lock = threading.Lock()
        self.scraper = Scraper(
            cached.kube.metrics,
            self._progress,
            interval=settings.progress_poll_seconds,
            rate=settings.progress_scrapes_per_second,
            concurrency=settings.progress_scrape_concurrency,
        )

    def start(self) -> None:
        self.scraper.start()

    def stop(self) -> None:
        self.scraper.stop()

    def stats(self) -> dict[str, Any]:
        return {"scraping": len(self.scraper)}

    def resume(self, obj: Object) -> Trigger:
        phase = (obj.get("status") or {}).get("phase")
        return Trigger.RESUME_FINAL if phase in FINAL_PHASES else Trigger.RESUME

    def wakes(
        self, kind: str, old: Object | None, new: Object | None, own: bool
    ) -> Iterator[tuple[Request, Trigger]]:
        obj = new if new is not None else old
        meta = (obj or {}).get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        if kind in CHILDREN:
            owner = (meta.get("labels") or {}).get(JOB_LABEL)
            if owner and not own:
                yield Request(KIND, namespace, owner), Trigger.CHILD
        elif kind == KIND:
            if own:
                if old is None and new is not None:  # stamped by a schedule
                    yield Request(KIND, namespace, name), Trigger.ADDED
                return
            before = (old or {}).get("metadata") or {}
            if (
                old is None
                or new is None
                or before.get("generation") != meta.get("generation")
                or before.get("deletionTimestamp") != meta.get("deletionTimestamp")
                or (old.get("status") or {}) != (new.get("status") or {})
            ):
                trigger = Trigger.ADDED if old is None else Trigger.FINETUNEJOB
                yield Request(KIND, namespace, name), trigger
        elif kind == "namespaces":
            before = ((old or {}).get("metadata") or {}).get("labels")
            if old is not None and new is not None and before != meta.get("labels"):
                yield from self._waiting(lambda key, _: key[0] == name, Trigger.NAMESPACE)
        elif kind == "finetuneprofiles":
            yield from self._waiting(lambda _, wanted: wanted in (None, name), Trigger.PROFILE)

    def _waiting(
        self, affected: Callable[[tuple[str, str], Any], bool], trigger: Trigger
    ) -> Iterator[tuple[Request, Trigger]]:
        """The runs that are not final and `affected` (by their key and spec.profile): a run
        that exists keeps its pinned profile, but one that may not have started because of a
        profile or a namespace's labels is looked at again."""
        store = self.cached.stores[KIND]
        for key in store.names():
            obj = store.get(*key) or {}
            if ((obj.get("status") or {}).get("phase")) in FINAL_PHASES:
                continue
            if affected(key, (obj.get("spec") or {}).get("profile")):
                yield Request(KIND, *key), trigger

    def _progress(self, key: tuple[str, str], text: str) -> None:
        with self._lock:
            self._texts[key] = text
        self.enqueue(Request(KIND, *key), Trigger.POLL)

    def refresh(self, namespace: str, name: str) -> None:
        self.cached.refresh(namespace, name)

    def reconcile(self, namespace: str, name: str) -> Result | None:
        key = (namespace, name)
        with self._lock:
            text = self._texts.pop(key, None)
        try:
            outcome = reconcile(self.cached, self.settings, namespace, name, metrics_text=text)
        except Conflict:
            if text is not None:  # read again with the next try, unless a newer one came
                with self._lock:
                    self._texts.setdefault(key, text)
            raise
        if outcome is None:  # gone: stop reading its trainer and drop it from the metrics
            with self._lock:
                self._texts.pop(key, None)
            self.scraper.set(key, None)
            self.metrics.forget(namespace, name)
            return None
        self.scraper.set(key, outcome.metrics_target)
        self.metrics.observe(namespace, name, outcome.before, outcome.after, outcome.status_written)
        return Result(resync=not outcome.final)
