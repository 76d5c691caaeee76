"""FineTuneSchedule decisions on a fake clock: the times a run is stamped for, missed times and
startingDeadlineSeconds, each concurrencyPolicy, history limits, suspend, and the status (the
runs kept, the promoted one). decide_schedule is pure; `Cluster` plays the API server and the
stamped runs' phases."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.api import ROLLBACK_ANNOTATION, PromotionRecord, Rollback, stamp_name
from kubetune.controller import schedule_controller
from kubetune.controller.errors import Retry
from kubetune.controller.schedules import decide_schedule, refused

TEMPLATE_SPEC = {
    "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"uri": "s3://data/reviews/"},
    "method": {"type": "lora"},
    "output": {"uri": "s3://models/ml/reviews"},
}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


class Cluster:
    """One schedule and the FineTuneJobs it stamped, as the API server would keep them."""

    def __init__(self, created: str, **spec: Any) -> None:
        self.schedule: dict[str, Any] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneSchedule",
            "metadata": {
                "name": "reviews",
                "namespace": "ml",
                "uid": "uid-s",
                "generation": 1,
                "creationTimestamp": created,
            },
            "spec": {
                "jobTemplate": {"metadata": {"labels": {"team": "a"}}, "spec": TEMPLATE_SPEC},
                **spec,
            },
        }
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[str, str]] = []
        self.requeue_after: float | None = None

    def tick(self, now: str) -> list[str]:
        """One reconcile at `now`; returns the names stamped."""
        decision = decide_schedule(self.schedule, list(self.jobs.values()), at(now))
        for name in decision.delete:
            self.jobs.pop(name, None)
        for job in decision.create:
            job = copy.deepcopy(job)
            job["metadata"]["creationTimestamp"] = now
            self.jobs[job["metadata"]["name"]] = job
        self.schedule["status"] = decision.status.model_dump(by_alias=True, mode="json")
        self.events += [(e.reason, e.message) for e in decision.events]
        self.requeue_after = decision.requeue_after
        return [j["metadata"]["name"] for j in decision.create]

    def finish(self, name: str, phase: str, when: str, promoted: bool = False) -> None:
        status: dict[str, Any] = {"phase": phase, "completionTime": when, "runId": name[-4:]}
        if promoted:
            status["promotion"] = {
                "latestUri": "s3://models/ml/reviews/latest.json",
                "promotedAt": when,
            }
        self.jobs[name]["status"] = status

    def run(self, name: str) -> None:
        self.jobs[name]["status"] = {"phase": "Running"}

    @property
    def status(self) -> dict[str, Any]:
        return self.schedule["status"]


def test_stamps_at_the_scheduled_time_in_its_time_zone() -> None:
    # Mondays at 03:00 in Berlin (UTC+1 in November): 02:00 UTC.
    c = Cluster("2026-11-20T12:00:00Z", schedule="0 3 * * 1", timeZone="Europe/Berlin")
    assert c.tick("2026-11-20T12:00:01") == []
    assert c.status["nextScheduleTime"] == "2026-11-23T02:00:00Z"
    assert c.requeue_after == pytest.approx(
        (at("2026-11-23T02:00:00") - at("2026-11-20T12:00:01")).total_seconds() + 0.1
    )
    assert c.tick("2026-11-23T01:59:59") == []
    (name,) = c.tick("2026-11-23T02:00:00")
    assert (
        name
        == stamp_name("reviews", at("2026-11-23T02:00:00"))
        == f"reviews-{int(at('2026-11-23T02:00:00').timestamp()) // 60}"
    )
    assert c.status["lastScheduleTime"] == "2026-11-23T02:00:00Z"
    assert c.status["active"] == [name] and c.status["runs"][0]["name"] == name
    assert c.status["nextScheduleTime"] == "2026-11-30T02:00:00Z"
    # A reconcile that repeats (a crash after the create) stamps nothing more.
    assert c.tick("2026-11-23T02:00:05") == []
    assert ("SuccessfulCreate", f"stamped FineTuneJob {name} for 2026-11-23T02:00:00Z") in c.events

    job = c.jobs[name]
    assert job["metadata"]["labels"] == {"team": "a", "kubetune.dev/schedule": "reviews"}
    assert job["metadata"]["annotations"] == {"kubetune.dev/scheduled-time": "2026-11-23T02:00:00Z"}
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "name": "reviews",
        "uid": "uid-s",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert job["spec"] == TEMPLATE_SPEC  # as written: the API server fills the defaults


def test_daylight_saving_time_keeps_the_local_hour() -> None:
    # Berlin moves to UTC+2 on 2026-03-29: 03:00 local is 02:00 UTC before, 01:00 UTC after.
    c = Cluster(
        "2026-03-27T12:00:00Z",
        schedule="0 3 * * *",
        timeZone="Europe/Berlin",
        concurrencyPolicy="Allow",
    )
    assert c.tick("2026-03-28T02:00:00") != []
    assert c.tick("2026-03-29T01:00:00") != []  # 03:00 CEST
    assert c.status["nextScheduleTime"] == "2026-03-30T01:00:00Z"


def test_missed_times_start_only_the_most_recent() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="@daily")
    # The operator was down for three days: one run, for the most recent midnight.
    (name,) = c.tick("2026-11-04T10:00:00")
    assert name == stamp_name("reviews", at("2026-11-04T00:00:00"))
    assert not [e for e in c.events if e[0] == "TooManyMissedTimes"]

    every_minute = Cluster("2026-11-01T00:00:30Z", schedule="* * * * *", concurrencyPolicy="Allow")
    (name,) = every_minute.tick("2026-11-01T03:00:30")  # 180 missed
    assert name == stamp_name("reviews", at("2026-11-01T03:00:00"))
    assert [e[0] for e in every_minute.events if e[0] == "TooManyMissedTimes"] == [
        "TooManyMissedTimes"
    ]


def test_starting_deadline_skips_a_time_missed_by_too_much() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *", startingDeadlineSeconds=300)
    assert c.tick("2026-11-01T01:06:00") == []  # 01:00 missed by 6 minutes > 5
    assert c.tick("2026-11-01T02:04:59") != []  # 02:00 within the deadline


def test_forbid_holds_the_time_until_the_run_finishes() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *")  # Forbid is the default
    (first,) = c.tick("2026-11-01T01:00:00")
    c.run(first)
    assert c.tick("2026-11-01T02:00:00") == []
    assert any(r == "JobAlreadyActive" for r, _ in c.events)
    assert c.status["lastScheduleTime"] == "2026-11-01T01:00:00Z"
    # The run finishes: the held 02:00 starts now (no startingDeadlineSeconds).
    c.finish(first, "Succeeded", "2026-11-01T02:20:00Z")
    (second,) = c.tick("2026-11-01T02:20:01")
    assert second == stamp_name("reviews", at("2026-11-01T02:00:00"))
    assert c.status["lastSuccessfulTime"] == "2026-11-01T02:20:00Z"


def test_forbid_with_a_deadline_misses_the_held_time() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *", startingDeadlineSeconds=600)
    (first,) = c.tick("2026-11-01T01:00:00")
    c.run(first)
    assert c.tick("2026-11-01T02:00:00") == []
    c.finish(first, "Failed", "2026-11-01T02:30:00Z")
    assert c.tick("2026-11-01T02:30:01") == []  # 02:00 is 30 minutes late: missed
    assert c.tick("2026-11-01T03:00:00") != []


def test_replace_deletes_the_unfinished_run() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *", concurrencyPolicy="Replace")
    (first,) = c.tick("2026-11-01T01:00:00")
    c.run(first)
    (second,) = c.tick("2026-11-01T02:00:00")
    assert set(c.jobs) == {second}
    assert c.status["active"] == [second]
    assert ("SuccessfulDelete", f"deleted unfinished run {first} (Replace)") in c.events


def test_allow_runs_side_by_side() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *", concurrencyPolicy="Allow")
    (first,) = c.tick("2026-11-01T01:00:00")
    c.run(first)
    (second,) = c.tick("2026-11-01T02:00:00")
    assert set(c.jobs) == {first, second} and c.status["active"] == sorted([first, second])


def test_history_limits_delete_the_oldest_finished_runs() -> None:
    c = Cluster(
        "2026-11-01T00:00:30Z",
        schedule="0 * * * *",
        successfulJobsHistoryLimit=2,
        failedJobsHistoryLimit=1,
    )
    outcomes = ["Succeeded", "Failed", "Succeeded", "Failed", "Succeeded", "Succeeded"]
    names = []
    for hour, phase in enumerate(outcomes, start=1):
        (name,) = c.tick(f"2026-11-01T{hour:02d}:00:00")
        c.finish(name, phase, f"2026-11-01T{hour:02d}:30:00Z", promoted=hour == 3)
        names.append(name)
    c.tick("2026-11-01T06:45:00")
    kept = {names[3], names[4], names[5]}  # the newest Failed, the two newest Succeeded
    assert set(c.jobs) == kept
    assert [r["name"] for r in c.status["runs"]] == [names[5], names[4], names[3]]
    # The promoted run (hour 3) is gone, but the status still names it.
    assert c.status["promoted"]["name"] == names[2]
    c.finish(names[5], "Succeeded", "2026-11-01T06:30:00Z", promoted=True)
    c.tick("2026-11-01T06:50:00")
    assert c.status["promoted"]["name"] == names[5]
    assert c.status["runs"][0]["promoted"] is True


def test_suspend_stamps_nothing() -> None:
    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *", suspend=True)
    assert c.tick("2026-11-01T05:00:00") == []
    assert c.requeue_after is None and c.status.get("nextScheduleTime") is None
    ready, stalled = c.status["conditions"]
    assert stalled["type"] == "Stalled" and stalled["status"] == (
        "True" if ready["status"] == "False" else "False"
    )
    assert (ready["status"], ready["reason"]) == ("True", "Suspended")
    # Resumed: only the most recent missed time runs (lastScheduleTime was never set).
    c.schedule["spec"]["suspend"] = False
    assert c.tick("2026-11-01T05:10:00") == [stamp_name("reviews", at("2026-11-01T05:00:00"))]


@pytest.mark.parametrize(
    ("schedule", "zone", "message"),
    [
        ("0 3 * *", None, "spec.schedule: '0 3 * *' has 4 fields"),
        ("TZ=UTC 0 3 * * *", None, "TZ= and CRON_TZ= are not supported"),
        ("0 3 * * 1", "Mars/Olympus", "spec.timeZone"),
    ],
)
def test_an_invalid_schedule_says_why_and_stamps_nothing(
    schedule: str, zone: str | None, message: str
) -> None:
    spec: dict[str, Any] = {"schedule": schedule}
    if zone:
        spec["timeZone"] = zone
    c = Cluster("2026-11-01T00:00:30Z", **spec)
    assert c.tick("2026-11-10T00:00:00") == []
    ready, stalled = c.status["conditions"]
    assert stalled["type"] == "Stalled" and stalled["status"] == (
        "True" if ready["status"] == "False" else "False"
    )
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert message in ready["message"], ready["message"]
    assert c.events[0][0] == "InvalidSpec"
    c.tick("2026-11-10T00:01:00")
    assert len(c.events) == 1  # said once


def test_a_stamped_job_the_api_server_refuses_stalls_the_schedule_until_the_next_time() -> None:
    c = Cluster("2026-11-20T12:00:00Z", schedule="0 3 * * 1", timeZone="Europe/Berlin")
    c.tick("2026-11-20T12:00:01")
    now = at("2026-11-23T02:00:00")
    decision = decide_schedule(c.schedule, [], now)
    (job,) = decision.create
    name = job["metadata"]["name"]
    after = refused(
        decision, c.schedule, name, f"the stamped FineTuneJob {name} was refused: x", now
    )
    assert after.create == []
    assert [e.reason for e in after.events] == ["FailedCreate"]
    ready, stalled = after.status.conditions
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "FailedCreate")
    assert (stalled.type, stalled.status, stalled.reason) == ("Stalled", "True", "FailedCreate")
    assert after.status.active == [] and all(r.name != name for r in after.status.runs)
    # The time stays used: the next look is at the next time, not a retry of the same refusal.
    assert after.status.last_schedule_time == now
    assert after.requeue_after == decision.requeue_after
    # The decision it came from is unchanged (refused is pure).
    assert decision.create == [job] and "SuccessfulCreate" in [e.reason for e in decision.events]


class ScheduleIO:
    """The reconcile's view of the cluster (schedule_controller.ScheduleIO) over a Cluster, and
    the output's latest.json as the operator would read it."""

    def __init__(self, cluster: Cluster, latest: PromotionRecord | None) -> None:
        self.cluster = cluster
        self.latest = latest
        self.reads: list[tuple[str, dict[str, str]]] = []
        self.secrets = {("ml", "s3"): {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}}

    def get_schedule(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.cluster.schedule)

    def stamped(self, namespace: str, name: str) -> list[dict[str, Any]]:
        return list(self.cluster.jobs.values())

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))

    def create(self, obj: dict[str, Any]) -> None:
        self.cluster.jobs[obj["metadata"]["name"]] = copy.deepcopy(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.cluster.jobs.pop(name, None)

    def patch_schedule_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
    ) -> Any:
        def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
            for key, value in patch.items():  # RFC 7386, as the API server applies it
                if value is None:
                    target.pop(key, None)
                elif isinstance(value, dict) and isinstance(target.get(key), dict):
                    merge(target[key], value)
                else:
                    target[key] = value
            return target

        merge(self.cluster.schedule.setdefault("status", {}), patch)
        return True

    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None:
        self.cluster.events.append((reason, message))

    def read_latest(self, uri: str, credentials: dict[str, str]) -> PromotionRecord | None:
        self.reads.append((uri, credentials))
        return self.latest


