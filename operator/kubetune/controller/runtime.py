"""The operator's runtime, for every kind alike: informers feed the caches; each change (and
each of the operator's own writes) is offered to every controller, whose mapping names the
objects it wakes; one deduplicating work queue of typed requests; workers run the request's
controller and turn its outcome into queue actions, as controller-runtime's reconcileHandler
does. It names no kind: the controllers (finetunejob_controller.py, schedule_controller.py)
bring their reconcile, their I/O and the events that wake them. Framework-free (handlers.py
starts and stops it from kopf's start-up and clean-up), and API-free (kube.py does the I/O).

A reconcile's outcome becomes:
- a `Result`: the request's failures are forgotten; `requeue_after` queues it again after that
  many seconds (a schedule's next time); `resync` keeps it on the periodic resync, every
  `resync_seconds` (what controller-runtime calls SyncPeriod: a FineTuneJob that is not final,
  so nothing waits on an event that was never sent);
- None: the object is gone; it leaves the resync;
- `Conflict` (a 409 on a write): the object is read afresh into the cache once and the request
  retried with backoff;
- `Retry` (the API answered 429/5xx, or the reconcile waits for something): retried after the
  delay it asks for, with backoff; `Misconfigured` (the operator's own trouble, not the user's)
  the same, counted in kubetune_operator_reconcile_errors_total;
- any other exception: logged, retried with backoff; one bad object never stops a worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kubetune.controller.cache import TRIM, Informer, Store
from kubetune.controller.cached import (
    CHILDREN,
    CLUSTER_SCOPED,
    MANAGED_SELECTOR,
    OWNED,
    CachedKube,
)
from kubetune.controller.errors import Conflict, Misconfigured, Retry
from kubetune.controller.metrics import OperatorMetrics, Trigger
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.workqueue import WorkQueue

log = logging.getLogger("kubetune.operator")

Object = dict[str, Any]


class Request(NamedTuple):
    """One object to reconcile: the kind its controller reconciles (a plural, as the caches
    name kinds), its namespace and name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Result:
    """What a reconcile asks of the queue when it succeeded."""

    requeue_after: float | None = None  # come back after this many seconds
    resync: bool = False  # look again every resync_seconds (it is not final)


Enqueue = Callable[["Request", Trigger], None]


class Reconciler(Protocol):
    """One kind's controller, as the runtime runs it."""

    kind: str  # the plural of the kind it reconciles

    def reconcile(self, namespace: str, name: str) -> Result | None:
        """Bring one object in line; None: it is gone. Raises Conflict, Retry, Misconfigured."""
        ...

    def refresh(self, namespace: str, name: str) -> None:
        """Read the object afresh from the API into the cache (after a Conflict)."""
        ...

    def wakes(
        self, kind: str, old: Object | None, new: Object | None, own: bool
    ) -> Iterable[tuple[Request, Trigger]]:
        """The objects of its own kind a change of `kind` wakes (own: the operator's own write,
        reported as it is taken into the cache; otherwise the watch's)."""
        ...

    def resume(self, obj: Object) -> Trigger:
        """The trigger under which an object is reconciled on becoming the leader."""
        ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


Factory = Callable[[CachedKube, OperatorSettings, OperatorMetrics, Enqueue], Reconciler]


