"""The operator's runtime pieces on their own: the work queue, the caches and their informers
(against a scripted list/watch API), the write-through that keeps a Job from being created twice,
and the scraper's budget. The operator as a whole runs on the real control plane in
tests/e2e."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.api.wire import JOB_LABEL
from kubetune.controller.cache import TRIM, Informer, Store, trim_pod
from kubetune.controller.cached import OWNED, CachedKube
from kubetune.controller.finetunejob_controller import reconcile
from kubetune.controller.scraper import Scraper
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.workqueue import WorkQueue
from tests.conftest import valid_job


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the work queue ---------------------------------------------------------------------------


def test_a_key_added_twice_is_processed_once() -> None:
    queue = WorkQueue()
    queue.add("a")
    queue.add("b")
    queue.add("a")
    assert [queue.get(0), queue.get(0), queue.get(0)] == ["a", "b", None]


def test_a_key_added_while_it_is_processed_comes_back_after_and_never_twice_at_once() -> None:
    queue = WorkQueue()
    queue.add("a")
    assert queue.get(0) == "a"
    queue.add("a")  # an event during the reconcile
    assert queue.get(0) is None  # not handed to a second worker meanwhile
    queue.done("a")
    assert queue.get(0) == "a"


def test_retries_back_off_exponentially_per_key_and_a_success_forgets() -> None:
    clock = Clock()
    queue = WorkQueue(base_delay=0.5, max_delay=4.0, clock=clock)
    delays = []
    for _ in range(6):
        delays.append(queue.retry("a"))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert queue.get(0) is None  # not due yet
    clock.now = 0.5
    assert queue.get(0) == "a"  # the earliest pending retry wins
    queue.done("a")
    queue.forget("a")
    assert queue.retry("a") == 0.5


def test_retries_of_all_keys_share_a_token_bucket() -> None:
    clock = Clock()
    queue = WorkQueue(base_delay=0.001, rate=10.0, burst=3, clock=clock)
    delays = [queue.retry(f"k{i}") for i in range(5)]
    assert delays[:3] == [0.001] * 3  # the burst
    assert delays[3:] == pytest.approx([0.1, 0.2])  # then 10 per second


# -- the caches -------------------------------------------------------------------------------


def _obj(name: str, version: int, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(version),
            "labels": labels,
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "big"}]}}, "suspend": False},
        "status": {"active": 1},
    }


def test_stored_objects_are_trimmed_and_indexed_by_their_finetunejob() -> None:
    store = Store("jobs", JOB_LABEL)
    store.apply("ADDED", _obj("a-1", 1, **{JOB_LABEL: "a"}))
    store.apply("ADDED", _obj("b-1", 2, **{JOB_LABEL: "b"}))
    (job,) = store.owned_by("ns", "a")
    assert job["spec"] == {"suspend": False} and "managedFields" not in job["metadata"]
    store.apply("DELETED", _obj("a-1", 3, **{JOB_LABEL: "a"}))
    assert store.owned_by("ns", "a") == [] and len(store) == 1
    pod = trim_pod(
        {
            "metadata": {"name": "p"},
            "spec": {
                "volumes": [{"name": "v"}],
                "containers": [{"name": "trainer", "image": "x", "env": [{"name": "A"}],
                                "ports": [{"name": "metrics", "containerPort": 9090}],
                                "resources": {"limits": {"nvidia.com/gpu": "2"}}}],
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
        }
    )  # fmt: skip
    assert pod["spec"] == {  # ports: where the metrics are; resources: what status.usage counts
        "containers": [
            {
                "name": "trainer",
                "ports": [{"name": "metrics", "containerPort": 9090}],
                "resources": {"limits": {"nvidia.com/gpu": "2"}},
            }
        ]
    }


def test_a_write_answer_is_taken_only_when_newer_than_the_stored_state() -> None:
    store = Store("jobs", JOB_LABEL)
    store.apply("MODIFIED", _obj("a-1", 7))
    assert not store.assume(_obj("a-1", 5))  # the watch already brought a later state
    assert store.get("ns", "a-1")["metadata"]["resourceVersion"] == "7"
    assert store.assume(_obj("a-1", 9))
    assert store.get("ns", "a-1")["metadata"]["resourceVersion"] == "9"
    # The watch catching up with a change from before that write does not undo it...
    store.apply("MODIFIED", _obj("a-1", 8))
    assert store.get("ns", "a-1")["metadata"]["resourceVersion"] == "9"
    # ...a later one does, and a deletion always does.
    store.apply("MODIFIED", _obj("a-1", 10))
    assert store.get("ns", "a-1")["metadata"]["resourceVersion"] == "10"
    store.apply("DELETED", _obj("a-1", 11))
    assert store.get("ns", "a-1") is None


class ScriptedApi:
    """A list/watch API whose listings and watch streams the test scripts."""

    def __init__(self) -> None:
        self.listings: list[tuple[str, list[dict[str, Any]]]] = []
        self.streams: list[list[dict[str, Any]]] = []
        self.pages: list[tuple[int, str | None]] = []
        self.watched_from: list[str] = []
        self.exhausted = threading.Event()

    def list_page(
        self, kind: str, namespace: str | None, selector: str | None, limit: int, token: str | None
    ) -> dict[str, Any]:
        version, items = self.listings[0]
        start = int(token or 0)
        self.pages.append((limit, token))
        page = items[start : start + limit]
        meta: dict[str, Any] = {"resourceVersion": version}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        else:
            self.listings.pop(0)
        return {"metadata": meta, "items": page}

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        resource_version: str,
        timeout: int,
        stop: threading.Event,
    ) -> Iterator[dict[str, Any]]:
        self.watched_from.append(resource_version)
        if not self.streams:
            self.exhausted.set()
            stop.wait(5)
            return
        yield from self.streams.pop(0)


def test_an_informer_lists_in_pages_watches_resumes_and_relists_after_410() -> None:
    api = ScriptedApi()
    api.listings = [("10", [_obj(f"j{i}", i) for i in range(5)])]
    api.streams = [
        [  # the first watch: a change, a bookmark, then the server ends it
            {"type": "MODIFIED", "object": _obj("j1", 11)},
            {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
        ],
        [  # resumed from the bookmark; a deletion, then the version is too old
            {"type": "DELETED", "object": _obj("j2", 16)},
            {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}},
        ],
    ]
    # The relist: j0 was deleted and j9 created while nothing was watched.
    api.listings.append(("30", [_obj("j1", 11), _obj("j3", 3), _obj("j4", 4), _obj("j9", 29)]))
    seen: list[tuple[str | None, str | None]] = []

    def name(obj: dict[str, Any] | None) -> str | None:
        return obj and f"{obj['metadata']['name']}@{obj['metadata']['resourceVersion']}"

    def on_change(kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        seen.append((name(old), name(new)))

    store = Store("jobs")
    informer = Informer(api, store, None, on_change, page=2).start()
    assert api.exhausted.wait(5)
    informer.stop()
    assert api.pages[:3] == [(2, None), (2, "2"), (2, "4")]  # 5 objects in pages of 2
    assert api.watched_from == ["10", "15", "30"]  # list, bookmark, relist
    assert informer.relists == 1
    assert sorted(name for _, name in store.names()) == ["j1", "j3", "j4", "j9"]
    # Every change was reported: the listing, the watch, and the relist's differences,
    # including the deletion that happened while no watch was open.
    assert seen[:5] == [(None, f"j{i}@{i}") for i in range(5)]
    assert seen[5:] == [
        ("j1@1", "j1@11"),
        ("j2@2", None),
        ("j0@0", None),  # deleted during the gap: reported as deleted by the relist
        (None, "j9@29"),  # created during the gap
    ]


def test_a_job_just_created_is_not_created_again_before_the_watch_reports_it() -> None:
    """The reconcile's create goes into the cache at once (the role of 'expectations')."""

    class Api:
        def __init__(self) -> None:
            self.created: list[str] = []
            self.version = 100

        def create(self, obj: dict[str, Any]) -> dict[str, Any]:
            self.created.append(obj["metadata"]["name"])
            self.version += 1
            stored = copy.deepcopy(obj)
            stored["metadata"]["resourceVersion"] = str(self.version)
            return stored

        def patch_status(self, namespace, name, patch, resource_version=None):  # type: ignore[no-untyped-def]
            self.version += 1
            ftj = copy.deepcopy(stores["finetunejobs"].get(namespace, name))
            ftj["status"] = {**(ftj.get("status") or {}), **patch}
            ftj["metadata"]["resourceVersion"] = str(self.version)
            return ftj

        def event(self, *args: Any) -> None:
            pass

    stores = {k: Store(k, OWNED[k]) for k in TRIM}
    stores["namespaces"].apply("ADDED", {"metadata": {"name": "ns", "resourceVersion": "1"}})
    doc = valid_job()
    doc["metadata"] = {
        "name": "demo", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "1",
    }  # fmt: skip
    stores["finetunejobs"].apply("ADDED", doc)
    api = Api()
    kube = CachedKube(api, stores)
    settings = OperatorSettings()
    reconcile(kube, settings, "ns", "demo")
    assert [name.rsplit("-", 1)[0] for name in api.created] == ["demo", "demo"]
    reconcile(kube, settings, "ns", "demo")  # no watch event has arrived
    reconcile(kube, settings, "ns", "demo")
    assert len(api.created) == 2  # the ConfigMap and the Job, once each


def test_the_scraper_keeps_to_its_budget_and_reports_only_changed_steps() -> None:
    reads: list[float] = []
    step = {"n": 0}

    def fetch(ip: str, port: int) -> str:
        reads.append(time.monotonic())
        return f"kubetune_trainer_step {step['n']}\n"

    changed: list[tuple[str, str]] = []
    scraper = Scraper(fetch, lambda key, text: changed.append(key), interval=0.2, rate=50,
                      concurrency=4, tick=0.01)  # fmt: skip
    for i in range(40):
        scraper.set(("ns", f"j{i}"), ("127.0.0.1", 9000 + i))
    started = time.monotonic()
    scraper.start()
    deadline = started + 10
    while len(reads) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    scraper.stop()
    # 40 trainers due at once every 0.2 s would be 200 reads a second; the budget is 50.
    assert len(reads) >= 100
    assert len(reads) <= 50 * elapsed + 5, (len(reads), elapsed)
    # Each trainer's first reading is a change; the same step again is not reported.
    assert sorted(changed) == sorted({("ns", f"j{i}") for i in range(40)})
