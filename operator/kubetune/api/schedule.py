"""The `FineTuneSchedule` resource: FineTuneJobs stamped from a template on a cron schedule.

Its fields mean what batch/v1 CronJob's mean (schedule, timeZone, startingDeadlineSeconds,
concurrencyPolicy, suspend, successful/failedJobsHistoryLimit; kubernetes.io/docs/concepts/
workloads/controllers/cron-jobs/), with one deliberate difference: concurrencyPolicy defaults to
Forbid, not Allow, since two runs of one template train on the same GPUs' budget and race to
promote into the same output. Its controller is controller/schedule_controller.py (deciding:
controller/schedules.py); `stamp` makes a run from it for the operator, `kubetune validate` and
`kubetune run` alike.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from kubetune.api.base import ApiModel, Rule
from kubetune.api.promotion import Rollback
from kubetune.api.resource import API_VERSION, KIND, MAX_DISTRIBUTED_NAME_LENGTH, ObjectMeta
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import Condition, Phase, StatusModel
from kubetune.api.types import MAX_NAME_LENGTH, DnsSubdomain
from kubetune.api.wire import SCHEDULE_LABEL, SCHEDULED_TIME_ANNOTATION

SCHEDULE_KIND = "FineTuneSchedule"
SCHEDULE_PLURAL = "finetuneschedules"
SCHEDULE_SINGULAR = "finetuneschedule"
SCHEDULE_SHORT_NAMES = ("fts",)

# A stamped FineTuneJob is <schedule>-<minutes since the epoch of its scheduled time>, as the
# CronJob controller names its Jobs (getJobName in pkg/controller/cronjob/utils.go): the same
# scheduled time always gives the same name, so creating it twice is harmless. 8 digits last
# until the year 2160.
STAMP_DIGITS = 8
MAX_SCHEDULE_NAME_LENGTH = MAX_NAME_LENGTH - 1 - STAMP_DIGITS
MAX_DISTRIBUTED_SCHEDULE_NAME_LENGTH = MAX_DISTRIBUTED_NAME_LENGTH - 1 - STAMP_DIGITS

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_TZ_IN_SCHEDULE = re.compile(r"^\s*(CRON_)?TZ=")


def check_cron(expression: str) -> str:
    """A standard cron expression (5 fields) or one of MACROS, as the CronJob API accepts it."""
    from croniter import croniter

    if _TZ_IN_SCHEDULE.match(expression):
        raise ValueError("TZ= and CRON_TZ= are not supported in schedule; set timeZone instead")
    fields = expression.split()
    if expression.startswith("@"):
        if expression.strip() not in MACROS:
            raise ValueError(f"{expression!r} is not one of {', '.join(MACROS)}")
        return expression.strip()
    if len(fields) != 5:
        raise ValueError(
            f"{expression!r} has {len(fields)} fields; a schedule has 5 (minute hour "
            "day-of-month month day-of-week, e.g. '0 3 * * 1': Mondays at 03:00) or is one of "
            + ", ".join(MACROS)
        )
    if not croniter.is_valid(expression):
        raise ValueError(f"{expression!r} is not a valid cron expression (e.g. '0 3 * * 1')")
    return " ".join(fields)


def _check_time_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not a time zone of the IANA database (e.g. Europe/Berlin, UTC)"
        ) from None
    return name


Cron = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(check_cron)]
TimeZone = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_check_time_zone)]


class TemplateMeta(ApiModel):
    """What a stamped FineTuneJob's metadata gets from the template."""

    labels: dict[str, str] = Field(
        default_factory=dict, description="labels are copied onto each stamped FineTuneJob."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="annotations are copied onto each stamped FineTuneJob."
    )


class FineTuneJobTemplate(ApiModel):
    """The FineTuneJob each scheduled time stamps."""

    metadata: TemplateMeta = Field(
        default_factory=TemplateMeta, description="metadata: labels and annotations."
    )
    spec: FineTuneJobSpec = Field(
        description=(
            "spec of each stamped FineTuneJob. A data URI ending in / names the newest file "
            "under that prefix when each run starts, so each run picks up fresh data."
        )
    )


