"""The runtime and the two controllers on their own: what wakes each kind (the watch's changes
and the operator's own writes), and how one reconcile's outcome becomes queue actions. The
operator as a whole runs on the real control plane in tests/e2e."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import SCHEDULE_LABEL
from kubetune.api.wire import JOB_LABEL
from kubetune.controller.errors import Conflict, Misconfigured, Retry
from kubetune.controller.finetunejob_controller import FineTuneJobController
from kubetune.controller.metrics import OperatorMetrics, Trigger
from kubetune.controller.runtime import Request, Result, Runtime
from kubetune.controller.schedule_controller import ScheduleController
from kubetune.controller.settings import OperatorSettings


class FakeKube:
    """What the runtime needs of kube.Kube without starting an informer."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}  # as the API server stores them, by name

    def metrics(self, host: str, port: int) -> str | None:
        return None

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], rv: Any, plural: str = ""
    ) -> dict[str, Any]:
        stored = self.objects[name]
        meta = {**stored["metadata"], "resourceVersion": str(int(rv) + 1)}
        self.objects[name] = {**stored, "metadata": meta, "status": {**stored["status"], **patch}}
        return self.objects[name]

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}


def _obj(kind: str, name: str, rv: str = "1", labels: dict[str, str] | None = None, **rest: Any):
    meta = {"namespace": "ns", "name": name, "resourceVersion": rv, "generation": 1}
    return {"kind": kind, "metadata": {**meta, "labels": labels or {}}, **rest}


class Scripted:
    """A controller whose reconcile raises or returns what the test says."""

    kind = "things"

    def __init__(self, *_: Any) -> None:
        self.answer: Any = Result()
        self.refreshed: list[tuple[str, str]] = []

    def reconcile(self, namespace: str, name: str) -> Result | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def refresh(self, namespace: str, name: str) -> None:
        self.refreshed.append((namespace, name))

    def wakes(self, *_: Any) -> list[Any]:
        return []

    def resume(self, obj: Any) -> Trigger:
        return Trigger.RESUME

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> dict[str, Any]:
        return {}


def _runtime(*kinds: Any) -> Runtime:
    return Runtime(FakeKube(), OperatorSettings(), OperatorMetrics(), kinds)


def _queued(runtime: Runtime) -> list[Request]:
    out = []
    while (request := runtime.queue.get(0)) is not None:
        out.append(request)
        runtime.queue.done(request)
    return out


@pytest.fixture
def scripted() -> tuple[Runtime, Scripted]:
    runtime = _runtime(Scripted)
    return runtime, runtime.controllers["things"]  # type: ignore[return-value]


REQUEST = Request("things", "ns", "a")


def test_a_result_asking_to_come_back_is_queued_after_its_delay_as_a_timer(scripted) -> None:
    runtime, thing = scripted
    thing.answer = Result(requeue_after=30.0)
    assert runtime.handle(REQUEST) == thing.answer
    assert _queued(runtime) == []  # not yet
    assert runtime._triggers[REQUEST] == Trigger.TIMER
    assert REQUEST not in runtime._resyncing


def test_a_run_that_is_not_final_is_resynced_and_leaves_the_resync_when_gone(scripted) -> None:
    runtime, thing = scripted
    thing.answer = Result(resync=True)
    runtime.handle(REQUEST)
    assert REQUEST in runtime._resyncing
    thing.answer = None
    runtime.handle(REQUEST)
    assert REQUEST not in runtime._resyncing


@pytest.mark.parametrize(
    "error",
    [
        Conflict("409"),
        Retry("429", 7.0),
        Misconfigured("forbidden", "Forbidden", 7.0),
        KeyError("x"),
    ],
    ids=["conflict", "retry", "misconfigured", "bug"],
)
def test_every_failure_comes_back_with_backoff_and_a_conflict_reads_afresh(scripted, error) -> None:
    runtime, thing = scripted
    thing.answer = error
    assert runtime.handle(REQUEST) is None
    assert runtime.queue.failures(REQUEST) == 1
    assert thing.refreshed == ([("ns", "a")] if isinstance(error, Conflict) else [])
    thing.answer = Result()
    runtime.handle(REQUEST)
    assert runtime.queue.failures(REQUEST) == 0  # a success forgets


