"""The operator's own API clients on the real API server: the leader election's Lease
(controller/leader.py; its behaviour under faults is tested on a fake clock in
tests/unit/test_leader.py) and the Event recorder's correlation (controller/kube.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.error
from datetime import UTC, datetime, timedelta

import kubernetes

from kubetune.controller.kube import Kube
from kubetune.controller.leader import LeaderElector, lease_api
from tests.support.control_plane import ControlPlane

NAME = "kubetune-operator"


def _client(plane: ControlPlane) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(str(plane.admin))


def _namespace(plane: ControlPlane, name: str) -> str:
    try:
        plane.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise
    return name


def test_a_stopped_leader_releases_the_lease_and_the_standby_leads(plane: ControlPlane) -> None:
    namespace = _namespace(plane, "leases-release")
    api = lease_api(_client(plane))
    leading: dict[str, threading.Event] = {me: threading.Event() for me in ("a", "b")}
    electors = {
        me: LeaderElector(
            api,
            namespace,
            NAME,
            me,
            lease_duration=60.0,
            renew_deadline=10.0,
            retry_period=0.1,
            on_started=leading[me].set,
            on_lost=lambda: None,
        )
        for me in ("a", "b")
    }
    electors["a"].start()
    assert leading["a"].wait(30)
    electors["b"].start()
    try:
        lease = api.read_namespaced_lease(NAME, namespace)
        assert lease.spec.holder_identity == "a" and lease.spec.lease_duration_seconds == 60
        assert not leading["b"].wait(0.5)  # a standby, while "a" renews
        electors["a"].stop()
        # The Lease lasts a minute; "b" leads long before it would have expired.
        assert leading["b"].wait(30)
        lease = api.read_namespaced_lease(NAME, namespace)
        assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1
    finally:
        electors["b"].stop()
    assert not api.read_namespaced_lease(NAME, namespace).spec.holder_identity


CHILD = """
import sys, threading, kubernetes
from kubetune.controller.leader import elect
from kubetune.controller.settings import OperatorSettings

settings = OperatorSettings(leader_election_namespace=sys.argv[2], lease_duration_seconds=60,
                            renew_deadline_seconds=10, retry_period_seconds=1)
leading = threading.Event()
elect(kubernetes.config.new_client_from_config(sys.argv[1]), settings, leading.set, sys.exit)
print("leading" if leading.wait(60) else "not leading", flush=True)
"""  # then the interpreter exits as after kopf's SIGTERM handling: atexit stops the elector


def test_a_normal_exit_releases_the_lease(plane: ControlPlane) -> None:
    namespace = _namespace(plane, "leases-exit")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(plane.admin), namespace],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0 and child.stdout == "leading\n", child.stderr
    spec = lease_api(_client(plane)).read_namespaced_lease(NAME, namespace).spec
    assert not spec.holder_identity and spec.lease_duration_seconds == 1


def test_the_same_event_again_is_counted_not_posted_anew(plane: ControlPlane) -> None:
    """client-go's EventCorrelator: a repeat within ten minutes patches count and lastTimestamp."""
    namespace = _namespace(plane, "events-correlated")
    kube = Kube(_client(plane))
    owner = {"metadata": {"name": "demo", "namespace": namespace, "uid": "u-1"}}
    start = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    for minutes in (0, 1, 2):
        kube.event(
            owner, "Warning", "TrainerWarning", "slow disk", start + timedelta(minutes=minutes)
        )
    kube.event(owner, "Normal", "Running", "training", start)
    kube.event(owner, "Warning", "TrainerWarning", "slow disk", start + timedelta(minutes=20))
    events = plane.client().list("events", namespace)

    def at(stamp: str) -> str:  # the client may send +00:00; the API server stores Z
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).strftime("%H:%M")

    summary = sorted(
        (e["reason"], e["count"], at(e["firstTimestamp"]), at(e["lastTimestamp"])) for e in events
    )
    assert summary == [
        ("Running", 1, "12:00", "12:00"),
        ("TrainerWarning", 1, "12:20", "12:20"),  # more than ten minutes later: a new Event
        ("TrainerWarning", 3, "12:00", "12:02"),
    ]
