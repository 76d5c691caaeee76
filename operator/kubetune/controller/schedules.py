"""A FineTuneSchedule's decision: which FineTuneJobs to stamp and delete, and its status. Pure.

It does what the CronJob controller does for Jobs (kubernetes pkg/controller/cronjob,
cronjob_controllerv2.go `syncCronJob` and utils.go; kubernetes.io/docs/concepts/workloads/
controllers/cron-jobs/), reading the stamped FineTuneJobs' phases instead of Jobs' conditions:

- The due time is the most recent scheduled time (in spec.timeZone, UTC by default) after the
  last one a run was stamped for (status.lastScheduleTime, else the schedule's creation), and
  not more than startingDeadlineSeconds ago when that is set. Times missed meanwhile (the
  operator was down) are not made up: only the most recent one runs; over 100 missed is a
  TooManyMissedTimes Warning, as the CronJob controller's.
- A due time is stamped as `<schedule>-<minutes since the epoch>` (getJobName), so a time is
  never stamped twice, even by a reconcile that repeats after a crash.
- concurrencyPolicy: Forbid (our default) does not stamp while a stamped run is not finished, and
  keeps the time due (it starts when the run finishes, unless startingDeadlineSeconds has passed:
  then it is missed); Replace deletes the unfinished runs and stamps; Allow stamps.
- suspend stamps nothing; runs already stamped go on.
- The finished runs beyond successfulJobsHistoryLimit / failedJobsHistoryLimit are deleted,
  oldest first (their artifacts stay in object storage; the garbage collector removes their
  Jobs, pods and ConfigMaps).
- The next reconcile is due at the next scheduled time plus 100 ms (nextScheduleTimeDuration).

A rollback (`kubetune rollback SCHEDULE`) is the user's own write to latest.json; the user
annotates the schedule with what it wrote (kubetune.dev/rollback: <runId>@<promotedAt>). The
annotation is anyone's with `edit`, so it is a request to look, never a fact: the status shows
the rollback only when the output's latest.json (read by the controller, once per annotation
value) records that very rollback; otherwise a RollbackNotFound Warning says what latest.json
names.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from kubetune.api import (
    FINAL_PHASES,
    ROLLBACK_ANNOTATION,
    RUN_ID_LENGTH,
    SCHEDULED_TIME_ANNOTATION,
    Condition,
    FineTuneSchedule,
    FineTuneScheduleStatus,
    PromotionRecord,
    Rollback,
    describe_errors,
)
from kubetune.api.schedule import PromotedRun, ScheduledRun, stamp, stamp_name
from kubetune.controller.conditions import make_condition
from kubetune.controller.decide import Event
from kubetune.controller.observe import parse_time

TOO_MANY_MISSED = 100  # the CronJob controller's bound
MAX_ROLLBACK_ANNOTATION = 128  # status.observedRollback's bound
CLOCK_SKEW = timedelta(minutes=5)  # a rollback written by a laptop whose clock is ahead
# <runId>@<promotedAt> as kubetune rollback writes it: whole seconds, UTC.
ROLLBACK_VALUE = re.compile(rf"^([0-9a-f]{{{RUN_ID_LENGTH}}})@(\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")
MAX_JOB_NAME = 253  # a FineTuneJob's name, at most a DNS subdomain
REQUEUE_SLACK = timedelta(milliseconds=100)


@dataclass
class ScheduleDecision:
    """What to do for one FineTuneSchedule, and when to look again."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # FineTuneJob names
    status: FineTuneScheduleStatus = field(default_factory=FineTuneScheduleStatus)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # seconds


def scheduled_time(job: dict[str, Any]) -> datetime | None:
    meta = job.get("metadata") or {}
    stamped = (meta.get("annotations") or {}).get(SCHEDULED_TIME_ANNOTATION)
    return parse_time(stamped) or parse_time(meta.get("creationTimestamp"))


