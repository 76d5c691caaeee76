"""The reconcile decision: parsed FineTuneJob + what exists -> what to change + the new status.

Pure and level-based: the same inputs give the same decision, whatever event led here, so the
operator can call it on create, update, resume, child events and timers alike. The I/O layer
reduces the cluster to an `Observed` and carries out the `Decision`.

Rules that hold whatever the order of events:
- A finished run (Succeeded or Failed for the current run id) never gets a new Job: a Job that the
  TTL-after-finished controller deleted is not a lost Job.
- A refusal (invalid spec, policy, admission) only stops a run from starting: a run whose Job
  exists finishes under the rules it started with.
- Phases only move forward within a run (conditions.FORBIDDEN); what a reading does not say (a
  reconcile without a metrics reading, the Job's terminal window) does not move them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune.api import (
    EXIT_CODES,
    FINAL_PHASES,
    DistributedStatus,
    ExitCode,
    FineTuneJob,
    FineTuneJobStatus,
    NotificationStatus,
    PodPhase,
    Progress,
    PromotionStatus,
    TrainerResult,
    Usage,
    child_name,
    gates_summary,
    latest_uri,
    make_run_id,
)
from kubetune.api.wire import EVALUATING_STAGES
from kubetune.controller.build import (
    NO_PROFILE,
    RunTemplate,
    build_configmap,
    build_job,
    build_service,
    data_hash,
)
from kubetune.controller.conditions import (
    State,
    conditions_for,
    forbidden,
    phase_of,
    state_of,
)
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.usage import PodRun, account


@dataclass(frozen=True)
class ObservedJob:
    """The batch/v1 Job of the current run, reduced to what the decision needs."""

    name: str
    suspended: bool = False
    active: int = 0  # pods not yet terminal, Pending ones included
    complete: bool = False  # Complete, or SuccessCriteriaMet (Complete follows)
    failed_reason: str | None = None  # the Failed (or FailureTarget) condition's reason
    failed_message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None
    deleting: bool = False


@dataclass(frozen=True)
class Waiting:
    """Why a trainer pod waits (the scheduler's or the kubelet's reason and message)."""

    reason: str
    message: str = ""


@dataclass(frozen=True)
class Observed:
    job: ObservedJob | None = None  # the current run's Job
    configmap: bool = False  # the current run's ConfigMap exists
    config_hash: str | None = None  # its contents' hash, when they are the operator's
    service: bool = False  # the current run's headless Service exists (runs of several pods)
    stale: tuple[tuple[str, str], ...] = ()  # (kind, name) of children of older runs
    pods_started: int = 0  # starts of the current run's trainer: pods, or rounds of a group
    pods: tuple[PodPhase, ...] = ()  # the newest pod of each index of a group
    result: TrainerResult | None = None  # the newest termination message, or result.json
    progress: Progress | None = None  # from the trainer's metrics, while it runs
    stage: str | None = None  # the trainer's pipeline stage, from its metrics
    trainer_running: bool = False  # a trainer container of the run runs now
    trainer_started: datetime | None = None  # when the run's first trainer container started
    waiting: Waiting | None = None  # why a pod of the run waits, if it does
    pod_runs: tuple[PodRun, ...] = ()  # the trainer containers of the run's pods that started


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)
    set_suspend: bool | None = None  # patch the Job's spec.suspend to this
    status: FineTuneJobStatus = field(default_factory=FineTuneJobStatus)
    events: list[Event] = field(default_factory=list)


def result_state(result: TrainerResult) -> State | None:
    """The final state a trainer result announces; None for a retryable failure."""
    code = ExitCode(result.exit_code)
    meaning = EXIT_CODES[code]
    if code != ExitCode.SUCCEEDED and not meaning.permanent:
        return None
    return State(meaning.reason, result.message)


def _waiting_state(job: FineTuneJob, waiting: Waiting) -> State:
    message = f"the trainer pod cannot start: {waiting.message or waiting.reason}"
    named = [(name, field) for name, field, _ in job.spec.secrets()]
    if job.spec.model.token_secret:
        named.append((job.spec.model.token_secret.name, "spec.model.tokenSecret"))
    missing = [name_field for name_field in named if f'"{name_field[0]}"' in message]
    if waiting.reason == "CreateContainerConfigError" and missing:
        name, field = missing[0]
        message += (
            f"; create the Secret {name!r} in namespace {job.metadata.namespace} or fix {field}"
        )
    elif waiting.reason == "ImagePullBackOff":
        message += "; check spec.image (or the operator's trainer image) and imagePullSecrets"
    return State(waiting.reason, message)


def _state(job: FineTuneJob, observed: Observed) -> State:
    spec = job.spec
    current = observed.job
    result = observed.result
    if current is None:
        if result is not None and (final := result_state(result)) is not None:
            return final  # the Job is gone, its result.json says how the run ended
        if spec.suspend:
            return State("Suspended", "spec.suspend is true")
        if spec.queue_name:
            return State("Queued", f"waiting in queue {spec.queue_name}")
        return State("Pending", "waiting for the trainer pod to start")
    if current.complete:
        return State("Succeeded", result.message if result else "the trainer finished")
    if current.failed_reason:
        if result is not None and (final := result_state(result)) is not None:
            return final
        if current.failed_reason in ("BackoffLimitExceeded", "DeadlineExceeded"):
            detail = f": {result.message}" if result and result.message else ""
            return State(
                current.failed_reason, (current.failed_message or current.failed_reason) + detail
            )
        return State("TrainerFailed", result.message if result else current.failed_message)
    if spec.suspend:
        return State("Suspended", "spec.suspend is true")
    if current.suspended:
        if spec.queue_name:
            return State("Queued", f"waiting in queue {spec.queue_name}")
        return State("Pending", "the Job is suspended")
    if observed.trainer_running:
        # The baseline evaluation comes before training and shows as Running.
        return State("Evaluating" if observed.stage in EVALUATING_STAGES else "Running")
    if observed.waiting is not None:
        return _waiting_state(job, observed.waiting)
    return State("Pending", "waiting for the trainer pod to start")


def _progress(observed: Observed, kept: Progress | None, running: bool) -> Progress | None:
    """A new reading only when it says something new: updatedAt alone is not progress."""
    new = observed.progress if running else None
    if new is None:
        return kept
    if kept is not None and new.model_copy(update={"updated_at": kept.updated_at}) == kept:
        return kept
    return new


def _distributed(
    job: FineTuneJob, observed: Observed, kept: DistributedStatus | None
) -> DistributedStatus | None:
    """The shape of a run of several processes, with its pods' phases (kept once they are
    gone: a finished run's pods go with its Job)."""
    spec = job.spec
    if spec is None or (strategy := spec.strategy()) is None:
        return None
    pods = list(observed.pods) or (kept.pods if kept else [])
    return DistributedStatus(
        nodes=spec.nodes(), world_size=spec.world_size(), strategy=strategy, pods=pods
    )