def test_becoming_the_leader_queues_every_cached_object_of_every_controller_kind() -> None:
    runtime = _runtime(FineTuneJobController, ScheduleController)
    store = runtime.stores["finetunejobs"]
    store.assume(_obj("FineTuneJob", "running", status={"phase": "Running"}))
    store.assume(_obj("FineTuneJob", "done", status={"phase": "Succeeded"}))
    runtime.stores["finetuneschedules"].assume(_obj("FineTuneSchedule", "nightly"))
    runtime.lead()
    assert runtime.leading.is_set()
    assert runtime._triggers == {
        Request("finetunejobs", "ns", "running"): Trigger.RESUME,
        Request("finetunejobs", "ns", "done"): Trigger.RESUME_FINAL,
        Request("finetuneschedules", "ns", "nightly"): Trigger.RESUME,
    }


# -- what wakes a FineTuneJob -----------------------------------------------------------------


def _wakes(kind: str, old: Any, new: Any, own: bool = False) -> dict[Request, Trigger]:
    runtime = _runtime(FineTuneJobController, ScheduleController)
    runtime._offer(kind, old, new, own)
    return dict(runtime._triggers)


def test_a_childs_change_on_the_watch_wakes_its_run_but_the_operators_own_write_does_not() -> None:
    job = _obj("Job", "a-0", labels={JOB_LABEL: "a"})
    assert _wakes("jobs", None, job) == {Request("finetunejobs", "ns", "a"): Trigger.CHILD}
    assert _wakes("jobs", None, job, own=True) == {}
    assert _wakes("pods", _obj("Pod", "p"), _obj("Pod", "p", "2")) == {}  # not a run's


def test_a_finetunejob_wakes_on_spec_deletion_and_foreign_status_not_on_its_own_write() -> None:
    old = _obj("FineTuneJob", "a", status={"phase": "Running"})
    same = _obj("FineTuneJob", "a", "2", status={"phase": "Running"})
    other = _obj("FineTuneJob", "a", "2", status={"phase": "Succeeded"})
    respec = {**same, "metadata": {**same["metadata"], "generation": 2}}
    key = Request("finetunejobs", "ns", "a")
    assert _wakes("finetunejobs", None, old) == {key: Trigger.ADDED}
    assert _wakes("finetunejobs", old, same) == {}  # a watch echo, or a label
    assert _wakes("finetunejobs", old, other) == {key: Trigger.FINETUNEJOB}
    assert _wakes("finetunejobs", old, respec) == {key: Trigger.FINETUNEJOB}
    assert _wakes("finetunejobs", old, None) == {key: Trigger.FINETUNEJOB}  # forgets it
    assert _wakes("finetunejobs", old, other, own=True) == {}
    assert _wakes("finetunejobs", None, old, own=True) == {key: Trigger.ADDED}  # stamped


def test_a_profile_or_namespace_change_wakes_the_runs_that_may_wait_on_it() -> None:
    runtime = _runtime(FineTuneJobController, ScheduleController)
    store = runtime.stores["finetunejobs"]
    store.assume(_obj("FineTuneJob", "pending", status={"phase": "Pending"}, spec={}))
    store.assume(_obj("FineTuneJob", "gpu", spec={"profile": "gpu"}))
    store.assume(_obj("FineTuneJob", "done", status={"phase": "Succeeded"}, spec={}))
    runtime._offer("finetuneprofiles", None, {"metadata": {"name": "gpu"}}, own=False)
    assert runtime._triggers == {
        Request("finetunejobs", "ns", "pending"): Trigger.PROFILE,
        Request("finetunejobs", "ns", "gpu"): Trigger.PROFILE,
    }
    runtime._triggers.clear()
    runtime._offer("finetuneprofiles", None, {"metadata": {"name": "cpu"}}, own=False)
    assert set(runtime._triggers) == {Request("finetunejobs", "ns", "pending")}
    runtime._triggers.clear()
    ns = {"metadata": {"name": "ns", "labels": {"team": "a"}}}
    relabelled = {"metadata": {"name": "ns", "labels": {"team": "b"}}}
    runtime._offer("namespaces", ns, ns, own=False)
    assert runtime._triggers == {}
    runtime._offer("namespaces", ns, relabelled, own=False)
    assert set(runtime._triggers) == {
        Request("finetunejobs", "ns", "pending"),
        Request("finetunejobs", "ns", "gpu"),
    }


