"""Conditions, the phase derived from them, and the transitions a run's phase may not make. Pure.

Five conditions describe a run:
- Ready: True once the run succeeded (gates passed, artifacts promoted); otherwise False with the
  reason the run is not there (Pending, Queued, Suspended, Running, Evaluating, why the trainer pod
  waits, or why the run failed).
- Running: True while a trainer container runs (reason Running) or evaluates (reason Evaluating).
- Failed: True when the run ended without promotion (see FAILED_REASONS).
- Stalled: the same as Failed, under the name kstatus (Flux's health checks) looks for.
- ReconcileError: True while the operator cannot act for a reason that is not the user's (its
  RBAC, a missing API, a full quota); it retries with backoff and the phase does not change.
A condition's lastTransitionTime changes only when its status flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubetune.api import EXIT_CODES, PHASES, Condition, ExitCode

# Why a run failed: the trainer's verdicts (the exit code table), the Job controller's, and the
# operator's refusals to start a run.
FAILED_REASONS = frozenset(
    {m.reason for code, m in EXIT_CODES.items() if code != ExitCode.SUCCEEDED}
    | {"BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy"}
    | {"InvalidSpec", "PolicyViolation", "AdmissionDenied"}
)
# Why a trainer pod waits, as the kubelet and the scheduler say it, or why the run cannot start
# yet (the FineTuneProfile it names does not exist yet, or one that may apply cannot be read by
# this operator): shown with phase Pending, as a Warning.
WAITING_REASONS = frozenset(
    {
        "ProfileNotFound",
        "ProfileUnreadable",
        "Unschedulable",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)

# Transitions a run's phase may not make: a finished run stays finished, and a trainer that
# started does not go back to waiting, nor an evaluation back to training, within one attempt.
# A new attempt (another trainer pod after a failure or preemption) starts the pipeline again, so
# the rows marked `per_attempt` do not hold across attempts. Suspending is always allowed.
FORBIDDEN: dict[str, frozenset[str]] = {
    "Succeeded": frozenset(PHASES) - {"Succeeded"},
    "Failed": frozenset(PHASES) - {"Failed"},
    "Evaluating": frozenset({"Running", "Pending", "Queued"}),
    "Running": frozenset({"Pending", "Queued"}),
}
PER_ATTEMPT = frozenset({"Evaluating", "Running"})


def forbidden(before: str | None, after: str, new_attempt: bool) -> bool:
    """Whether a run may not go from phase `before` to `after` (same run)."""
    if before is None or (new_attempt and before in PER_ATTEMPT):
        return False
    return after in FORBIDDEN.get(before, frozenset())


@dataclass(frozen=True)
class State:
    """Where a run is: a reason (see the module docstring) and a short message."""

    reason: str
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.reason == "Succeeded"

    @property
    def failed(self) -> bool:
        return self.reason in FAILED_REASONS

    @property
    def running(self) -> bool:
        return self.reason in ("Running", "Evaluating")

    @property
    def waiting(self) -> bool:
        return self.reason in WAITING_REASONS

    @property
    def phase(self) -> str:
        """The phase a status written for this state shows (what phase_of reads back from the
        conditions conditions_for writes)."""
        if self.failed:
            return "Failed"
        if self.succeeded:
            return "Succeeded"
        if self.running:
            return self.reason
        if self.reason in ("Queued", "Suspended"):
            return self.reason
        return "Pending"


def make_condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    previous: list[Condition],
    generation: int | None,
    now: datetime,
) -> Condition:
    """One condition (a run's, or a FineTuneSchedule's Ready and Stalled); its
    lastTransitionTime is kept from `previous` while its status stays the same."""
    value = "True" if status else "False"
    old = next((c for c in previous if c.type == kind), None)
    since = old.last_transition_time if old is not None and old.status == value else now
    return Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def conditions_for(
    state: State,
    previous: list[Condition],
    generation: int | None,
    now: datetime,
    error: State | None = None,
) -> list[Condition]:
    """The conditions for a run in `state`; `error` is the operator's own trouble, if any."""

    def flag(kind: str, active: bool, idle_reason: str, source: State = state) -> Condition:
        reason, message = (source.reason, source.message) if active else (idle_reason, "")
        return make_condition(kind, active, reason, message, previous, generation, now)

    ready = make_condition(
        "Ready", state.succeeded, state.reason, state.message, previous, generation, now
    )
    return [
        ready,
        flag("Running", state.running, "NotRunning"),
        flag("Failed", state.failed, "NotFailed"),
        # kstatus (Flux, kubectl wait, cli-utils) reads Stalled=True as a terminal failure.
        flag("Stalled", state.failed, "NotStalled"),
        flag("ReconcileError", error is not None, "NoError", error or state),
    ]


def state_of(conditions: list[Condition]) -> State | None:
    """The state a status was written for (Ready's reason and message), if it has one."""
    ready = next((c for c in conditions if c.type == "Ready"), None)
    return State(ready.reason, ready.message) if ready is not None else None


def phase_of(conditions: list[Condition]) -> str:
    """The phase, derived from the conditions alone."""
    by_type = {c.type: c for c in conditions}
    ready, running, failed = by_type.get("Ready"), by_type.get("Running"), by_type.get("Failed")
    if failed is not None and failed.status == "True":
        return "Failed"
    if ready is not None and ready.status == "True":
        return "Succeeded"
    if running is not None and running.status == "True":
        return "Evaluating" if running.reason == "Evaluating" else "Running"
    if ready is not None and ready.reason in ("Queued", "Suspended"):
        return ready.reason
    return "Pending"