def _rolled_back_record(run_id: str, when: str, from_run: str) -> PromotionRecord:
    return PromotionRecord(
        run_id=run_id,
        job=f"reviews-{run_id}",
        promoted_at=at(when),
        previous_run_id=from_run,
        rollback=Rollback(by="alice", reason="serving disagrees", from_run_id=from_run),
    )


def test_a_rollback_shows_in_the_status_only_as_latest_json_records_it() -> None:
    c = Cluster("2026-11-01T00:00:00Z", schedule="0 3 * * 1")
    c.schedule["spec"]["jobTemplate"]["spec"] = {
        **TEMPLATE_SPEC,
        "output": {"uri": "s3://models/ml/reviews", "credentialsSecret": "s3"},
    }
    runs = {}
    for tick, done, run_id in (("02T03", "02T04", "0a0a0a0a"), ("09T03", "09T04", "0b0b0b0b")):
        (name,) = c.tick(f"2026-11-{tick}:00:00")
        c.finish(name, "Succeeded", f"2026-11-{done}:00:00Z", promoted=True)
        c.jobs[name]["status"]["runId"] = runs[name] = run_id
    first, second = runs
    c.tick("2026-11-09T05:00:00")
    assert c.status["promoted"]["name"] == second
    back = _rolled_back_record(runs[first], "2026-11-09T06:00:00", runs[second])
    io = ScheduleIO(c, back)
    now = at("2026-11-09T06:00:05")

    def annotate(value: str) -> None:
        c.schedule["metadata"]["annotations"] = {ROLLBACK_ANNOTATION: value}

    # Nothing annotated: latest.json is never read.
    schedule_controller.reconcile(io, "ml", "reviews", now, io.read_latest)
    assert io.reads == []

    # Annotated with a rollback latest.json does not record (a hand-written annotation): a
    # Warning naming what latest.json says, the status's promoted run unchanged, said once.
    annotate(f"{runs[second]}@2026-11-09T06:00:00Z")
    io.latest = back.model_copy(update={"run_id": "ffffffff"})
    schedule_controller.reconcile(io, "ml", "reviews", now, io.read_latest)
    assert io.reads == [("s3://models/ml/reviews", io.secrets[("ml", "s3")])]
    reason, message = c.events[-1]
    assert reason == "RollbackNotFound"
    assert "s3://models/ml/reviews/latest.json names run ffffffff" in message
    assert c.status["promoted"]["name"] == second and c.status["promoted"]["rollback"] is None
    schedule_controller.reconcile(io, "ml", "reviews", now, io.read_latest)
    assert len(io.reads) == 1 and c.events[-1] == (reason, message)

    # Not in the form kubetune rollback writes (a month 99 included): not read at all, the
    # schedule goes on.
    for bad in ("../../x@yesterday", "deadbeef@2026-99-99T10:00:00Z"):
        said = len(c.events)
        annotate(bad)
        schedule_controller.reconcile(io, "ml", "reviews", now, io.read_latest)
        assert len(io.reads) == 1 and c.events[-1][0] == "RollbackNotFound"
        assert "is not <runId>@<promotedAt>" in c.events[-1][1]
        assert c.status["observedRollback"] == bad and len(c.events) == said + 1

    # Storage that does not answer: the value stays unobserved, checked again later.
    def unavailable(uri: str, credentials: dict[str, str]) -> PromotionRecord | None:
        io.reads.append((uri, credentials))
        raise Retry("latest.json not read yet: 503", 5.0)

    annotate(f"{runs[first]}@2026-11-09T06:00:00Z")
    result = schedule_controller.reconcile(io, "ml", "reviews", now, unavailable)
    assert result is not None and result.requeue_after == 60.0
    assert c.status["observedRollback"] == "deadbeef@2026-99-99T10:00:00Z"
    assert len(io.reads) == 2

    # The rollback kubetune rollback wrote, and annotated: the status names the run again.
    io.latest = back
    annotate(f"{runs[first]}@2026-11-09T06:00:00Z")
    schedule_controller.reconcile(io, "ml", "reviews", now, io.read_latest)
    promoted = c.status["promoted"]
    assert (promoted["name"], promoted["runId"]) == (first, runs[first])
    assert promoted["rollback"] == {
        "by": "alice",
        "reason": "serving disagrees",
        "fromRunId": runs[second],
    }
    assert promoted["latestUri"] == "s3://models/ml/reviews/latest.json"
    assert c.events[-1][0] == "RolledBack" and "by alice: serving disagrees" in c.events[-1][1]
    # It stays through reconciles, and a later promotion replaces it.
    c.tick("2026-11-09T07:00:00")
    assert c.status["promoted"]["runId"] == runs[first]
    (third,) = c.tick("2026-11-16T03:00:00")
    c.finish(third, "Succeeded", "2026-11-16T04:00:00Z", promoted=True)
    c.tick("2026-11-16T05:00:00")
    assert c.status["promoted"]["name"] == third and c.status["promoted"]["rollback"] is None
    assert len(io.reads) == 3

    # A forged latest.json dated in the future would pin the status: refused.
    future = _rolled_back_record(runs[second], "2030-01-01T00:00:00", runs[first])
    io.latest = future
    annotate(f"{runs[second]}@2030-01-01T00:00:00Z")
    schedule_controller.reconcile(io, "ml", "reviews", at("2026-11-16T06:00:00"), io.read_latest)
    assert c.events[-1][0] == "RollbackNotFound" and "dates it in the future" in c.events[-1][1]
    assert c.status["promoted"]["name"] == third
