"""A FineTuneSchedule against the real control plane, the real operator and the real trainer:
it reports its next time, stamps a FineTuneJob when a time is due (once, whatever repeats), the
stamped run trains, is judged against the champion and promoted, the schedule's status lists it
and names the promoted run, history limits delete finished runs (the promoted one stays named),
and deleting the schedule lets the garbage collector take what it stamped.

Waiting a week for Monday 03:00 is not a test: the schedule's status is patched as if its last
run had been stamped the week before, which makes the most recent Monday 03:00 due now. That is
the state a schedule created long ago is in, and the controller reads nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from croniter import croniter

from tests.support.platform import FINAL, Platform

WEEKLY = "0 3 * * 1"


def _schedule(platform: Platform, ns: str, name: str, **spec: object) -> dict:
    template = platform.job(
        ns,
        "template",
        gates=[{"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}],
    )
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "schedule": WEEKLY,
            "timeZone": "UTC",
            "jobTemplate": {"metadata": {"labels": {"team": "a"}}, "spec": template["spec"]},
            **spec,
        },
    }


def _status(platform: Platform, ns: str, name: str) -> dict:
    obj = platform.api.get("finetuneschedules", ns, name)
    assert obj is not None
    return obj.get("status") or {}


def _stamped(platform: Platform, ns: str) -> list[dict]:
    return platform.api.list("finetunejobs", ns)


def test_a_schedule_stamps_trains_promotes_and_keeps_its_history(
    platform: Platform, ns: str
) -> None:
    platform.apply(_schedule(platform, ns, "weekly", successfulJobsHistoryLimit=1))
    status = platform.wait_for(
        "the schedule's next time",
        lambda: (s := _status(platform, ns, "weekly")).get("nextScheduleTime") and s,
        30,
    )
    now = datetime.now(UTC)
    upcoming = croniter(WEEKLY, now).get_next(datetime)
    assert status["nextScheduleTime"] == upcoming.strftime("%Y-%m-%dT%H:%M:%SZ")
    ready, stalled = status["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Scheduled")
    assert (stalled["type"], stalled["status"]) == ("Stalled", "False")
    assert not _stamped(platform, ns)  # created after the last Monday 03:00: nothing due

    # The last run was stamped the week before the most recent Monday 03:00: that one is due.
    due = croniter(WEEKLY, now).get_prev(datetime)
    week_before = (due - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    platform.api.patch(
        "finetuneschedules", ns, "weekly", {"status": {"lastScheduleTime": week_before}}, True
    )
    (job,) = platform.wait_for("a stamped FineTuneJob", lambda: _stamped(platform, ns), 30)
    name = job["metadata"]["name"]
    assert name == f"weekly-{int(due.timestamp()) // 60}"
    assert job["metadata"]["labels"] == {"team": "a", "kubetune.dev/schedule": "weekly"}
    assert job["metadata"]["annotations"]["kubetune.dev/scheduled-time"] == due.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "FineTuneSchedule",
        "weekly",
        True,
    )

    # The stamped run is an ordinary FineTuneJob: it trains, is judged and promoted.
    finished = platform.wait_phase(ns, name, FINAL, timeout=180)
    assert finished["phase"] == "Succeeded", finished
    assert finished["gates"][0]["comparedWith"] == "base (nothing promoted yet)"
    status = platform.wait_for(
        "the schedule to see the promotion",
        lambda: (s := _status(platform, ns, "weekly")).get("promoted") and s,
        30,
    )
    assert status["promoted"]["name"] == name
    assert status["promoted"]["runId"] == finished["runId"]
    assert status["promoted"]["latestUri"] == f"s3://models/{ns}/template/latest.json"
    assert status["lastScheduleTime"] == due.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert status["active"] == [] and status["lastSuccessfulTime"]
    (run,) = status["runs"]
    assert (run["name"], run["phase"], run["promoted"]) == (name, "Succeeded", True)

    # The same time again (a repeat, a restart): never a second run for it.
    platform.api.patch(
        "finetuneschedules", ns, "weekly", {"status": {"lastScheduleTime": week_before}}, True
    )
    platform.operator.kill()
    platform.operator.start()
    platform.wait_for(
        "the schedule to look again",
        lambda: _status(platform, ns, "weekly").get("lastScheduleTime") != week_before,
        30,
    )
    assert [j["metadata"]["name"] for j in _stamped(platform, ns)] == [name]
    reasons = [e["reason"] for e in platform.events(ns, "weekly")]
    assert reasons.count("SuccessfulCreate") == 1, reasons

    # History: keep no Succeeded run. The promoted one goes, and the status still names it.
    platform.api.patch(
        "finetuneschedules", ns, "weekly", {"spec": {"successfulJobsHistoryLimit": 0}}
    )
    platform.wait_for("the history limit", lambda: not _stamped(platform, ns), 30)
    platform.wait_for(
        "the run gone from the status",
        lambda: _status(platform, ns, "weekly").get("runs") in (None, []),
        30,
    )
    assert _status(platform, ns, "weekly")["promoted"]["name"] == name
    # Its run's Job, ConfigMap and pods went with it (the garbage collector).
    platform.wait_for(
        "the run's children to go",
        lambda: not any(platform.children(ns, k, name) for k in ("jobs", "configmaps")),
        30,
    )


def test_deleting_a_schedule_deletes_what_it_stamped(platform: Platform, ns: str) -> None:
    platform.apply(_schedule(platform, ns, "gone", concurrencyPolicy="Allow"))
    platform.wait_for(
        "the schedule to be read",
        lambda: _status(platform, ns, "gone").get("nextScheduleTime"),
        30,
    )
    due = croniter(WEEKLY, datetime.now(UTC)).get_prev(datetime)
    before = (due - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    platform.api.patch(
        "finetuneschedules", ns, "gone", {"status": {"lastScheduleTime": before}}, True
    )
    platform.wait_for("a stamped FineTuneJob", lambda: _stamped(platform, ns), 30)
    platform.api.delete("finetuneschedules", ns, "gone")
    platform.wait_for("the stamped FineTuneJob to go", lambda: not _stamped(platform, ns), 30)


def test_an_invalid_schedule_says_why(platform: Platform, ns: str) -> None:
    doc = _schedule(platform, ns, "typo")
    doc["spec"]["schedule"] = "0 3 * * Mon-Fri-Sat"
    platform.apply(doc)  # the CRD cannot parse cron: the operator says what is wrong
    ready = platform.wait_for(
        "Ready=False",
        lambda: next(
            (
                c
                for c in _status(platform, ns, "typo").get("conditions") or []
                if c["type"] == "Ready" and c["status"] == "False"
            ),
            None,
        ),
        30,
    )
    assert ready["reason"] == "InvalidSpec"
    assert "spec.schedule: '0 3 * * Mon-Fri-Sat' is not a valid cron expression" in ready["message"]
    platform.wait_for(
        "the Warning Event",
        lambda: "InvalidSpec" in [e["reason"] for e in platform.events(ns, "typo")],
        10,
    )
    assert not _stamped(platform, ns)
