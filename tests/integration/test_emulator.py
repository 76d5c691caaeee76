"""The emulated cluster itself: each behaviour it was taught behaves as the real one it cites
(tests/support/cluster.py, apiserver.py, kubelet.py). No operator here: raw requests and Jobs,
and the node's fake trainer, so each test takes a second or two."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import valid_job
from tests.support.cluster import TEST_AGENT, Client, Cluster, running_cluster, wait_until
from tests.support.kubelet import Kubelet, PodRun
from tests.support.specs import override


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Client, Kubelet]]:
    with running_cluster() as cluster:
        kubelet = Kubelet(
            cluster.url,
            tmp_path_factory.mktemp("node"),
            fake_seconds=0.5,
            terminal_delay=1.5,
            pod_failure_backoff=1.0,  # the real 10 s, scaled down for these tests
        ).start()
        try:
            yield cluster, Client(cluster.url), kubelet
        finally:
            kubelet.stop()


def _job(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [{"name": "trainer", "image": "trainer:test", "command": ["true"]}],
    }
    pod_spec.update(spec.pop("pod", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **spec},
    }


def _conditions(obj: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _pods(api: Client, ns: str, job: str) -> list[dict[str, Any]]:
    return [p for p in api.list("pods", ns) if p["metadata"]["labels"].get("job-name") == job]


def _waiting(api: Client, ns: str, job: str) -> dict[str, Any] | None:
    """Why the job's first pod's container waits, if it does."""
    pods = _pods(api, ns, job)
    statuses = ((pods[0].get("status") or {}).get("containerStatuses") or []) if pods else []
    return next((c["state"]["waiting"] for c in statuses if "waiting" in c["state"]), None)


def _raw(cluster: Cluster, method: str, path: str, body: bytes, ctype: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        cluster.url + path,
        data=body,
        method=method,
        headers={"Content-Type": ctype, "User-Agent": TEST_AGENT},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _ftj(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    doc = valid_job()
    doc["metadata"] = {"name": name, "namespace": ns}
    override(doc["spec"], **spec)
    return doc


# -- the API server -------------------------------------------------------------------------


def test_nan_is_not_json_and_is_a_400(node: tuple[Cluster, Client, Kubelet]) -> None:
    cluster, api, _ = node
    api.create("finetunejobs", "emu-nan", _ftj("emu-nan", "a"))
    path = api.path("finetunejobs", "emu-nan", "a") + "/status"
    body = b'{"status": {"progress": {"step": 1, "loss": NaN}}}'
    code, answer = _raw(cluster, "PATCH", path, body, "application/merge-patch+json")
    assert code == 400 and answer["reason"] == "BadRequest"
    assert "invalid character 'N'" in answer["message"]


def test_finetunejobs_are_admitted_by_the_crd(node: tuple[Cluster, Client, Kubelet]) -> None:
    cluster, api, _ = node
    ns = "emu-admission"
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.create("finetunejobs", ns, _ftj(ns, "typo", method__type="lorra"))
    answer = json.loads(refused.value.read())
    assert refused.value.code == 422 and answer["reason"] == "Invalid"
    assert "spec.method.type" in answer["message"]
    # Defaults are applied on create, as the structural schema's defaults are.
    created = api.create("finetunejobs", ns, _ftj(ns, "ok"))
    assert created["spec"]["backoffLimit"] == 3 and created["metadata"]["generation"] == 1
    # kubectl (fieldValidation=Strict) gets a 400 for an unknown field, before validation...
    with pytest.raises(urllib.error.HTTPError) as strict:
        api.patch("finetunejobs", ns, "ok", {"spec": {"learning_rate": 0.1}})
    message = json.loads(strict.value.read())["message"]
    assert strict.value.code == 400
    assert 'strict decoding error: unknown field "spec.learning_rate"' in message
    # ...so does a metadata field that ObjectMeta does not have (metadata is not in the schema).
    with pytest.raises(urllib.error.HTTPError) as meta:
        api.create(
            "finetunejobs", ns, {**_ftj(ns, "typo"), "metadata": {"name": "t", "lables": {}}}
        )
    assert meta.value.code == 400
    assert 'unknown field "metadata.lables"' in json.loads(meta.value.read())["message"]
    # generateName: the server names the object (prefix + 5 characters of its alphabet).
    generated = api.create(
        "finetunejobs", ns, {**_ftj(ns, "x"), "metadata": {"generateName": "sql-"}}
    )
    suffix = generated["metadata"]["name"].removeprefix("sql-")
    assert len(suffix) == 5 and set(suffix) <= set("bcdfghjklmnpqrstvwxz2456789")
    # ...a client that sends no fieldValidation (the server's default, Warn) has it pruned.
    path = api.path("finetunejobs", ns, "ok")
    body = json.dumps({"spec": {"learning_rate": 0.1, "suspend": True}}).encode()
    code, stored = _raw(cluster, "PATCH", path, body, "application/merge-patch+json")
    assert code == 200 and "learning_rate" not in stored["spec"] and stored["spec"]["suspend"]
    # The status subresource is validated too: a phase the schema does not know is refused.
    code, answer = _raw(
        cluster,
        "PATCH",
        path + "/status",
        b'{"status": {"phase": "Flickering"}}',
        "application/merge-patch+json",
    )
    assert code == 422 and "status.phase" in answer["message"]
    # With a stale CRD (no schema for this field yet) the same typo is stored as written...
    with cluster.stale_crd():
        api.create("finetunejobs", ns, _ftj(ns, "stale", method__type="lorra"))
    assert api.get("finetunejobs", ns, "stale")["spec"]["method"]["type"] == "lorra"
    # ...and, validation ratcheting, an update that leaves it alone is admitted; one that
    # touches it is not.
    api.patch("finetunejobs", ns, "stale", {"metadata": {"annotations": {"a": "b"}}})
    api.patch("finetunejobs", ns, "stale", {"spec": {"suspend": True}})
    with pytest.raises(urllib.error.HTTPError) as touched:
        api.patch("finetunejobs", ns, "stale", {"spec": {"method": {"type": "lorax"}}})
    assert touched.value.code == 422


def test_an_injected_refusal_carries_the_real_message(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    cluster, api, _ = node
    rbac = 'configmaps is forbidden: User "system:serviceaccount:kt:kt" cannot create resource "configmaps"'
    cluster.inject("create", "configmaps", 403, message=rbac)
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.create("configmaps", "emu-403", body)
    answer = json.loads(refused.value.read())
    assert refused.value.code == 403 and answer["reason"] == "Forbidden"
    assert answer["message"] == rbac


def _config_map(ns: str, name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
    }


def _watch(
    cluster: Cluster, path: str, seconds: float = 3.0, **params: str
) -> list[dict[str, Any]]:
    """The events of one watch request, read until the server ends it or `seconds` pass."""
    query = "&".join(f"{k}={v}" for k, v in {"watch": "true", **params}.items())
    req = urllib.request.Request(f"{cluster.url}{path}?{query}", headers={"User-Agent": TEST_AGENT})
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    with urllib.request.urlopen(req, timeout=seconds) as response:
        try:
            while time.monotonic() < deadline:
                line = response.readline()
                if not line:
                    break  # the server ended the watch
                if line.strip():
                    events.append(json.loads(line))
        except TimeoutError:
            pass
    return events


def test_writes_with_a_stale_resource_version_are_refused(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    _, api, _ = node
    ns = "emu-occ"
    created = api.create("configmaps", ns, _config_map(ns, "c"))
    first = created["metadata"]["resourceVersion"]
    patched = api.patch(
        "configmaps", ns, "c", {"metadata": {"resourceVersion": first, "labels": {"a": "1"}}}
    )
    second = patched["metadata"]["resourceVersion"]
    assert int(second) > int(first)
    # The same precondition again: the object has moved on, 409 with the registry's message.
    with pytest.raises(urllib.error.HTTPError) as stale:
        api.patch(
            "configmaps", ns, "c", {"metadata": {"resourceVersion": first, "labels": {"a": "2"}}}
        )
    answer = json.loads(stale.value.read())
    assert stale.value.code == 409 and answer["reason"] == "Conflict"
    assert answer["message"] == (
        'Operation cannot be fulfilled on configmaps "c": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert api.get("configmaps", ns, "c")["metadata"]["labels"] == {"a": "1"}
    # The status subresource of a custom resource checks it too (the operator's status writes).
    ftj = api.create("finetunejobs", ns, _ftj(ns, "occ"))
    path = api.path("finetunejobs", ns, "occ") + "/status"
    body = {
        "metadata": {"resourceVersion": ftj["metadata"]["resourceVersion"]},
        "status": {"phase": "Pending"},
    }
    assert (
        api.request("PATCH", path, body, "application/merge-patch+json")["status"]["phase"]
        == "Pending"
    )
    with pytest.raises(urllib.error.HTTPError) as again:
        api.request(
            "PATCH", path, {**body, "status": {"phase": "Running"}}, "application/merge-patch+json"
        )
    assert again.value.code == 409
    assert 'on finetunejobs.kubetune.dev "occ"' in json.loads(again.value.read())["message"]
    # PUT replaces the object, with the same precondition (what the Lease elector uses).
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "l", "namespace": ns},
        "spec": {"holderIdentity": "a"},
    }
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    stored = api.request("POST", lease_path, lease)
    taken = api.request("PUT", f"{lease_path}/l", {**stored, "spec": {"holderIdentity": "b"}})
    assert (
        taken["spec"] == {"holderIdentity": "b"}
        and taken["metadata"]["uid"] == stored["metadata"]["uid"]
    )
    with pytest.raises(urllib.error.HTTPError) as racing:
        api.request("PUT", f"{lease_path}/l", {**stored, "spec": {"holderIdentity": "c"}})
    assert racing.value.code == 409
    assert api.request("GET", f"{lease_path}/l")["spec"]["holderIdentity"] == "b"


def test_lists_come_in_pages_at_one_resource_version(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    _, api, _ = node
    ns = "emu-pages"
    for i in range(5):
        api.create("configmaps", ns, _config_map(ns, f"c{i}", page="yes"))
    path = api.path("configmaps", ns) + "?labelSelector=page%3Dyes&limit=2"
    first = api.request("GET", path)
    names = [o["metadata"]["name"] for o in first["items"]]
    version, token = first["metadata"]["resourceVersion"], first["metadata"]["continue"]
    assert names == ["c0", "c1"] and first["metadata"]["remainingItemCount"] == 3
    while token:
        page = api.request("GET", f"{path}&continue={token}")
        assert page["metadata"]["resourceVersion"] == version
        names += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"c{i}" for i in range(5)]


def test_a_watch_resumes_from_a_resource_version_until_it_is_too_old(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    cluster, api, _ = node
    ns = "emu-watch"
    path = api.path("configmaps", ns)
    api.create("configmaps", ns, _config_map(ns, "before"))
    listed = api.request("GET", path)["metadata"]["resourceVersion"]
    api.create("configmaps", ns, _config_map(ns, "after"))
    api.patch("configmaps", ns, "after", {"metadata": {"labels": {"x": "1"}}})
    api.delete("configmaps", ns, "before")
    # From the list's version: exactly what happened since, in order; nothing listed already.
    # The deletion has a resourceVersion of its own (the tombstone's, newer than the object's).
    events = _watch(cluster, path, seconds=1.0, resourceVersion=listed)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"), ("MODIFIED", "after"), ("DELETED", "before"),
    ]  # fmt: skip
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(listed)
    # Without a version: the current objects as ADDED.
    current = _watch(cluster, path, seconds=1.0)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in current] == [("ADDED", "after")]
    # After compaction the old version is gone: one ERROR event, 410 Expired, and the end.
    # So is the newest version handed out before it (a client that was fully up to date): the
    # cluster's revision moved on meanwhile (see Emulator.expire_watches).
    newest = api.request("GET", path)["metadata"]["resourceVersion"]
    cluster.expire_watches()
    for version in (listed, newest):
        (expired,) = _watch(cluster, path, seconds=2.0, resourceVersion=version)
        assert expired["type"] == "ERROR"
        assert expired["object"]["code"] == 410 and expired["object"]["reason"] == "Expired"
        assert expired["object"]["message"] == f"too old resource version: {version}"
    # A list after it gives a version to watch from again.
    relisted = api.request("GET", path)["metadata"]["resourceVersion"]
    assert int(relisted) > int(newest)
    api.create("configmaps", ns, _config_map(ns, "later"))
    events = _watch(cluster, path, seconds=1.0, resourceVersion=relisted)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "later")]


def test_watches_get_bookmarks_and_end_after_their_timeout(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    cluster, api, _ = node
    ns = "emu-bookmarks"
    assert cluster.emulator is not None
    saved, cluster.emulator.bookmark_seconds = cluster.emulator.bookmark_seconds, 0.3
    try:
        version = api.request("GET", api.path("configmaps", ns))["metadata"]["resourceVersion"]
        api.create("configmaps", "elsewhere", _config_map("elsewhere", "moves-the-revision"))
        started = time.monotonic()
        events = _watch(
            cluster, api.path("configmaps", ns), seconds=5.0, resourceVersion=version,
            allowWatchBookmarks="true", timeoutSeconds="1",
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        cluster.emulator.bookmark_seconds = saved
    assert 0.9 < elapsed < 3, elapsed  # the server ended it after timeoutSeconds
    assert events and all(e["type"] == "BOOKMARK" for e in events)
    # A bookmark carries only a resourceVersion, and it moves past changes elsewhere.
    assert set(events[-1]["object"]["metadata"]) == {"resourceVersion"}
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) > int(version)


# -- the Job controller, the TTL controller, the scheduler and the kubelet -------------------


def test_job_conditions_come_in_the_real_order(node: tuple[Cluster, Client, Kubelet]) -> None:
    _, api, _ = node
    ns = "emu-order"
    api.create("jobs", ns, _job(ns, "ok"))
    interim = wait_until(
        "SuccessCriteriaMet", lambda: "SuccessCriteriaMet" in _conditions(api.get("jobs", ns, "ok"))
    )
    job = api.get("jobs", ns, "ok")
    assert "Complete" not in _conditions(job) and "completionTime" not in job["status"], interim
    assert job["status"]["succeeded"] == 1 and job["status"]["active"] == 0
    wait_until("Complete", lambda: "Complete" in _conditions(api.get("jobs", ns, "ok")))
    assert api.get("jobs", ns, "ok")["status"]["completionTime"]


def test_failure_target_comes_before_failed(node: tuple[Cluster, Client, Kubelet]) -> None:
    _, api, _ = node
    ns = "emu-failure"
    api.create("jobs", ns, _job(ns, "slow", activeDeadlineSeconds=0))
    wait_until("FailureTarget", lambda: "FailureTarget" in _conditions(api.get("jobs", ns, "slow")))
    assert "Failed" not in _conditions(api.get("jobs", ns, "slow"))
    failed = wait_until("Failed", lambda: _conditions(api.get("jobs", ns, "slow")).get("Failed"))
    assert failed["reason"] == "DeadlineExceeded"


def test_a_finished_job_is_deleted_after_its_ttl(node: tuple[Cluster, Client, Kubelet]) -> None:
    _, api, _ = node
    ns = "emu-ttl"
    api.create("jobs", ns, _job(ns, "short", ttlSecondsAfterFinished=0))
    wait_until("the pod", lambda: _pods(api, ns, "short"))
    wait_until("the Job to be deleted", lambda: api.get("jobs", ns, "short") is None)
    wait_until("its pods to go with it", lambda: not _pods(api, ns, "short"))


def test_suspending_a_job_deletes_its_pods(node: tuple[Cluster, Client, Kubelet]) -> None:
    _, api, kubelet = node
    ns = "emu-suspend"
    saved, kubelet.fake_seconds = kubelet.fake_seconds, 60.0
    try:
        api.create("jobs", ns, _job(ns, "long"))
        wait_until("the pod", lambda: _pods(api, ns, "long"))
    finally:
        kubelet.fake_seconds = saved
    api.patch("jobs", ns, "long", {"spec": {"suspend": True}})
    wait_until("its pod to be deleted", lambda: not _pods(api, ns, "long"))
    suspended = wait_until(
        "Suspended", lambda: _conditions(api.get("jobs", ns, "long")).get("Suspended")
    )
    assert suspended["reason"] == "JobSuspended"
    assert api.get("jobs", ns, "long")["status"]["active"] == 0


# fmt: off
WAITING = [
    pytest.param({"nodeSelector": {"gpu": "h100"}}, "Unschedulable", "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector", id="node-selector"),
    pytest.param({"containers": [{"name": "trainer", "image": "t", "command": ["true"], "resources": {"limits": {"nvidia.com/gpu": "16"}}}]}, "Unschedulable", "1 Insufficient nvidia.com/gpu", id="too-many-gpus"),
    pytest.param({"containers": [{"name": "trainer", "image": "unreachable.example.com/t:1", "command": ["true"]}]}, "ImagePullBackOff", 'Back-off pulling image "unreachable.example.com/t:1"', id="image-pull"),
    pytest.param({"containers": [{"name": "trainer", "image": "t", "command": ["true"], "envFrom": [{"secretRef": {"name": "creds"}}]}]}, "CreateContainerConfigError", 'secret "creds" not found', id="missing-secret"),
    pytest.param({"containers": [{"name": "trainer", "image": "t", "command": ["true"], "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}]}]}, "CreateContainerConfigError", 'secret "hf" not found', id="missing-secret-of-a-key"),
]
# fmt: on


@pytest.mark.parametrize(("pod", "reason", "message"), WAITING)
def test_pods_that_cannot_start_stay_pending_and_say_why(
    node: tuple[Cluster, Client, Kubelet], pod: dict[str, Any], reason: str, message: str
) -> None:
    _, api, _ = node
    ns = f"emu-wait-{reason.lower()}"[:40]
    name = f"w{abs(hash(json.dumps(pod))) % 10000}"
    api.create("jobs", ns, _job(ns, name, pod=pod))

    def why() -> tuple[str, str] | None:
        pods = _pods(api, ns, name)
        status = (pods[0].get("status") or {}) if pods else {}
        for cond in status.get("conditions") or []:
            if cond["type"] == "PodScheduled" and cond["status"] == "False":
                return cond["reason"], cond["message"]
        for c in status.get("containerStatuses") or []:
            waiting = c["state"].get("waiting")
            if waiting and waiting["reason"] == reason:
                return waiting["reason"], waiting["message"]
        return None

    got = wait_until(f"{reason}", why)
    assert got[0] == reason and message in got[1]
    time.sleep(0.5)
    (pending,) = _pods(api, ns, name)
    assert pending["status"]["phase"] == "Pending"
    job = api.get("jobs", ns, name)
    assert (job["status"]["active"], job["status"]["ready"]) == (1, 0)  # Pending counts active
    if reason == "CreateContainerConfigError":  # the kubelet retries: the Secret appears, it runs
        named = message.split('"')[1]  # the Secret the message names
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": named},
                  "data": {"HF_TOKEN": "eA=="}}  # fmt: skip
        api.create("secrets", ns, secret)
        wait_until("Complete", lambda: "Complete" in _conditions(api.get("jobs", ns, name)))


# -- Indexed Jobs and the pods of a headless Service ------------------------------------------

INDEX = "batch.kubernetes.io/job-completion-index"


def _indexed(ns: str, name: str, completions: int = 2, **spec: Any) -> dict[str, Any]:
    return _job(
        ns,
        name,
        completionMode="Indexed",
        completions=completions,
        parallelism=completions,
        **spec,
    )


def test_an_indexed_job_runs_a_pod_per_index_until_each_succeeds(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    _, api, _ = node
    ns = "emu-indexed"
    api.create("jobs", ns, _indexed(ns, "pair"))
    wait_until("Complete", lambda: "Complete" in _conditions(api.get("jobs", ns, "pair")))
    pods = sorted(_pods(api, ns, "pair"), key=lambda p: p["metadata"]["annotations"][INDEX])
    assert [p["metadata"]["annotations"][INDEX] for p in pods] == ["0", "1"]
    assert [p["metadata"]["labels"][INDEX] for p in pods] == ["0", "1"]
    for index, pod in enumerate(pods):
        assert pod["metadata"]["name"].startswith(f"pair-{index}-")
        assert pod["spec"]["hostname"] == f"pair-{index}"
        env = pod["spec"]["containers"][0]["env"]
        assert {"name": "JOB_COMPLETION_INDEX", "value": str(index)} in env
    status = api.get("jobs", ns, "pair")["status"]
    assert (status["succeeded"], status["completedIndexes"]) == (2, "0-1")


def test_a_failed_index_is_replaced_and_counted_until_the_backoff_limit(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    _, api, kubelet = node
    ns = "emu-indexed-fail"
    saved, kubelet.fake_seconds = kubelet.fake_seconds, 60.0
    try:
        api.create("jobs", ns, _indexed(ns, "group", backoffLimit=1))

        def running(index: str) -> list[dict[str, Any]]:
            return [
                p
                for p in _pods(api, ns, "group")
                if p["metadata"]["annotations"][INDEX] == index
                and (p.get("status") or {}).get("phase") == "Running"
            ]

        first = wait_until("index 1 runs", lambda: running("1"))[0]["metadata"]["name"]
        kubelet.kill(first)
        second = wait_until(
            "index 1 replaced",
            lambda: [p for p in running("1") if p["metadata"]["name"] != first],
        )[0]["metadata"]["name"]
        job = api.get("jobs", ns, "group")
        assert job["status"]["failed"] == 1 and "Failed" not in _conditions(job)
        (zero,) = running("0")  # the other index runs on, untouched
        kubelet.kill(second)
        failed = wait_until(
            "Failed", lambda: _conditions(api.get("jobs", ns, "group")).get("Failed")
        )
    finally:
        kubelet.fake_seconds = saved
    assert failed["reason"] == "BackoffLimitExceeded"
    # The Job controller terminated the pod still running.
    pod = api.get("pods", ns, zero["metadata"]["name"])
    assert pod["status"]["phase"] == "Failed"


def test_a_second_create_of_a_name_is_already_exists(node: tuple[Cluster, Client, Kubelet]) -> None:
    """apimachinery's errors.NewAlreadyExists: 409, reason AlreadyExists, `<resource> "<name>"
    already exists` (the resource qualified by its group)."""
    _, api, _ = node
    ns = "emu-exists"
    api.create("configmaps", ns, _config_map(ns, "once"))
    with pytest.raises(urllib.error.HTTPError) as again:
        api.create("configmaps", ns, _config_map(ns, "once"))
    answer = json.loads(again.value.read())
    assert (again.value.code, answer["reason"]) == (409, "AlreadyExists")
    assert answer["message"] == 'configmaps "once" already exists'
    api.create("finetunejobs", ns, _ftj(ns, "twice"))
    with pytest.raises(urllib.error.HTTPError) as twice:
        api.create("finetunejobs", ns, _ftj(ns, "twice"))
    assert json.loads(twice.value.read())["message"] == (
        'finetunejobs.kubetune.dev "twice" already exists'
    )


def test_namespaces_and_profiles_are_cluster_scoped_objects(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    """Namespaces are served at /api/v1/namespaces[/NAME] (create, get, list, label patch);
    FineTuneProfiles at /apis/kubetune.dev/v1alpha1/finetuneprofiles[/NAME], admitted by their
    CRD (its CEL rules, the quantity library included) as FineTuneJobs are by theirs."""
    _, api, _ = node
    api.create("namespaces", "", {"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": "emu-team", "labels": {"a": "1"}}})  # fmt: skip
    api.patch("namespaces", "", "emu-team", {"metadata": {"labels": {"a": "2"}}})
    listed = {n["metadata"]["name"]: n for n in api.list("namespaces")}
    assert listed["emu-team"]["metadata"]["labels"] == {"a": "2"}
    assert api.list("configmaps", "emu-team") == []  # a namespaced path is still one

    def profile(name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneProfile"}
        return {**body, "metadata": {"name": name}, "spec": spec}

    created = api.create("finetuneprofiles", "", profile("emu-pool", limits={"memory": "8Gi"}))
    assert "namespace" not in created["metadata"] and created["metadata"]["generation"] == 1
    assert created["spec"]["default"] is False  # defaulted by the schema
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.create(
            "finetuneprofiles",
            "",
            profile("emu-over", resources={"memory": "9Gi"}, limits={"memory": "8Gi"}),
        )
    answer = json.loads(refused.value.read())
    assert refused.value.code == 422
    assert answer["message"].startswith('FineTuneProfile.kubetune.dev "emu-over" is invalid: ')
    assert "spec.resources.memory: Invalid value: resources.memory (a default)" in answer["message"]
    patched = api.patch("finetuneprofiles", "", "emu-pool", {"spec": {"limits": {"gpus": 2}}})
    assert patched["metadata"]["generation"] == 2


def test_an_env_var_from_a_secret_key_waits_for_the_key(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    """kubelet_pods.go makeEnvironmentVariables: a Secret without the key is `couldn't find key
    KEY in Secret NS/NAME` (CreateContainerConfigError); once the key is there the container
    starts with the value."""
    _, api, _ = node
    ns = "emu-secret-key"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": ns},
              "data": {"OTHER": "eA=="}}  # fmt: skip
    api.create("secrets", ns, secret)
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}]
    container = {"name": "trainer", "image": "t", "command": ["true"], "env": env}
    api.create("jobs", ns, _job(ns, "token", pod={"containers": [container]}))

    why = wait_until("the missing key", lambda: _waiting(api, ns, "token"))
    assert why == {
        "reason": "CreateContainerConfigError",
        "message": f"couldn't find key HF_TOKEN in Secret {ns}/hf",
    }
    api.patch("secrets", ns, "hf", {"data": {"HF_TOKEN": "aGZfeHl6"}})
    wait_until(
        "the pod to finish",
        lambda: (p := _pods(api, ns, "token")) and p[0]["status"].get("phase") == "Succeeded",
    )


def test_a_pod_waits_in_container_creating_for_its_config_map(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    """As the kubelet does: volumes are mounted before anything starts; a missing ConfigMap
    keeps the pod ContainerCreating (it is retried), never fails it."""
    _, api, _ = node
    ns = "emu-config-map"
    volume = {"name": "config", "configMap": {"name": "later"}}
    container = {"name": "trainer", "image": "t", "command": ["true"],
                 "volumeMounts": [{"name": "config", "mountPath": "/etc/kubetune"}]}  # fmt: skip
    api.create("jobs", ns, _job(ns, "mounts", pod={"containers": [container], "volumes": [volume]}))

    waiting = wait_until("the missing ConfigMap", lambda: _waiting(api, ns, "mounts"))
    assert waiting == {"reason": "ContainerCreating"}
    time.sleep(1.0)
    assert _pods(api, ns, "mounts")[0]["status"]["phase"] == "Pending"
    api.create("configmaps", ns, _config_map(ns, "later"))
    wait_until(
        "the pod to finish",
        lambda: (p := _pods(api, ns, "mounts")) and p[0]["status"].get("phase") == "Succeeded",
    )


def test_a_status_for_an_object_deleted_on_the_server_is_dropped(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    """The garbage collector can delete a Job and its pod while the kubelet starts it (a
    FineTuneSchedule deleted as its run's pod starts): the kubelet's status manager drops an
    update for a pod the server no longer has, the Job controller one for a deleted Job."""
    _, api, kubelet = node
    gone = PodRun("never-there", "emu-gone", "uid-gone", kubelet.workdir / "emu-gone")
    kubelet._pod_status(gone, {"phase": "Pending"})  # no exception: dropped
    assert api.get("pods", "emu-gone", "never-there") is None
    # Likewise the Job controller's status write for a Job deleted meanwhile.
    job = {**_job("emu-gone", "deleted"), "status": {}}
    kubelet._job_status(job, {"active": 1})
    assert api.get("jobs", "emu-gone", "deleted") is None
    assert not kubelet.errors


def test_a_failed_pod_is_replaced_after_the_job_controllers_back_off(
    node: tuple[Cluster, Client, Kubelet],
) -> None:
    """10 s, 20 s, 40 s ... after each counted failure (here 1 s, 2 s): the replacement waits."""
    _, api, kubelet = node
    ns = "emu-backoff"
    saved, kubelet.fake_seconds = kubelet.fake_seconds, 60.0
    try:
        api.create("jobs", ns, _job(ns, "flaky", backoffLimit=3))
        waits = []
        for _ in range(2):
            (pod,) = wait_until(
                "a running pod",
                lambda: [
                    p for p in _pods(api, ns, "flaky")
                    if (p.get("status") or {}).get("phase") == "Running"
                ],
            )  # fmt: skip
            victim = pod["metadata"]["name"]
            kubelet.kill(victim)
            killed = time.monotonic()
            wait_until(
                "its replacement",
                lambda victim=victim: [
                    p for p in _pods(api, ns, "flaky")
                    if p["metadata"]["name"] != victim
                    and (p.get("status") or {}).get("phase") != "Failed"
                ],
            )  # fmt: skip
            waits.append(time.monotonic() - killed)
    finally:
        kubelet.fake_seconds = saved
    assert 1.0 <= waits[0] < 1.9 and 2.0 <= waits[1] < 2.9, waits
