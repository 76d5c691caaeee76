"""Leader election on a coordination.k8s.io/v1 Lease, as client-go does it
(k8s.io/client-go/tools/leaderelection/leaderelection.go): the replica that holds the Lease
reconciles; the others keep their caches warm and try every `retry_period_seconds`.

Written here on CoordinationV1Api rather than with the kubernetes client's port of client-go
(kubernetes.leaderelection): its LeaseLock catches only ApiException, so one reset connection or
DNS failure ended the campaign (on_lost, and the process exited, standby or leader), and its
Lease calls had no request timeout, so a black-holed connection stalled the leader's renewal
without it ever giving up while a standby took the Lease (two leaders). What client-go does,
and this module with it:

- One attempt (client-go's tryAcquireOrRenew): GET the Lease (create it when there is none);
  PUT it with this replica as holder, carrying the resourceVersion read, so of two replicas
  racing for it one gets a 409. A standby takes the Lease only when it has no holder or its
  holder has not renewed it for its leaseDurationSeconds, timed on this replica's own monotonic
  clock from when it first saw the Lease's current resourceVersion (client-go's observedTime:
  no trust in another replica's wall clock). Any error is one failed attempt: an ApiException,
  a reset connection, a DNS failure, a timeout. A standby retries forever; it never exits.
- The leader renews every retry period and gives up (on_lost; the caller exits, as
  controller-runtime's manager does) once `renew_deadline_seconds` have passed since the start
  of its last successful renewal (client-go's RenewDeadline); it also gives up at once when it
  reads another holder. Every request's timeout is the time left before that deadline, at most
  half the deadline (client-go's resourcelock.NewFromKubeconfig: renewDeadline / 2), and the
  client makes no retries of its own, so a hung connection cannot hold the leader past it.
  Settings keep renew deadline < lease duration, so the leader stops before a standby can see
  the Lease expire.
- stop() releases the Lease as client-go's ReleaseOnCancel does: holder cleared,
  leaseDurationSeconds 1, so on a rolling update the standby takes over at its next try rather
  than after a lease duration. Call it only once this replica has stopped reconciling; elect()
  has it called at the process's normal exit, which comes after kopf's cleanup stopped the
  controller.

Why a Lease and not kopf's peering: kopf's peering pauses operators of a lower priority while one
of a higher priority is alive, but replicas of one Deployment share a priority, and then kopf
lets all of them run (it only warns); it also needs its own cluster-wide CRD. A Lease is what
Kubernetes' own controllers, controller-runtime (Kueue, KubeRay, Kubeflow Trainer) and client-go
use, and `kubectl get lease` shows who leads.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def lease_namespace(settings: OperatorSettings) -> str:
    if settings.leader_election_namespace:
        return settings.leader_election_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return "default"


def identity() -> str:
    """The pod's name (HOSTNAME in a pod) and a random suffix, as client-go's id_uuid does."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_now() -> datetime:
    # A Lease's times are MicroTime (six fraction digits); the client writes a datetime with
    # isoformat(), which leaves the fraction out when it is zero, and the API server refuses that.
    now = datetime.now(UTC)
    return now + timedelta(microseconds=1) if now.microsecond == 0 else now