def _owned(raw: dict[str, Any], jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The FineTuneJobs this schedule stamped: its label and its controller ownerReference."""
    uid = (raw.get("metadata") or {}).get("uid")
    out = []
    for job in jobs:
        refs = (job.get("metadata") or {}).get("ownerReferences") or []
        if any(r.get("controller") and r.get("uid") == uid for r in refs):
            out.append(job)
    return out


def _phase(job: dict[str, Any]) -> str | None:
    return (job.get("status") or {}).get("phase")


def _next_after(expression: str, zone: zoneinfo.ZoneInfo, after: datetime) -> datetime | None:
    from croniter import CroniterBadDateError, croniter

    try:
        found = croniter(expression, after.astimezone(zone)).get_next(datetime)
    except CroniterBadDateError:  # e.g. '0 0 30 2 *': no such day
        return None
    return found.astimezone(UTC)


def due_times(
    expression: str, zone: zoneinfo.ZoneInfo, earliest: datetime, now: datetime
) -> tuple[datetime | None, int]:
    """The most recent scheduled time in (earliest, now], and how many there are (counted up to
    TOO_MANY_MISSED + 1)."""
    from croniter import CroniterBadDateError, croniter

    try:
        # get_prev is strictly before its start: start a second later so that a time equal to
        # now counts, then step back if that found one after now.
        probe = croniter(expression, (now + timedelta(seconds=1)).astimezone(zone))
        recent = probe.get_prev(datetime).astimezone(UTC)
        if recent > now:
            recent = probe.get_prev(datetime).astimezone(UTC)
    except CroniterBadDateError:
        return None, 0
    if recent <= earliest:
        return None, 0
    count, at = 0, earliest
    while count <= TOO_MANY_MISSED:
        step = _next_after(expression, zone, at)
        if step is None or step > now:
            break
        count, at = count + 1, step
    return recent, count


def _runs(jobs: list[dict[str, Any]]) -> list[ScheduledRun]:
    runs = []
    for job in jobs:
        status = job.get("status") or {}
        runs.append(
            ScheduledRun(
                name=job["metadata"]["name"],
                scheduled_time=scheduled_time(job),
                phase=status.get("phase"),
                run_id=status.get("runId"),
                gates_summary=status.get("gatesSummary"),
                completion_time=parse_time(status.get("completionTime")),
                promoted=bool(status.get("promotion")),
            )
        )
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: (r.scheduled_time or epoch, r.name), reverse=True)


def _promoted(jobs: list[dict[str, Any]], before: PromotedRun | None) -> PromotedRun | None:
    """The stamped run promoted last; kept after its FineTuneJob is deleted (history limits)."""
    best = before
    for job in jobs:
        promotion = (job.get("status") or {}).get("promotion") or {}
        at = parse_time(promotion.get("promotedAt"))
        if not promotion or at is None:
            continue
        if best is None or best.promoted_at is None or at > best.promoted_at:
            best = PromotedRun(
                name=job["metadata"]["name"],
                run_id=(job.get("status") or {}).get("runId"),
                promoted_at=at,
                latest_uri=promotion.get("latestUri"),
            )
    return best


def _history(jobs: list[dict[str, Any]], phase: str, keep: int) -> list[str]:
    """The finished runs of one phase beyond the limit, oldest first."""
    done = [j for j in jobs if _phase(j) == phase]
    epoch = datetime.min.replace(tzinfo=UTC)
    done.sort(key=lambda j: (scheduled_time(j) or epoch, j["metadata"]["name"]))
    return [j["metadata"]["name"] for j in done[: max(0, len(done) - keep)]]


def _ready(
    ok: bool,
    reason: str,
    message: str,
    previous: list[Condition],
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """Ready, and Stalled (what kstatus and Flux read as a failure) when the schedule cannot
    stamp until its spec changes."""
    stalled = (reason, message) if not ok else ("NotStalled", "")
    return [
        make_condition("Ready", ok, reason, message, previous, generation, now),
        make_condition("Stalled", not ok, *stalled, previous, generation, now),
    ]


def refused(
    decision: ScheduleDecision, raw: dict[str, Any], stamped: str, problem: str, now: datetime
) -> ScheduleDecision:
    """The decision once the API server refused the FineTuneJob stamped as `stamped` for good:
    no SuccessfulCreate but a FailedCreate Event, Ready=False and Stalled with the reason, and
    the run out of the status. The time stays used (lastScheduleTime): the next try is at the
    next time, by which the template may be fixed, not a retry loop against the same refusal."""
    status = decision.status.model_copy(
        update={
            "conditions": _ready(
                False,
                "FailedCreate",
                problem,
                decision.status.conditions,
                (raw.get("metadata") or {}).get("generation"),
                now,
            ),
            "runs": [r for r in decision.status.runs if r.name != stamped],
            "active": [n for n in decision.status.active if n != stamped],
        }
    )
    return replace(
        decision,
        create=[o for o in decision.create if o["metadata"]["name"] != stamped],
        events=[
            *(e for e in decision.events if e.reason != "SuccessfulCreate"),
            Event("Warning", "FailedCreate", problem),
        ],
        status=status,
    )


def decide_schedule(
    raw: dict[str, Any], jobs: list[dict[str, Any]], now: datetime
) -> ScheduleDecision:
    """What to do for the schedule `raw`, given the FineTuneJobs labelled as its (from the
    cache), at `now` (aware)."""
    decision = _decide(raw, jobs, now)
    gone = set(decision.delete)
    status = decision.status
    status.runs = [r for r in status.runs if r.name not in gone]
    status.active = [n for n in status.active if n not in gone]
    return decision


def _decide(raw: dict[str, Any], jobs: list[dict[str, Any]], now: datetime) -> ScheduleDecision:
    meta = raw.get("metadata") or {}
    generation = meta.get("generation")
    try:
        before = FineTuneScheduleStatus.model_validate(raw.get("status") or {})
    except ValidationError:  # garbage from another writer: start over
        before = FineTuneScheduleStatus()
    decision = ScheduleDecision()
    mine = _owned(raw, jobs)
    status = before.model_copy(
        update={
            "observed_generation": generation,
            "runs": _runs(mine),
            "active": sorted(j["metadata"]["name"] for j in mine if _phase(j) not in FINAL_PHASES),
            "promoted": _promoted(mine, before.promoted),
        }
    )
    finished = [
        t
        for j in mine
        if _phase(j) == "Succeeded"
        and (t := parse_time((j.get("status") or {}).get("completionTime")))
    ]
    if finished and (
        status.last_successful_time is None or max(finished) > status.last_successful_time
    ):
        status.last_successful_time = max(finished)
    decision.status = status
    if meta.get("deletionTimestamp"):
        return decision

    try:
        schedule = FineTuneSchedule.model_validate(raw, by_name=False)
    except ValidationError as exc:
        problems = "; ".join(describe_errors(exc, FineTuneSchedule)[:5])
        conditions = _ready(False, "InvalidSpec", problems, before.conditions, generation, now)
        if before.conditions != conditions:  # said once, not at every reconcile
            decision.events.append(Event("Warning", "InvalidSpec", problems))
        status.conditions = conditions
        status.next_schedule_time = None
        return decision
    spec = schedule.spec
    decision.delete += _history(mine, "Succeeded", spec.successful_jobs_history_limit)
    decision.delete += _history(mine, "Failed", spec.failed_jobs_history_limit)
    zone = zoneinfo.ZoneInfo(spec.time_zone or "UTC")
    upcoming = _next_after(spec.schedule, zone, now)
    status.next_schedule_time = None if spec.suspend else upcoming
    if upcoming is not None:
        decision.requeue_after = ((upcoming - now) + REQUEUE_SLACK).total_seconds()

    if spec.suspend:
        decision.requeue_after = None
        status.conditions = _ready(
            True,
            "Suspended",
            "suspended: no new runs are stamped",
            before.conditions,
            generation,
            now,
        )
        return decision
    if upcoming is None and before.last_schedule_time is None:
        message = f"schedule {spec.schedule!r} never comes (no such date)"
        status.conditions = _ready(
            False, "InvalidSpec", message, before.conditions, generation, now
        )
        return decision

    created = parse_time(meta.get("creationTimestamp")) or now
    earliest = before.last_schedule_time or created
    if spec.starting_deadline_seconds is not None:
        earliest = max(earliest, now - timedelta(seconds=spec.starting_deadline_seconds))
    due, missed = due_times(spec.schedule, zone, earliest, now)
    message = f"next run at {upcoming:%Y-%m-%dT%H:%M:%SZ}" if upcoming else "no next run"
    status.conditions = _ready(True, "Scheduled", message, before.conditions, generation, now)
    if due is None:
        return decision
    if missed > TOO_MANY_MISSED:
        decision.events.append(
            Event(
                "Warning",
                "TooManyMissedTimes",
                f"too many missed start times (> {TOO_MANY_MISSED}); starting only the most "
                "recent. Set or decrease spec.startingDeadlineSeconds or check clock skew",
            )
        )
    name = stamp_name(meta["name"], due)
    if any(j["metadata"]["name"] == name for j in mine):  # stamped already (a repeat)
        status.last_schedule_time = due
        return decision
    unfinished = [j["metadata"]["name"] for j in mine if _phase(j) not in FINAL_PHASES]
    unfinished = [n for n in unfinished if n not in decision.delete]
    if unfinished and spec.concurrency_policy == "Forbid":
        decision.events.append(
            Event(
                "Normal",
                "JobAlreadyActive",
                f"not stamping the run for {due:%Y-%m-%dT%H:%M:%SZ}: {', '.join(unfinished)} "
                "is still running and concurrencyPolicy is Forbid; it starts when that one "
                "finishes"
                + (
                    f", unless {spec.starting_deadline_seconds} s (startingDeadlineSeconds) "
                    "have passed by then"
                    if spec.starting_deadline_seconds is not None
                    else ""
                ),
            )
        )
        return decision
    if unfinished and spec.concurrency_policy == "Replace":
        for old in unfinished:
            decision.delete.append(old)
            decision.events.append(
                Event("Normal", "SuccessfulDelete", f"deleted unfinished run {old} (Replace)")
            )
    decision.create.append(stamp(raw, due))
    decision.events.append(
        Event(
            "Normal", "SuccessfulCreate", f"stamped FineTuneJob {name} for {due:%Y-%m-%dT%H:%M:%SZ}"
        )
    )
    status.last_schedule_time = due
    status.active = sorted({*status.active, name})
    status.runs = [ScheduledRun(name=name, scheduled_time=due), *status.runs]
    return decision


def rollback_time(value: str) -> tuple[str, datetime] | None:
    """(runId, promotedAt) of an annotation in the form kubetune rollback writes, else None."""
    match = ROLLBACK_VALUE.match(value)
    if match is None:
        return None
    try:
        return match.group(1), datetime.strptime(match.group(2), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=UTC
        )
    except ValueError:  # a month 13, a 25th hour: not a time
        return None


def rollback_annotation(schedule: dict[str, Any]) -> Any:
    return ((schedule.get("metadata") or {}).get("annotations") or {}).get(ROLLBACK_ANNOTATION)


def rollback_to_check(raw: dict[str, Any]) -> str | None:
    """The schedule's kubetune.dev/rollback annotation when it was not checked yet (against
    status.observedRollback, which holds at most its first 128 characters)."""
    value = rollback_annotation(raw)
    if not isinstance(value, str) or not value:
        return None
    observed = (raw.get("status") or {}).get("observedRollback")
    return value if value[:MAX_ROLLBACK_ANNOTATION] != observed else None


def rollback_output(raw: dict[str, Any]) -> tuple[str, str | None] | None:
    """(output URI, its credentialsSecret) of the schedule's template, or None when the spec
    has none to read (an invalid schedule says why in its own status)."""
    spec = (raw.get("spec") or {}).get("jobTemplate") or {}
    output = ((spec.get("spec") or {}).get("output")) or {}
    uri, secret = output.get("uri"), output.get("credentialsSecret")
    if not isinstance(uri, str) or not uri:
        return None
    return uri, secret if isinstance(secret, str) and secret else None


def rolled_back(
    decision: ScheduleDecision,
    value: str,
    output: str | None,
    record: PromotionRecord | None,
    now: datetime,
) -> ScheduleDecision:
    """The decision once the annotation `value` was checked against `record`, the output's
    latest.json as read (None: not there or not readable). The status names the run rolled back
    to only when latest.json records that rollback; either way the value is observed, so it is
    checked once."""
    status = decision.status.model_copy(
        update={"observed_rollback": value[:MAX_ROLLBACK_ANNOTATION]}
    )
    parsed = rollback_time(value)
    latest = f"{output.rstrip('/')}/latest.json" if output else "the schedule's output"
    found = _not_recorded(record, parsed, now) if parsed else None
    if parsed is None:
        problem = (
            f"annotation {ROLLBACK_ANNOTATION} is not <runId>@<promotedAt> as kubetune "
            "rollback writes it: ignored"
        )
        event = Event("Warning", "RollbackNotFound", problem)
    elif found or record is None or record.rollback is None:
        problem = (
            f"annotation {ROLLBACK_ANNOTATION} names run {parsed[0]} rolled back to at "
            f"{_when(parsed[1])}, but {latest} {found}: the status does not show it"
        )
        event = Event("Warning", "RollbackNotFound", problem)
    else:
        # latest.json is the bucket's: what reaches the status is bounded.
        back = Rollback(
            by=record.rollback.by[:256],
            reason=record.rollback.reason[:1024] if record.rollback.reason else None,
            from_run_id=record.rollback.from_run_id[:64],
        )
        names = [r.name for r in status.runs if r.run_id == record.run_id]
        job = record.job if record.job and len(record.job) <= MAX_JOB_NAME else ""
        status.promoted = PromotedRun(
            name=names[0] if names else job,
            run_id=record.run_id,
            promoted_at=record.promoted_at,
            latest_uri=latest,
            rollback=back,
        )
        why = f": {back.reason[:200]}" if back.reason else ""
        event = Event(
            "Normal",
            "RolledBack",
            f"{latest} says run {record.run_id} is the promoted run again (replacing run "
            f"{back.from_run_id}), rolled back by {back.by}{why}",
        )
    return replace(decision, status=status, events=[*decision.events, event])


def _not_recorded(
    record: PromotionRecord | None, parsed: tuple[str, datetime], now: datetime
) -> str | None:
    """What latest.json (`record`) says instead of the rollback the annotation names, or None
    when it records that very rollback. Its run id is the bucket's text: shown cut short."""
    if record is None:
        return "cannot be read (see the operator's log) or is not there"
    shown = record.run_id[: RUN_ID_LENGTH * 2]
    if record.rollback is None:
        return f"names run {shown}, promoted by a run, not by a rollback"
    if (record.run_id, record.promoted_at) != parsed:
        return f"names run {shown}, rolled back to at {_when(record.promoted_at)}"
    if parsed[1] > now + CLOCK_SKEW:  # it would outrank every later promotion
        return f"dates it in the future ({_when(parsed[1])})"
    return None


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else "an unknown time"
