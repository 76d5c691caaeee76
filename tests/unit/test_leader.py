"""Leader election (controller/leader.py) under API faults, as client-go's elector behaves: a failed
Lease call is one failed attempt, never an exit for a standby; the leader gives up at its renew
deadline, before its Lease can expire; every request is cut at the time left; a stopped leader
releases the Lease so a standby takes over at its next try; two electors never lead at once.

Most tests drive `step()` on a fake clock against an in-memory Lease store with resourceVersion
preconditions (as the API server's registry); one goes over real HTTP on 127.0.0.1: a socket that
accepts and never answers (a black-holed API server). The Lease on the real API server:
tests/e2e/test_clients.py.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes.client import V1Lease
from kubernetes.client.exceptions import ApiException

from kubetune.controller.leader import LeaderElector, lease_api

DURATION, DEADLINE, RETRY = 15.0, 10.0, 2.0
NAMESPACE, NAME = "kubetune-system", "kubetune-operator"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reset() -> Exception:
    return urllib3.exceptions.ProtocolError(
        "Connection aborted.", ConnectionResetError(104, "Connection reset by peer")
    )


def refused() -> Exception:
    return urllib3.exceptions.MaxRetryError(
        None, "/", urllib3.exceptions.NameResolutionError("api", None, socket.gaierror(-2))
    )


def server_error() -> Exception:
    return ApiException(status=500, reason="Internal Server Error")


def forbidden() -> Exception:
    return ApiException(status=403, reason="Forbidden")


def garbage() -> Exception:
    return ValueError("Expecting value: line 1 column 1 (char 0)")  # a proxy's HTML page


class Leases:
    """One Lease as the API server's registry keeps it: 404 when absent, 409 on a create of an
    existing one or a PUT whose resourceVersion is not the stored one."""

    def __init__(self) -> None:
        self.lease: V1Lease | None = None
        self.version = 0

    def store(self, lease: V1Lease) -> V1Lease:
        self.version += 1
        stored = lease.model_copy(deep=True)
        stored.metadata.resource_version = str(self.version)
        self.lease = stored
        return stored.model_copy(deep=True)

    @property
    def holder(self) -> str | None:
        return self.lease.spec.holder_identity if self.lease else None


class Api:
    """CoordinationV1Api's three Lease calls for one replica, with that replica's faults: `fault`
    (a factory) fails every call while set; `hang` makes every call take its whole timeout on the
    fake clock and then fail; `lose_reply` applies a write and then fails it."""

    def __init__(self, leases: Leases, clock: Clock) -> None:
        self.leases, self.clock = leases, clock
        self.fault: Callable[[], Exception] | None = None
        self.hang = False
        self.lose_reply = False
        self.timeouts: list[tuple[float, float]] = []  # (clock, _request_timeout)

    def _enter(self, timeout: float) -> None:
        assert timeout > 0
        self.timeouts.append((self.clock.now, timeout))
        if self.hang:
            self.clock.now += timeout
            raise urllib3.exceptions.ReadTimeoutError(None, "/", "Read timed out.")
        if self.fault is not None:
            raise self.fault()

    def _wrote(self, lease: V1Lease) -> V1Lease:
        stored = self.leases.store(lease)
        if self.lose_reply:
            raise reset()
        return stored

    def read_namespaced_lease(self, name: str, namespace: str, *, _request_timeout: float) -> Any:
        self._enter(_request_timeout)
        if self.leases.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return self.leases.lease.model_copy(deep=True)

    def create_namespaced_lease(self, namespace: str, body: V1Lease, *, _request_timeout: float):
        self._enter(_request_timeout)
        if self.leases.lease is not None:
            raise ApiException(status=409, reason="Conflict")
        return self._wrote(body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: V1Lease, *, _request_timeout: float
    ) -> Any:
        self._enter(_request_timeout)
        if self.leases.lease is None:
            raise ApiException(status=404, reason="Not Found")
        if body.metadata.resource_version != self.leases.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        return self._wrote(body)


class Replica:
    """An elector with its callbacks recorded."""

    def __init__(self, me: str, leases: Leases, clock: Clock, **timing: float) -> None:
        self.api = Api(leases, clock)
        self.clock = clock
        self.started: list[float] = []
        self.lost_at: list[float] = []
        self.elector = LeaderElector(
            self.api,
            NAMESPACE,
            NAME,
            me,
            lease_duration=timing.get("duration", DURATION),
            renew_deadline=timing.get("deadline", DEADLINE),
            retry_period=timing.get("retry", RETRY),
            on_started=lambda: self.started.append(clock.now),
            on_lost=lambda: self.lost_at.append(clock.now),
            clock=clock,
        )

    def steps(self, until: float) -> None:
        """Step as run() does, on the fake clock, until `until` or the end of the campaign."""
        while self.clock.now < until and not self.elector.lost:
            delay = self.elector.step()  # first: a hung call moves the clock on
            self.clock.now += delay


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def leases() -> Leases:
    return Leases()


def leader(leases: Leases, clock: Clock) -> Replica:
    a = Replica("a", leases, clock)
    a.elector.step()
    assert a.elector.leading and a.started == [clock.now] and leases.holder == "a"
    return a


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(reset, id="connection-reset"),
        pytest.param(refused, id="dns-failure"),
        pytest.param(server_error, id="500"),
        pytest.param(garbage, id="not-json"),
    ],
)
def test_a_failed_renewal_is_retried_within_the_renew_deadline(
    leases: Leases, clock: Clock, fault: Callable[[], Exception]
) -> None:
    a = leader(leases, clock)
    a.api.fault = fault
    a.steps(until=clock.now + DEADLINE - RETRY - 1)  # four failed attempts in a row
    assert len(a.api.timeouts) >= 2 + 4
    assert a.elector.leading and not a.lost_at
    a.api.fault = None
    a.steps(until=clock.now + 3 * DEADLINE)  # renewed again: the deadline starts over
    assert a.elector.leading and not a.lost_at and a.started == [1000.0]


def test_the_leader_gives_up_at_its_renew_deadline_before_its_lease_can_expire(
    leases: Leases, clock: Clock
) -> None:
    a = leader(leases, clock)
    a.steps(until=clock.now + 5)
    renewed = a.elector.renewed
    a.api.fault = reset
    a.steps(until=clock.now + 100)
    assert a.lost_at == [pytest.approx(renewed + DEADLINE)]
    assert a.lost_at[0] < renewed + DURATION
    assert not a.elector.leading
    calls = len(a.api.timeouts)
    a.steps(until=clock.now + 100)  # the campaign is over: no more attempts
    assert len(a.api.timeouts) == calls


def test_a_hung_request_is_cut_at_the_time_left_before_the_deadline(
    leases: Leases, clock: Clock
) -> None:
    a = leader(leases, clock)
    renewed = a.elector.renewed
    a.api.timeouts.clear()
    a.api.hang = True  # a black-holed connection: every call takes its whole timeout
    a.steps(until=clock.now + 100)
    assert a.lost_at == [pytest.approx(renewed + DEADLINE)]
    assert a.api.timeouts
    for at, timeout in a.api.timeouts:
        assert timeout <= DEADLINE / 2  # client-go: renewDeadline / 2
        assert at + timeout <= renewed + DEADLINE + 1e-9  # never past the deadline


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(reset, id="connection-reset"),
        pytest.param(refused, id="dns-failure"),
        pytest.param(server_error, id="500"),
        pytest.param(forbidden, id="403"),
        pytest.param(garbage, id="not-json"),
        pytest.param(None, id="hung"),
    ],
)
def test_a_standby_never_exits_on_errors(
    leases: Leases, clock: Clock, fault: Callable[[], Exception] | None
) -> None:
    a = leader(leases, clock)
    b = Replica("b", leases, clock)
    b.api.fault, b.api.hang = fault, fault is None
    b.steps(until=clock.now + 600)  # ten minutes of an API outage, for the standby alone
    assert not b.lost_at and not b.started and not b.elector.lost
    assert len(b.api.timeouts) >= 600 / (DEADLINE / 2 + RETRY) - 1
    # The API is back, and the leader is gone (its last renewal was at the start): it takes over.
    b.api.fault = b.api.hang = None
    b.steps(until=clock.now + DURATION + 2 * RETRY)
    assert b.elector.leading and leases.holder == "b" and not a.lost_at
    assert leases.lease.spec.lease_transitions == 1


def test_a_standby_waits_out_the_lease_duration_on_its_own_clock(
    leases: Leases, clock: Clock
) -> None:
    leader(leases, clock)  # renews no more: its process is gone
    b = Replica("b", leases, clock)
    first = clock.now
    b.steps(until=clock.now + DURATION - 0.1)
    assert not b.started
    b.steps(until=clock.now + 2 * RETRY)
    assert b.started and first + DURATION <= b.started[0] <= first + DURATION + RETRY


def test_release_on_stop_hands_over_at_the_standbys_next_try(leases: Leases, clock: Clock) -> None:
    a = leader(leases, clock)
    b = Replica("b", leases, clock)
    b.steps(until=clock.now + 3 * RETRY)
    assert not b.started
    a.elector.stop()  # SIGTERM, once the reconciles stopped
    spec = leases.lease.spec
    assert not spec.holder_identity and spec.lease_duration_seconds == 1
    assert not a.lost_at and not a.elector.leading
    released = clock.now
    b.steps(until=clock.now + RETRY + 0.1)
    assert b.started and b.started[0] <= released + RETRY
    assert leases.holder == "b" and leases.lease.spec.lease_transitions == 1
    assert leases.lease.spec.lease_duration_seconds == DURATION


def test_a_leader_that_reads_another_holder_stops_at_once(leases: Leases, clock: Clock) -> None:
    a = leader(leases, clock)
    taken = leases.lease.model_copy(deep=True)
    taken.spec.holder_identity = "someone-else"
    leases.store(taken)
    a.elector.step()
    assert a.lost_at == [1000.0] and leases.holder == "someone-else"


@pytest.mark.parametrize("seed", range(6))
def test_two_electors_never_lead_at_once(seed: int) -> None:
    """Two replicas (a lost one restarts with a new identity, as its pod does) under random
    faults for each: errors, lost replies to applied writes, partitions of either side. Whenever
    one starts leading, no other elector still thinks it leads."""
    rng = random.Random(seed)
    clock, leases = Clock(), Leases()
    live: list[Replica] = []
    due: dict[int, float] = {}
    restarts = 0

    def spawn() -> None:
        nonlocal restarts
        restarts += 1
        replica = Replica(f"r{restarts}", leases, clock)
        inner = replica.elector.on_started

        def on_started() -> None:
            others = [r.elector.me for r in live if r is not replica and r.elector.leading]
            assert not others, f"{replica.elector.me} leads while {others} still do"
            inner()

        replica.elector.on_started = on_started
        live.append(replica)
        due[id(replica)] = clock.now

    spawn()
    spawn()
    takeovers = 0
    end = clock.now + 3000
    while clock.now < end:
        replica = min(live, key=lambda r: due[id(r)])
        clock.now = max(clock.now, due[id(replica)])
        api = replica.api
        roll = rng.random()
        if roll < 0.02:  # a partition of this replica starts (or ends)
            api.fault = None if api.fault else rng.choice([reset, refused, server_error])
        api.lose_reply = rng.random() < 0.05
        was_leading = replica.elector.leading
        delay = replica.elector.step()
        takeovers += replica.elector.leading and not was_leading
        if replica.elector.lost:
            live.remove(replica)
            spawn()
            due[id(live[-1])] = clock.now + 1.0  # the pod restarts
        else:
            due[id(replica)] = clock.now + delay
    assert takeovers >= 5 and restarts >= 4  # leadership did move around


# -- over real HTTP ---------------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_black_holed_api_server_cuts_each_request_and_the_leader_gives_up(
    leases: Leases, black_hole: tuple[int, list[socket.socket]]
) -> None:
    port, accepted = black_hole
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{port}"
    lost: list[float] = []
    elector = LeaderElector(
        Api(leases, Clock()),
        NAMESPACE,
        NAME,
        "a",
        lease_duration=3.0,
        renew_deadline=1.0,
        retry_period=0.2,
        on_started=lambda: None,
        on_lost=lambda: lost.append(time.monotonic()),
    )
    elector.step()
    assert elector.leading
    elector.api = lease_api(kubernetes.client.ApiClient(config))
    attempts: list[int] = []

    def campaign() -> None:
        while not elector.lost:
            time.sleep(elector.step())
            attempts.append(len(accepted))

    thread = threading.Thread(target=campaign, daemon=True)
    thread.start()
    thread.join(60)  # only a guard: a request the timeout did not cut would hang here
    assert not thread.is_alive() and lost and not elector.leading
    # Each attempt's one request hung until its timeout and the client did not retry it inside
    # (urllib3 would by default: three more connections, each with a fresh timeout).
    assert 1 <= len(accepted) <= len(attempts)