def _status(
    job: FineTuneJob,
    observed: Observed,
    state: State,
    run_id: str,
    now: datetime,
    error: State | None,
    template: RunTemplate,
    config_hash: str | None = None,
) -> FineTuneJobStatus:
    previous = job.status or FineTuneJobStatus()
    generation = job.metadata.generation
    conditions = conditions_for(state, previous.conditions, generation, now, error)
    final = state.succeeded or state.failed
    same_run = previous.run_id == run_id
    result = observed.result if final else None
    kept = previous if same_run else FineTuneJobStatus()
    current = observed.job
    gates = list(result.gates) if result else (kept.gates if final else [])
    # Set once: SuccessCriteriaMet (or FailureTarget) comes first, Complete's time a moment later.
    completion = kept.completion_time or (current.completion_time if current else None)
    # When training started: the trainer container, not the Job (a pod may wait for a GPU).
    start_time = (
        kept.start_time
        or observed.trainer_started
        or (current.start_time if final and current else None)
    )
    progress = _progress(observed, kept.progress, state.running)
    status = FineTuneJobStatus(
        phase=phase_of(conditions),
        conditions=conditions,
        observed_generation=generation,
        run_id=run_id,
        attempts=max(observed.pods_started, kept.attempts),
        job_name=current.name
        if current
        else (kept.job_name or child_name(job.metadata.name, run_id)),
        profile=template.profile or kept.profile,
        config_hash=config_hash or observed.config_hash or kept.config_hash,
        start_time=start_time,
        completion_time=completion if final else None,
        progress=progress,
        distributed=_distributed(job, observed, kept.distributed),
        metrics=result.metrics if result else kept.metrics,
        gates=gates,
        gates_summary=gates_summary(gates),
        artifacts=result.artifacts if result else (kept.artifacts if final else None),
        promotion=_promotion(job, result, kept) if state.succeeded else None,
        message=state.message or None,
    )

    def usage(refresh: bool) -> Usage | None:
        return account(
            kept.usage,
            observed.pod_runs,
            now=now,
            refresh=refresh,
            tokens=result.tokens
            if result and result.tokens is not None
            else (progress.tokens if progress and state.running else None),
            started=start_time,
            ended=completion if final else None,
            pricing=template.pricing,
        )

    # The running pods are counted up to now whenever the status is written anyway, never as
    # the only change (that would write every running job's status on every reconcile).
    status.usage = usage(refresh=False)
    if _dump(status) != _dump(previous):
        status.usage = usage(refresh=True)
    return status