class FineTuneScheduleSpec(ApiModel):
    """When to stamp FineTuneJobs from the template, and how many to keep."""

    schedule: Cron = Field(
        description=(
            "schedule in cron format (minute hour day-of-month month day-of-week) or @hourly, "
            "@daily, @weekly, @monthly, @yearly, read in timeZone."
        )
    )
    time_zone: TimeZone | None = Field(
        default=None,
        description="timeZone is an IANA time zone for the schedule (e.g. Europe/Berlin); UTC.",
    )
    starting_deadline_seconds: int | None = Field(
        default=None,
        ge=0,
        description=(
            "startingDeadlineSeconds: a scheduled time missed by more than this (the operator "
            "was down, or concurrencyPolicy Forbid held it back) is skipped; unset: a missed "
            "time is started late."
        ),
    )
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] = Field(
        default="Forbid",
        description=(
            "concurrencyPolicy when a scheduled time comes while a stamped run is still "
            "running: Forbid (the default) waits for it, Allow starts another, Replace deletes "
            "the running one and starts the new one."
        ),
    )
    suspend: bool = Field(
        default=False,
        description="suspend stops stamping new runs; runs already started go on.",
    )
    successful_jobs_history_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="successfulJobsHistoryLimit is how many Succeeded runs are kept.",
    )
    failed_jobs_history_limit: int = Field(
        default=1,
        ge=0,
        le=100,
        description="failedJobsHistoryLimit is how many Failed runs are kept.",
    )
    job_template: FineTuneJobTemplate = Field(
        description="jobTemplate is the FineTuneJob each scheduled time stamps."
    )


class ScheduledRun(StatusModel):
    """One stamped FineTuneJob, as its status says."""

    name: str = Field(description="name of the FineTuneJob.")
    scheduled_time: datetime | None = Field(
        default=None, description="scheduledTime is the time it was stamped for."
    )
    phase: Phase | None = Field(default=None, description="phase of the FineTuneJob.")
    run_id: str | None = Field(default=None, description="runId of its run.")
    gates_summary: str | None = Field(default=None, description="gatesSummary of its run.")
    completion_time: datetime | None = Field(default=None, description="completionTime of its run.")
    promoted: bool = Field(default=False, description="promoted is whether its run was promoted.")


class PromotedRun(StatusModel):
    """The stamped run promoted last, or the run a rollback made the promoted one again:
    latest.json names it unless another writer promoted since."""

    name: str = Field(description="name of the FineTuneJob.")
    run_id: str | None = Field(default=None, description="runId of the promoted run.")
    promoted_at: datetime | None = Field(default=None, description="promotedAt: when.")
    latest_uri: str | None = Field(default=None, description="latestUri is its latest.json.")
    rollback: Rollback | None = Field(
        default=None,
        description="rollback says who made this run the promoted one again, and why (`kubetune "
        "rollback`), as latest.json records it.",
    )


class FineTuneScheduleStatus(StatusModel):
    """What the schedule has done, written by the operator."""

    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="conditions: Ready says whether the schedule is valid and active.",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="observedGeneration is the spec generation last acted on."
    )
    last_schedule_time: datetime | None = Field(
        default=None, description="lastScheduleTime is the last time a run was stamped for."
    )
    last_successful_time: datetime | None = Field(
        default=None, description="lastSuccessfulTime is when a stamped run last succeeded."
    )
    next_schedule_time: datetime | None = Field(
        default=None, description="nextScheduleTime is the next time a run will be stamped for."
    )
    active: list[str] = Field(
        default_factory=list, description="active names the stamped runs not finished yet."
    )
    runs: list[ScheduledRun] = Field(
        default_factory=list,
        max_length=256,
        description="runs are the stamped FineTuneJobs kept, newest first.",
    )
    promoted: PromotedRun | None = Field(
        default=None, description="promoted is the stamped run promoted last (the champion)."
    )
    observed_rollback: str | None = Field(
        default=None,
        max_length=128,
        description="observedRollback is the kubetune.dev/rollback annotation last checked "
        "against latest.json.",
    )


