"""The kopf wiring: which events call the reconcile, and how errors are retried. Thin on purpose.

Triggers, all calling the same level-based `reconcile(namespace, name)`:
- FineTuneJob created, its spec updated, or found at start-up (resume after a restart);
- an event on a batch/v1 Job labelled as a FineTuneJob's child (server-side label selector);
- a poller every `progressPollSeconds` for each FineTuneJob that is not final, which also reads
  the trainer's metrics into status.progress (so progress writes are at most one per interval);
  the metrics are read before the object's lock is taken, so a slow trainer holds no lock.
A FineTuneJob's DELETED watch event drops it from the poller and the operator's phase gauge.

No finalizer: children carry controller ownerReferences, so deleting a FineTuneJob lets the
garbage collector delete its ConfigMap, Job and pods, which stops the trainer.
kopf's own bookkeeping lives in `kubetune.dev/*` annotations; kopf posts no Events of its own
(the reconcile posts one per phase change).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kubetune.api import GROUP, PLURAL, VERSION
from kubetune.controller.build import JOB_LABEL, MANAGED_BY
from kubetune.controller.errors import Misconfigured, Retry
from kubetune.controller.kube import Kube, load_client
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.reconcile import Outcome, reconcile
from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

ANNOTATION_PREFIX = "kubetune.dev"
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
MAX_RETRY_DELAY = 60.0
POLL_WORKERS = 8


class Reconciler:
    """Runs reconciles, one at a time per FineTuneJob, and polls the ones that are not final.

    Handlers run in kopf's thread pool, so a Job event and a spec update for the same
    FineTuneJob could overlap: a striped lock serialises them. The poller is one thread for the
    whole operator (not a kopf timer per object: those need a finalizer on every FineTuneJob).
    """

    STRIPES = 64

    def __init__(self, kube: Kube, settings: OperatorSettings, metrics: OperatorMetrics) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self._locks = [threading.Lock() for _ in range(self.STRIPES)]
        self._active: set[tuple[str, str]] = set()
        # Where each running trainer's metrics are, as the last reconcile found them.
        self._targets: dict[tuple[str, str], tuple[str, int]] = {}
        self._active_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def __call__(
        self, namespace: str, name: str, trigger: str, metrics_text: str | None = None
    ) -> Outcome | None:
        key = (namespace, name)
        try:
            with (
                self._locks[hash(key) % self.STRIPES],
                self.metrics.reconcile_duration.labels(trigger).time(),
            ):
                outcome = reconcile(
                    self.kube, self.settings, namespace, name, metrics_text=metrics_text
                )
        except Misconfigured as exc:
            self.metrics.reconcile_errors.labels(exc.reason).inc()
            raise
        with self._active_lock:
            if outcome is None or outcome.final:
                self._active.discard(key)
                self._targets.pop(key, None)
            else:
                self._active.add(key)
                if outcome.metrics_target is None:
                    self._targets.pop(key, None)
                else:
                    self._targets[key] = outcome.metrics_target
        if outcome is None:
            self.metrics.forget(namespace, name)
        else:
            self.metrics.observe(
                namespace, name, outcome.before, outcome.after, outcome.status_written
            )
        return outcome

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: stop polling it and drop it from the metrics."""
        with self._active_lock:
            self._active.discard((namespace, name))
            self._targets.pop((namespace, name), None)
        self.metrics.forget(namespace, name)

    def start_polling(self) -> None:
        self._stop.clear()
        self._poller = threading.Thread(target=self._poll, name="kubetune-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(10)

    def _poll(self) -> None:
        """Every poll interval: reconcile each non-final FineTuneJob and read its progress, a few
        at a time (a trainer that does not answer costs its metrics timeout, not the round)."""
        with ThreadPoolExecutor(POLL_WORKERS, thread_name_prefix="kubetune-poll") as pool:
            while not self._stop.wait(self.settings.progress_poll_seconds):
                with self._active_lock:
                    active = sorted(self._active)
                list(pool.map(self._poll_one, active))

    def _poll_one(self, key: tuple[str, str]) -> None:
        namespace, name = key
        if self._stop.is_set():
            return
        with self._active_lock:
            target = self._targets.get(key)
        text = self.kube.metrics(*target) if target else None  # no lock held while it answers
        try:
            self(namespace, name, "poll", text)
        except Retry as exc:
            log.info("poll of %s/%s deferred: %s", namespace, name, exc)
        except Exception:  # one bad object must not stop the poller
            log.exception("poll of %s/%s failed", namespace, name)


def _temporary(exc: Retry, retry: int) -> kopf.TemporaryError:
    delay = min(MAX_RETRY_DELAY, exc.delay * 2**retry)
    return kopf.TemporaryError(str(exc), delay=delay)


def build_registry(
    operator_settings: OperatorSettings, kube: Kube, metrics: OperatorMetrics
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    reconciler = Reconciler(kube, operator_settings, metrics)
    ftj = {"group": GROUP, "version": VERSION, "plural": PLURAL, "registry": registry}

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:  # kopf's own settings
        storage = {"prefix": ANNOTATION_PREFIX}
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(**storage)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            **storage, key="last-handled-configuration"
        )
        settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
        settings.posting.enabled = False
        settings.watching.label_selectors["batch", "jobs"] = MANAGED_SELECTOR
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # With a list of namespaces, do not list or watch Namespace objects: the namespaced
        # install has Roles only, and the list is fixed anyway.
        settings.scanning.disabled = bool(operator_settings.namespaces)
        reconciler.start_polling()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    def on_change(trigger: str) -> Any:
        def handler(namespace: str, name: str, retry: int, **_: Any) -> None:
            try:
                reconciler(namespace, name, trigger)
            except Retry as exc:
                raise _temporary(exc, retry) from exc

        handler.__name__ = handler.__qualname__ = f"on_{trigger}"
        return handler

    kopf.on.resume(**ftj)(on_change("resume"))
    kopf.on.create(**ftj)(on_change("create"))
    kopf.on.update(**ftj, field="spec")(on_change("update"))

    @kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    def on_child(type: str | None, namespace: str, labels: dict[str, str], **_: Any) -> None:
        if type is None:
            return  # the initial listing: every FineTuneJob is reconciled by its resume handler
        try:
            reconciler(namespace, labels[JOB_LABEL], "job-event")
        except Retry as exc:  # the poller comes back to it
            log.info("reconcile of %s/%s deferred: %s", namespace, labels[JOB_LABEL], exc)

    # Only the DELETED events (kopf filters before calling, so other events cost nothing).
    @kopf.on.event(**ftj, when=lambda type, **_: type == "DELETED")
    def on_deleted(namespace: str, name: str, **_: Any) -> None:
        reconciler.forget(namespace, name)

    @kopf.on.cleanup(registry=registry)
    def stop(**_: Any) -> None:
        reconciler.stop_polling()

    return registry


def run(settings: OperatorSettings) -> None:
    """Run the operator until interrupted (the `kubetune operator` command)."""
    metrics = OperatorMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.bind_address)
    kube = Kube(load_client(), metrics)
    registry = build_registry(settings, kube, metrics)
    namespaces = settings.namespaces
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,  # one replica; no peering objects needed
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://{settings.bind_address}:{settings.health_port}/healthz"
            if settings.health_port
            else None,
        )
    )