def _dump(status: FineTuneJobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def _promotion(
    job: FineTuneJob, result: TrainerResult | None, kept: FineTuneJobStatus
) -> PromotionStatus | None:
    """Set once, when the run ends promoted (its notification, if any, goes on from there)."""
    if kept.promotion is not None:
        return kept.promotion
    if result is None or not result.promoted:
        return None
    notify = job.spec.notify
    return PromotionStatus(
        latest_uri=latest_uri(job.spec.output.uri),
        promoted_at=result.promoted_at,
        previous_run_id=result.previous_run_id,
        notification=NotificationStatus(id=result.run_id, state="Pending")
        if notify is not None and notify.webhook is not None
        else None,
    )


def decide(
    job: FineTuneJob,
    observed: Observed,
    settings: OperatorSettings,
    now: datetime,
    *,
    refusal: State | None = None,
    run_id: str | None = None,
    error: State | None = None,
    denied: State | None = None,
    template: RunTemplate = NO_PROFILE,
) -> Decision:
    """What to do for job given what exists.

    refusal: why the run may not start (InvalidSpec, PolicyViolation); it applies only while
    the run has no Job. For a spec that cannot be parsed at all, `job` is built with
    `FineTuneJob.model_construct` (metadata and status only) and refusal is set.
    run_id: the run the spec asks for (observe.current_run_id), by default this generation's.
    error: the operator's own trouble (its RBAC, a missing API), shown as ReconcileError; the
    decision then changes nothing but the status (the caller retries with backoff).
    denied: the API server refused a child built from the spec (AdmissionDenied): the refusal
    of the run, and nothing is created again.
    template: what the run's pods get beyond the spec (its profile's: kubetune.admission).
    """
    refusal = denied or refusal
    run_id = run_id or make_run_id(job.metadata.uid or "", job.metadata.generation or 0)
    previous = job.status or FineTuneJobStatus()
    same_run = previous.run_id == run_id
    decision = Decision(delete=list(observed.stale))
    current = observed.job
    finished = same_run and previous.phase in FINAL_PHASES
    kept = state_of(previous.conditions) if same_run else None
    if finished and kept is not None:
        state = kept  # whatever happened to its Job since: the TTL, a deletion, a pod GC
    elif refusal is not None and (current is None or job.spec is None):
        state = refusal
        observed = Observed(stale=observed.stale)
    else:
        state = _state(job, observed)
        spec = job.spec
        ended = finished or state.succeeded or state.failed
        if current is None and not ended and not (spec.suspend and spec.queue_name):
            if not observed.configmap:
                decision.create.append(build_configmap(job, run_id, settings, template))
            if spec.nodes() > 1 and not observed.service:
                decision.create.append(build_service(job, run_id, template))
            decision.create.append(build_job(job, run_id, settings, template))
        elif current is not None and not ended and not current.deleting:
            own = ("ConfigMap", child_name(job.metadata.name, run_id))
            if not observed.configmap and own in observed.stale:
                # Someone else's under the run's name, deleted now (finetunejob_controller.py):
                # the operator's goes back, for a restarted pod to mount. (One that merely
                # vanished, as when the garbage collector removes a deleted job's children, is
                # left gone.)
                decision.create.append(build_configmap(job, run_id, settings, template))
            if spec.queue_name and spec.suspend:
                # Kueue owns a queued Job's suspend flag (it unsuspends what it admitted), so a
                # suspended run gives its Job back; the run, its ConfigMap and checkpoints stay.
                decision.delete.append(("Job", current.name))
            elif not spec.queue_name and current.suspended != spec.suspend:
                decision.set_suspend = spec.suspend
    if kept is not None:
        new_attempt = observed.pods_started > previous.attempts
        if forbidden(previous.phase, state.phase, new_attempt):
            state = kept
    if denied is not None or error is not None:
        decision.create.clear()
    if error is not None:
        decision.delete.clear()
        decision.set_suspend = None
    written = [data_hash(obj) for obj in decision.create if obj["kind"] == "ConfigMap"]
    decision.status = _status(
        job, observed, state, run_id, now, error, template, written[0] if written else None
    )
    changed = decision.status.phase != previous.phase or (kept and kept.reason) != state.reason
    if changed or not same_run:
        kind = "Warning" if state.failed or state.waiting else "Normal"
        message = state.message or f"run {run_id} is {decision.status.phase}"
        decision.events.append(Event(kind, state.reason, message))
        result = observed.result
        promotion = decision.status.promotion
        if promotion is not None and (previous.promotion is None or not same_run):
            artifacts = decision.status.artifacts
            where = (
                f"; adapter {artifacts.adapter_uri}" if artifacts and artifacts.adapter_uri else ""
            )
            decision.events.append(
                Event("Normal", "Promoted", f"run {run_id} promoted: {promotion.latest_uri}{where}")
            )
        if (state.succeeded or state.failed) and result is not None:
            # What the user should know about the numbers (e.g. a test set that overlaps the
            # training data), once, when the run ends.
            decision.events += [Event("Warning", "TrainerWarning", w) for w in result.warnings]
    return decision