def _check_schedule_name(name: str) -> str:
    if len(name) > MAX_SCHEDULE_NAME_LENGTH:
        raise ValueError(
            f"must be at most {MAX_SCHEDULE_NAME_LENGTH} characters: each stamped FineTuneJob "
            f"is named <name>-<{STAMP_DIGITS} digits> (this one has {len(name)})"
        )
    return name


class ScheduleMeta(ObjectMeta):
    """A schedule's metadata; its name leaves room for the stamp of its FineTuneJobs."""

    name: Annotated[DnsSubdomain, AfterValidator(_check_schedule_name)] = Field(
        description=(
            f"name of the FineTuneSchedule; at most {MAX_SCHEDULE_NAME_LENGTH} characters so "
            f"that <name>-<{STAMP_DIGITS} digits> is a valid FineTuneJob name."
        ),
    )


class FineTuneSchedule(ApiModel):
    """FineTuneJobs stamped from a template on a cron schedule: continuous retraining."""

    __rules__ = (
        Rule(
            cel=f"self.metadata.name.size() <= {MAX_SCHEDULE_NAME_LENGTH}",
            check=lambda s: len(s.metadata.name) <= MAX_SCHEDULE_NAME_LENGTH,
            message=(
                f"metadata.name must be at most {MAX_SCHEDULE_NAME_LENGTH} characters: each "
                f"stamped FineTuneJob is named <name>-<{STAMP_DIGITS} digits>"
            ),
        ),
        Rule(
            cel=(
                "!has(self.spec.jobTemplate.spec.resources.nodes) || "
                "self.spec.jobTemplate.spec.resources.nodes <= 1 || "
                f"(self.metadata.name.size() <= {MAX_DISTRIBUTED_SCHEDULE_NAME_LENGTH} && "
                "self.metadata.name.matches('^[a-z]'))"
            ),
            check=lambda s: (
                s.spec.job_template.spec.nodes() <= 1
                or (
                    len(s.metadata.name) <= MAX_DISTRIBUTED_SCHEDULE_NAME_LENGTH
                    and s.metadata.name[:1].isalpha()
                )
            ),
            message=(
                "metadata.name of a schedule whose runs have resources.nodes over 1 must start "
                f"with a letter and be at most {MAX_DISTRIBUTED_SCHEDULE_NAME_LENGTH} characters: "
                "its runs' pods are named <name>-<stamp>-<runId>-<index> (DNS labels)"
            ),
        ),
    )

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(
        alias="apiVersion", description="apiVersion is kubetune.dev/v1alpha1."
    )
    kind: Literal["FineTuneSchedule"] = Field(description="kind is FineTuneSchedule.")
    metadata: ScheduleMeta = Field(description="metadata is the standard object metadata.")
    spec: FineTuneScheduleSpec = Field(description="spec is when and what to stamp.")
    status: FineTuneScheduleStatus | None = Field(
        default=None, description="status is what the schedule has done."
    )


def stamp_name(schedule: str, scheduled: datetime) -> str:
    """The FineTuneJob stamped for a scheduled time: <schedule>-<minutes since the epoch>."""
    return f"{schedule}-{int(scheduled.timestamp()) // 60}"


def stamp(raw: dict[str, Any], scheduled: datetime) -> dict[str, Any]:
    """The FineTuneJob a FineTuneSchedule (`raw`, as stored or as written in a file) stamps for
    a scheduled time: the template as the user wrote it (the API server fills the defaults),
    named for the time, labelled as the schedule's, and, for a schedule on a cluster (one with
    a uid), owned by it. The one stamp: the operator's, `kubetune validate`'s and `kubetune
    run`'s."""
    meta = raw.get("metadata") or {}
    template = raw["spec"]["jobTemplate"]
    tmeta = template.get("metadata") or {}
    stamped: dict[str, Any] = {
        "name": stamp_name(meta["name"], scheduled),
        "labels": {**(tmeta.get("labels") or {}), SCHEDULE_LABEL: meta["name"]},
        "annotations": {
            **(tmeta.get("annotations") or {}),
            SCHEDULED_TIME_ANNOTATION: scheduled.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    if meta.get("namespace"):
        stamped["namespace"] = meta["namespace"]
    if meta.get("uid"):
        stamped["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": SCHEDULE_KIND,
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": stamped, "spec": template["spec"]}
