"""Conditions and the phase derived from them. Pure.

Three conditions describe a run:
- Ready: True once the run succeeded (gates passed, artifacts promoted); otherwise False with the
  reason the run is not there (Pending, Queued, Suspended, Running, Evaluating, or why it failed).
- Running: True while a trainer pod trains (reason Running) or evaluates (reason Evaluating).
- Failed: True when the run ended without promotion (InvalidSpec, DataError, GatesFailed,
  BackoffLimitExceeded, DeadlineExceeded).
- Stalled: the same as Failed, under the name kstatus (Flux's health checks) looks for.
A condition's lastTransitionTime changes only when its status flips.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubetune.api import Condition

FAILED_REASONS = frozenset(
    {
        "InvalidSpec",
        "DataError",
        "GatesFailed",
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        "TrainerFailed",
    }
)


@dataclass(frozen=True)
class State:
    """Where a run is: a reason from the list above and a short message."""

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


def _condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    previous: list[Condition],
    generation: int | None,
    now: datetime,
) -> Condition:
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
    state: State, previous: list[Condition], generation: int | None, now: datetime
) -> list[Condition]:
    def flag(kind: str, active: bool, idle_reason: str) -> Condition:
        reason, message = (state.reason, state.message) if active else (idle_reason, "")
        return _condition(kind, active, reason, message, previous, generation, now)

    ready = _condition(
        "Ready", state.succeeded, state.reason, state.message, previous, generation, now
    )
    return [
        ready,
        flag("Running", state.running, "NotRunning"),
        flag("Failed", state.failed, "NotFailed"),
        # kstatus (Flux, kubectl wait, cli-utils) reads Stalled=True as a terminal failure.
        flag("Stalled", state.failed, "NotStalled"),
    ]


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