class LeaderElector:
    """One replica's campaign for one Lease. `step()` is one attempt and what follows from it;
    `run()` repeats it until stop() or a lost leadership. The callbacks run on the elector's
    thread, inside the step."""

    def __init__(
        self,
        api: Any,  # CoordinationV1Api, or a test's stand-in
        namespace: str,
        name: str,
        me: str,
        *,
        lease_duration: float,
        renew_deadline: float,
        retry_period: float,
        on_started: Callable[[], None],
        on_lost: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _micro_now,
    ) -> None:
        self.api = api
        self.namespace, self.name, self.me = namespace, name, me
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.request_timeout = renew_deadline / 2  # client-go: resourcelock.NewFromKubeconfig
        self.on_started, self.on_lost = on_started, on_lost
        self.clock, self.wall = clock, wall
        self.leading = False
        self.lost = False
        self.renewed = 0.0  # clock at the start of the last successful renewal
        self.holder: str | None = None  # as last read
        self._observed: tuple[str | None, float] = (None, 0.0)  # resourceVersion, first seen at
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # one step or the release at a time
        self._thread: threading.Thread | None = None

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        log.info("%s campaigns for Lease %s/%s", self.me, self.namespace, self.name)
        self._thread = threading.Thread(target=self.run, name="kubetune-leader", daemon=True)
        self._thread.start()

    def run(self) -> None:
        while not self._stopped.is_set() and not self.lost:
            try:
                delay = self.step()
            except Exception:  # a callback's fault; the attempts themselves raise nothing
                log.exception("leader election step failed")
                delay = self.retry_period
            self._stopped.wait(delay)

    def stop(self) -> None:
        """Stop campaigning; if leading, release the Lease (client-go's ReleaseOnCancel)."""
        self._stopped.set()
        if not self._lock.acquire(timeout=2 * self.request_timeout + self.retry_period):
            log.warning("leader election: a Lease request hangs; not releasing the Lease")
            return
        try:
            if self.leading and not self.lost:
                self._release()
            self.leading = False
        finally:
            self._lock.release()

    # -- one attempt ------------------------------------------------------------------------------

    def step(self) -> float:
        """One tryAcquireOrRenew and its consequences; returns the seconds until the next."""
        with self._lock:
            if self._stopped.is_set() or self.lost:
                return 0.0
            started = self.clock()
            if self.leading and started - self.renewed >= self.renew_deadline:
                return self._lose(f"not renewed within {self.renew_deadline:g}s")
            try:
                won = self._try_acquire_or_renew()
            except Exception as exc:  # client-go: every error is one failed attempt
                log.warning(
                    "Lease %s/%s: attempt failed: %s", self.namespace, self.name, _short(exc)
                )
                won = False
            if won:
                self.renewed = started
                if not self.leading:
                    self.leading = True
                    log.info("%s leads (Lease %s/%s)", self.me, self.namespace, self.name)
                    self.on_started()
            elif self.leading and self.holder and self.holder != self.me:
                return self._lose(f"{self.holder} holds the Lease")
            if not self.leading:
                return self.retry_period
            left = self.renewed + self.renew_deadline - self.clock()
            if left <= 0:
                return self._lose(f"not renewed within {self.renew_deadline:g}s")
            return min(self.retry_period, left)

    def _lose(self, why: str) -> float:
        self.leading, self.lost = False, True
        log.error("%s lost the Lease %s/%s: %s", self.me, self.namespace, self.name, why)
        self.on_lost()
        return 0.0

    def _timeout(self) -> float:
        if not self.leading:
            return self.request_timeout
        left = self.renewed + self.renew_deadline - self.clock()
        if left <= 0:
            raise TimeoutError("the renew deadline passed")
        return min(self.request_timeout, left)

    def _read(self, timeout: float) -> V1Lease | None:
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        version = lease.metadata.resource_version
        if version != self._observed[0]:
            self._observed = (version, self.clock())
        self.holder = lease.spec.holder_identity if lease.spec else None
        return lease

    def _wrote(self, lease: V1Lease) -> bool:
        self._observed = (lease.metadata.resource_version, self.clock())
        self.holder = self.me
        return True

    def _try_acquire_or_renew(self) -> bool:
        now = self.wall()
        lease = self._read(self._timeout())
        if lease is None:
            spec = self._spec(acquired=now, renewed=now, transitions=0)
            meta = V1ObjectMeta(name=self.name, namespace=self.namespace)
            body = V1Lease(metadata=meta, spec=spec)
            return self._wrote(
                self.api.create_namespaced_lease(
                    self.namespace, body, _request_timeout=self._timeout()
                )
            )
        old = lease.spec or V1LeaseSpec()
        transitions = old.lease_transitions or 0
        if old.holder_identity == self.me:
            acquired = old.acquire_time or now
        else:
            if self.leading:  # another replica holds it: give up (step), never take it back
                return False
            duration = old.lease_duration_seconds or self.lease_duration
            if old.holder_identity and self.clock() < self._observed[1] + duration:
                return False  # held, and renewed within its duration as far as we can tell
            acquired, transitions = now, transitions + 1
        lease.spec = self._spec(acquired=acquired, renewed=now, transitions=transitions)
        return self._wrote(
            self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self._timeout()
            )
        )

    def _spec(self, acquired: datetime, renewed: datetime, transitions: int) -> V1LeaseSpec:
        return V1LeaseSpec(
            holder_identity=self.me,
            lease_duration_seconds=int(self.lease_duration),
            acquire_time=acquired,
            renew_time=renewed,
            lease_transitions=transitions,
        )

    def _release(self) -> None:
        """client-go's release(): holder cleared, leaseDurationSeconds 1, the same transitions;
        a PUT on the resourceVersion just read, so a Lease another replica took is left alone."""
        try:
            lease = self._read(self.request_timeout)
            if lease is None or self.holder != self.me:
                return
            now = self.wall()
            lease.spec = V1LeaseSpec(
                lease_duration_seconds=1,
                acquire_time=now,
                renew_time=now,
                lease_transitions=(lease.spec.lease_transitions or 0) if lease.spec else 0,
            )
            self.api.replace_namespaced_lease(
                self.name, self.namespace, lease, _request_timeout=self.request_timeout
            )
            log.info("%s released the Lease %s/%s", self.me, self.namespace, self.name)
        except Exception as exc:  # the Lease then expires after its duration
            log.warning("Lease %s/%s not released: %s", self.namespace, self.name, _short(exc))


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def lease_api(client: kubernetes.client.ApiClient) -> kubernetes.client.CoordinationV1Api:
    """The Lease API on the operator's credentials, with no retries inside a request (urllib3
    would retry a failed connection three times, each with a fresh timeout): the elector's own
    loop retries, on its deadline."""
    config = copy.deepcopy(client.configuration)
    config.retries = 0
    return kubernetes.client.CoordinationV1Api(kubernetes.client.ApiClient(config))


def elect(
    client: kubernetes.client.ApiClient,
    settings: OperatorSettings,
    on_started: Callable[[], None],
    on_lost: Callable[[], None],
) -> LeaderElector:
    """Start campaigning in a daemon thread: on_started once this replica leads, on_lost if it
    then fails to renew (the caller exits, with os._exit). A normal exit of the process (kopf's
    SIGTERM handling returns after its cleanup handlers stopped the controller) stops the elector
    and so releases the Lease; a caller may stop() it earlier, once its reconciles stopped."""
    elector = LeaderElector(
        lease_api(client),
        lease_namespace(settings),
        settings.lease_name,
        identity(),
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
        on_started=on_started,
        on_lost=on_lost,
    )
    elector.start()
    atexit.register(elector.stop)
    return elector