class Runtime:
    """Informers, caches, the work queue and the workers, for one operator process, running the
    controllers `kinds` makes. Reconciles run only while `leading` is set (at once without
    leader election); the informers run on every replica, so a standby takes over with warm
    caches."""

    def __init__(
        self,
        kube: Any,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
        kinds: Iterable[Factory],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.stores = {kind: Store(kind, OWNED[kind]) for kind in TRIM}
        self.cached = CachedKube(kube, self.stores, self._wrote)
        self.queue = WorkQueue(rate=settings.retry_rate, burst=settings.retry_burst)
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._triggers: dict[Request, Trigger] = {}
        self._resyncing: set[Request] = set()
        self._lock = threading.Lock()
        self.reconciles = 0
        self.controllers: dict[str, Reconciler] = {}
        for factory in kinds:
            controller = factory(self.cached, settings, metrics, self.enqueue)
            self.controllers[controller.kind] = controller
        namespaces: list[str | None] = list(settings.namespaces) or [None]
        self.informers = [
            Informer(
                kube,
                self.stores[kind],
                namespace,
                self._watched,
                selector=MANAGED_SELECTOR if kind in CHILDREN else None,
                page=settings.list_page_size,
            )
            for kind in TRIM
            for namespace in ([None] if kind in CLUSTER_SCOPED else namespaces)
        ]

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        for informer in self.informers:
            informer.start()
        for i in range(self.settings.workers):
            threading.Thread(target=self._work, name=f"kubetune-worker-{i}", daemon=True).start()
        threading.Thread(target=self._resync, name="kubetune-resync", daemon=True).start()
        for controller in self.controllers.values():
            controller.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.shut_down()
        for controller in self.controllers.values():
            controller.stop()
        for informer in self.informers:
            informer.stop()

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    def _wait_ready(self) -> bool:
        while not (self.synced and self.leading.is_set()):
            if self._stop.wait(0.2):
                return False
        return True

    def lead(self) -> None:
        """Became the leader (or runs without election): every cached object of every
        controller's kind is reconciled once, then the workers start."""
        for kind, controller in self.controllers.items():
            store = self.stores[kind]
            for key in store.names():
                obj = store.get(*key)
                if obj is not None:
                    self.enqueue(Request(kind, *key), controller.resume(obj))
        self.leading.set()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "synced": self.synced,
            "leading": self.leading.is_set(),
            "queued": len(self.queue),
            "cached": {kind: len(store) for kind, store in self.stores.items()},
            "reconciles": self.reconciles,
            "relists": sum(i.relists for i in self.informers),
        }
        for controller in self.controllers.values():
            stats.update(controller.stats())
        return stats

    # -- what wakes a reconcile -----------------------------------------------------------------

    def enqueue(self, request: Request, trigger: Trigger) -> None:
        with self._lock:
            self._triggers.setdefault(request, trigger)
        self.queue.add(request)

    def _watched(self, kind: str, old: Object | None, new: Object | None) -> None:
        self._offer(kind, old, new, own=False)

    def _wrote(self, kind: str, old: Object | None, new: Object | None) -> None:
        self._offer(kind, old, new, own=True)

    def _offer(self, kind: str, old: Object | None, new: Object | None, own: bool) -> None:
        for controller in self.controllers.values():
            for request, trigger in controller.wakes(kind, old, new, own):
                self.enqueue(request, trigger)

    def _resync(self) -> None:
        while not self._stop.wait(self.settings.resync_seconds):
            if not self.leading.is_set():
                continue
            with self._lock:
                due = sorted(self._resyncing)
            for request in due:
                self.enqueue(request, Trigger.RESYNC)

    # -- work -----------------------------------------------------------------------------------

    def _work(self) -> None:
        if not self._wait_ready():
            return
        while True:
            request = self.queue.get()
            if request is None:
                return
            try:
                self.handle(request)  # type: ignore[arg-type]
            finally:
                self.queue.done(request)

    def handle(self, request: Request) -> Result | None:
        """One reconcile of one request, and its outcome turned into queue actions."""
        controller = self.controllers[request.kind]
        with self._lock:
            trigger = self._triggers.pop(request, Trigger.RETRY)
        try:
            with self.metrics.reconcile_duration.labels(trigger).time():
                result = controller.reconcile(request.namespace, request.name)
                self.reconciles += 1
        except Conflict as exc:
            log.info("%s changed meanwhile; reading it again: %s", request, exc)
            try:
                controller.refresh(request.namespace, request.name)
            except Retry as again:
                self.queue.retry(request, again.delay)
            else:
                self.queue.retry(request)
            return None
        except Misconfigured as exc:
            self.metrics.reconcile_errors.labels(exc.reason).inc()
            delay = self.queue.retry(request, exc.delay)
            log.warning("reconcile of %s: %s (retry in %.0f s)", request, exc, delay)
            return None
        except Retry as exc:
            delay = self.queue.retry(request, exc.delay)
            log.info("reconcile of %s deferred %.1f s: %s", request, delay, exc)
            return None
        except Exception:
            log.exception("reconcile of %s failed", request)
            self.queue.retry(request)
            return None
        self.queue.forget(request)
        with self._lock:
            if result is not None and result.resync:
                self._resyncing.add(request)
            else:
                self._resyncing.discard(request)
        if result is not None and result.requeue_after is not None:
            with self._lock:
                self._triggers.setdefault(request, Trigger.TIMER)
            self.queue.add_after(request, result.requeue_after)
        return result
