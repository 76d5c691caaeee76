"""The reconcile decision: parsed FineTuneJob + what exists -> what to change + the new status.

Pure and level-based: the same inputs give the same decision, whatever event led here, so the
operator can call it on create, update, resume, child events and timers alike. The I/O layer
reduces the cluster to an `Observed` and carries out the `Decision`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune.api import (
    ExitCode,
    FineTuneJob,
    FineTuneJobStatus,
    Progress,
    TrainerResult,
    child_name,
    make_run_id,
)
from kubetune.controller.build import build_configmap, build_job
from kubetune.controller.conditions import State, conditions_for, phase_of
from kubetune.controller.settings import OperatorSettings


@dataclass(frozen=True)
class ObservedJob:
    """The batch/v1 Job of the current run, reduced to what the decision needs."""

    name: str
    suspended: bool = False
    active: int = 0
    complete: bool = False
    failed_reason: str | None = None  # the Job's Failed condition reason, when it failed
    failed_message: str = ""
    start_time: datetime | None = None
    completion_time: datetime | None = None


@dataclass(frozen=True)
class Observed:
    job: ObservedJob | None = None  # the current run's Job
    configmap: bool = False  # the current run's ConfigMap exists
    stale: tuple[tuple[str, str], ...] = ()  # (kind, name) of children of older runs
    pods_started: int = 0  # trainer pods seen for the current run
    result: TrainerResult | None = None  # from the newest terminated pod's termination message
    progress: Progress | None = None  # from the trainer's metrics, while it runs
    stage: str | None = None  # the trainer's pipeline stage, from its metrics


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


_EXIT_REASONS = {
    int(ExitCode.INVALID_SPEC): "InvalidSpec",
    int(ExitCode.DATA_ERROR): "DataError",
    int(ExitCode.GATES_FAILED): "GatesFailed",
}


def _state(job: FineTuneJob, observed: Observed) -> State:
    spec = job.spec
    current = observed.job
    result = observed.result
    if current is None:  # being created now: the same state as a Job whose pod is not up yet
        if spec.suspend:
            return State("Suspended", "spec.suspend is true")
        if spec.queue_name:
            return State("Queued", f"waiting in queue {spec.queue_name}")
        return State("Pending", "waiting for the trainer pod to start")
    if current.complete:
        return State("Succeeded", result.message if result else "the trainer finished")
    if current.failed_reason:
        if result is not None and int(result.exit_code) in _EXIT_REASONS:
            return State(_EXIT_REASONS[int(result.exit_code)], result.message)
        if current.failed_reason in ("BackoffLimitExceeded", "DeadlineExceeded"):
            detail = f": {result.message}" if result and result.message else ""
            return State(
                current.failed_reason, (current.failed_message or current.failed_reason) + detail
            )
        return State("TrainerFailed", result.message if result else current.failed_message)
    if spec.suspend:
        return State("Suspended", "spec.suspend is true")
    if current.suspended:
        return State(
            "Queued" if spec.queue_name else "Pending",
            f"waiting in queue {spec.queue_name}" if spec.queue_name else "",
        )
    if current.active:
        # The baseline evaluation comes before training and shows as Running.
        return State("Evaluating" if observed.stage in ("evaluate", "export") else "Running")
    return State("Pending", "waiting for the trainer pod to start")


def _status(
    job: FineTuneJob, observed: Observed, state: State, run_id: str, now: datetime
) -> FineTuneJobStatus:
    previous = job.status or FineTuneJobStatus()
    generation = job.metadata.generation
    conditions = conditions_for(state, previous.conditions, generation, now)
    result = observed.result if (state.succeeded or state.failed) else None
    current = observed.job
    same_run = previous.run_id == run_id
    kept = previous.progress if same_run else None
    # Progress is read on the poll timer only; other reconciles keep the last reading.
    progress = (observed.progress or kept) if state.running else kept
    gates = list(result.gates) if result else []
    return FineTuneJobStatus(
        phase=phase_of(conditions),
        conditions=conditions,
        observed_generation=generation,
        run_id=run_id,
        attempts=max(observed.pods_started, previous.attempts if same_run else 0),
        job_name=current.name if current else child_name(job.metadata.name, run_id),
        start_time=current.start_time if current else None,
        completion_time=current.completion_time
        if current and (state.succeeded or state.failed)
        else None,
        progress=progress,
        metrics=result.metrics if result else (previous.metrics if same_run else None),
        gates=gates,
        gates_summary=f"{sum(g.passed for g in gates)}/{len(gates)} passed" if gates else None,
        artifacts=result.artifacts if result else None,
        message=state.message or None,
    )


def decide(
    job: FineTuneJob,
    observed: Observed,
    settings: OperatorSettings,
    now: datetime,
    problems: list[str] | None = None,
    run_id: str | None = None,
) -> Decision:
    """What to do for job given what exists. problems: policy violations found by the caller;
    run_id: the run the spec asks for (observe.current_run_id), by default this generation's."""
    run_id = run_id or make_run_id(job.metadata.uid or "", job.metadata.generation or 0)
    decision = Decision(delete=list(observed.stale))
    if problems:
        state = State("InvalidSpec", "; ".join(problems))
        observed = Observed(stale=observed.stale)
    else:
        if not observed.configmap:
            decision.create.append(build_configmap(job, run_id, settings))
        if observed.job is None:
            decision.create.append(build_job(job, run_id, settings))
        elif (
            not job.spec.queue_name
            and observed.job.suspended != job.spec.suspend
            and not (observed.job.complete or observed.job.failed_reason)
        ):
            decision.set_suspend = job.spec.suspend
        state = _state(job, observed)
    decision.status = _status(job, observed, state, run_id, now)
    previous = job.status or FineTuneJobStatus()
    if decision.status.phase != previous.phase or previous.run_id != run_id:
        kind = "Warning" if state.failed else "Normal"
        message = state.message or f"run {run_id} is {decision.status.phase}"
        decision.events.append(Event(kind, state.reason, message))
    return decision


def decide_unparseable(
    uid: str,
    generation: int,
    previous: FineTuneJobStatus,
    stale: tuple[tuple[str, str], ...],
    problems: list[str],
    now: datetime,
) -> Decision:
    """For a FineTuneJob whose spec cannot be parsed at all (so `decide` has no job to read):
    InvalidSpec naming every problem, no run, children of earlier runs removed."""
    run_id = make_run_id(uid, generation)
    state = State("InvalidSpec", "; ".join(problems))
    conditions = conditions_for(state, previous.conditions, generation, now)
    status = FineTuneJobStatus(
        phase=phase_of(conditions),
        conditions=conditions,
        observed_generation=generation,
        run_id=run_id,
        message=state.message,
    )
    decision = Decision(delete=list(stale), status=status)
    if previous.phase != status.phase or previous.run_id != run_id:
        decision.events.append(Event("Warning", state.reason, state.message))
    return decision