# -- what wakes a FineTuneSchedule ------------------------------------------------------------


def test_a_stamped_runs_new_phase_wakes_its_schedule_whoever_wrote_it() -> None:
    labels = {SCHEDULE_LABEL: "nightly"}
    old = _obj("FineTuneJob", "nightly-1", labels=labels, status={"phase": "Running"})
    done = _obj("FineTuneJob", "nightly-1", "2", labels=labels, status={"phase": "Succeeded"})
    progress = _obj(
        "FineTuneJob",
        "nightly-1",
        "2",
        labels=labels,
        status={"phase": "Running", "progress": {"step": 3}},
    )
    schedule = Request("finetuneschedules", "ns", "nightly")
    assert _wakes("finetunejobs", old, done)[schedule] == Trigger.STAMPED
    assert _wakes("finetunejobs", old, done, own=True)[schedule] == Trigger.STAMPED
    assert schedule not in _wakes("finetunejobs", old, progress, own=True)
    assert schedule not in _wakes("finetunejobs", None, old, own=True)  # it just stamped it
    assert _wakes("finetunejobs", old, None)[schedule] == Trigger.STAMPED


def test_a_schedule_wakes_on_its_spec_and_foreign_status_not_on_its_own_write() -> None:
    old = _obj("FineTuneSchedule", "nightly", status={"lastScheduleTime": "t1"})
    other = _obj("FineTuneSchedule", "nightly", "2", status={"lastScheduleTime": "t2"})
    key = Request("finetuneschedules", "ns", "nightly")
    assert _wakes("finetuneschedules", None, old) == {key: Trigger.SCHEDULE}
    assert _wakes("finetuneschedules", old, other) == {key: Trigger.SCHEDULE}
    assert _wakes("finetuneschedules", old, other, own=True) == {}
    assert _wakes("finetuneschedules", old, None) == {}  # the garbage collector's
    # kubetune rollback's annotation: the reconcile checks it against latest.json.
    annotated = _obj("FineTuneSchedule", "nightly", "3", status={"lastScheduleTime": "t1"})
    annotated["metadata"]["annotations"] = {"kubetune.dev/rollback": "0a0a0a0a@t"}
    assert _wakes("finetuneschedules", old, annotated) == {key: Trigger.SCHEDULE}
    labelled = _obj("FineTuneSchedule", "nightly", "3", {"a": "b"}, status=old["status"])
    assert _wakes("finetuneschedules", old, labelled) == {}  # other metadata wakes nothing


def test_the_operators_status_write_reaches_the_controllers_as_its_own() -> None:
    runtime = _runtime(FineTuneJobController, ScheduleController)
    labels = {SCHEDULE_LABEL: "nightly"}
    running = _obj("FineTuneJob", "nightly-1", labels=labels, status={"phase": "Running"})
    runtime.stores["finetunejobs"].assume(running)
    runtime.cached.kube.objects["nightly-1"] = running
    runtime.cached.patch_status("ns", "nightly-1", {"phase": "Succeeded"}, "1")
    # The schedule is told; the run itself is not woken by its own write.
    assert runtime._triggers == {Request("finetuneschedules", "ns", "nightly"): Trigger.STAMPED}
    stamped = _obj("FineTuneJob", "nightly-2", labels=labels)
    runtime._triggers.clear()
    runtime.cached.create(stamped)
    assert runtime._triggers == {Request("finetunejobs", "ns", "nightly-2"): Trigger.ADDED}
