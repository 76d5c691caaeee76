"""The operator's runtime: informers feed caches and a work queue; workers reconcile from the
caches; a scraper reads running trainers' metrics within a budget. Framework-free (handlers.py
starts and stops it from kopf's start-up and clean-up), and API-free (kube.py does the I/O).

Triggers, all putting the FineTuneJob's key on one deduplicating queue:
- a FineTuneJob added, deleted, its spec changed (generation), its deletionTimestamp set, or its
  status changed by someone else (the operator's own status writes are in the cache before the
  watch reports them, so they trigger nothing);
- any change of a Job, Pod or ConfigMap labelled as its child (`kubetune.dev/finetunejob`);
- the scraper, when a trainer's step or stage changed since the last scrape;
- a resync every `resync_seconds` of each FineTuneJob that is not final (what controller-runtime
  calls SyncPeriod), so nothing waits on an event that was never sent;
- retries with backoff (workqueue.py).

In steady state a reconcile reads nothing from the API: the FineTuneJob, its Jobs, ConfigMaps
and Pods come from the caches. A Secret is read rarely: the storage Secret a FineTuneJob names,
to fetch the result.json of a finished run whose pod is gone, and the signing Secret of its
spec.notify.webhook, to sign a promotion's notification. A status write carries the cached
object's resourceVersion; a 409 means the cache was stale, so the object is read afresh once and
the key reconciled again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import (
    FINAL_PHASES,
    SCHEDULE_KIND,
    SCHEDULE_LABEL,
    SCHEDULE_PLURAL,
    FineTuneProfile,
)
from kubetune.api.wire import JOB_LABEL, MANAGED_BY
from kubetune.controller.cache import TRIM, Informer, Key, Store
from kubetune.controller.errors import Conflict, Misconfigured, Retry
from kubetune.controller.metrics import OperatorMetrics, Trigger
from kubetune.controller.observe import parse_metrics
from kubetune.controller.reconcile import Outcome, reconcile, reconcile_schedule
from kubetune.controller.settings import OperatorSettings
from kubetune.controller.workqueue import WorkQueue

log = logging.getLogger("kubetune.operator")

MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
CHILDREN = ("jobs", "configmaps", "pods", "services")
CLUSTER_SCOPED = ("finetuneprofiles", "namespaces")  # watched cluster-wide, unlabelled
# Each store's index: a run's children by its FineTuneJob, FineTuneJobs by their schedule.
OWNED = {kind: JOB_LABEL if kind in CHILDREN else None for kind in TRIM}
OWNED["finetunejobs"] = SCHEDULE_LABEL


def schedule_key(namespace: str, name: str) -> tuple[str, str, str]:
    """A FineTuneSchedule's key on the work queue (a FineTuneJob's is (namespace, name))."""
    return (SCHEDULE_KIND, namespace, name)


class CachedKube:
    """reconcile's KubeIO: reads from the caches, writes through the API into the caches."""

    def __init__(
        self,
        kube: Any,
        stores: dict[str, Store],
        on_stamped: Callable[[Key], None] | None = None,
    ) -> None:
        self.kube = kube
        self.stores = stores
        # A FineTuneJob the operator stamped is in the store before its watch event, which then
        # looks like no change: the controller is told here, so the new run is reconciled.
        self.on_stamped = on_stamped
        self._profiles: dict[str, tuple[str, FineTuneProfile | None]] = {}  # by resourceVersion
        self._profiles_lock = threading.Lock()

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stores["finetunejobs"].get(namespace, name)

    def children(self, namespace: str, job_name: str) -> dict[str, list[dict[str, Any]]]:
        return {kind: self.stores[kind].owned_by(namespace, job_name) for kind in CHILDREN}

    def get_schedule(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stores["finetuneschedules"].get(namespace, name)

    def stamped(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The FineTuneJobs labelled as the schedule's."""
        return self.stores["finetunejobs"].owned_by(namespace, name)

    def patch_schedule_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        stored = self.kube.patch_status(namespace, name, patch, resource_version, SCHEDULE_PLURAL)
        return self._took("finetuneschedules", namespace, name, stored)

    def refresh_schedule(self, namespace: str, name: str) -> None:
        """Read the FineTuneSchedule from the API into the cache (after a 409)."""
        fresh = self.kube.get_schedule(namespace, name)
        self._took("finetuneschedules", namespace, name, fresh, fresh=True)

    def _took(
        self,
        kind: str,
        namespace: str,
        name: str,
        answer: dict[str, Any] | None,
        fresh: bool = False,
    ) -> dict[str, Any] | None:
        """The API's answer (the object as stored, or None: gone) into the kind's cache: a
        write's answer unless the cache has a later state; a fresh read (fresh) replaces it."""
        store = self.stores[kind]
        if answer is None or fresh:
            store.forget(namespace, name)
        if answer is not None:
            store.assume(answer)
        return answer

    def profiles(self) -> list[FineTuneProfile]:
        """Every FineTuneProfile, parsed once per version. One the CRD should have refused (a
        CRD older than the operator) is left out, with a warning."""
        store = self.stores["finetuneprofiles"]
        out = []
        with self._profiles_lock:
            for key in store.names():
                raw = store.get(*key)
                if raw is None:
                    continue
                version = (raw.get("metadata") or {}).get("resourceVersion") or ""
                memo = self._profiles.get(key[1])
                if memo is None or memo[0] != version:
                    memo = (version, _parse_profile(raw))
                    self._profiles[key[1]] = memo
                if memo[1] is not None:
                    out.append(memo[1])
        return out

    def unreadable_profiles(self) -> dict[str, bool]:
        """The FineTuneProfiles profiles() left out, by name, with whether their raw spec may
        say default (a default that is not plainly false counts: reconcile fails closed on
        them, profiles.unreadable_refusal). Call after profiles(), which parses what is new."""
        store = self.stores["finetuneprofiles"]
        out: dict[str, bool] = {}
        with self._profiles_lock:
            for key in store.names():
                memo = self._profiles.get(key[1])
                if memo is None or memo[1] is not None:
                    continue
                spec = (store.get(*key) or {}).get("spec")
                default = spec.get("default", False) if isinstance(spec, dict) else True
                out[key[1]] = default is not False
        return out

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        raw = self.stores["namespaces"].get("", namespace)
        return None if raw is None else dict(raw["metadata"].get("labels") or {})

    def refresh(self, namespace: str, name: str) -> None:
        """Read the FineTuneJob from the API into the cache (after a 409)."""
        fresh = self.kube.get_finetunejob(namespace, name)
        self._took("finetunejobs", namespace, name, fresh, fresh=True)

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.kube.secret_data(namespace, name)

    def create(self, obj: dict[str, Any]) -> None:
        created = self.kube.create(obj)
        plural = {
            "Job": "jobs",
            "ConfigMap": "configmaps",
            "Service": "services",
            "FineTuneJob": "finetunejobs",
        }[obj["kind"]]
        self.stores[plural].assume(created)
        if plural == "finetunejobs" and self.on_stamped is not None:
            meta = created.get("metadata") or {}
            self.on_stamped((meta.get("namespace") or "", meta.get("name") or ""))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.kube.delete(kind, namespace, name)

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.stores["jobs"].assume(self.kube.set_suspend(namespace, name, suspend))

    def patch_status(
        self,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        stored = self.kube.patch_status(namespace, name, patch, resource_version)
        return self._took("finetunejobs", namespace, name, stored)

    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None:
        self.kube.event(owner, type_, reason, message, now)


def _parse_profile(raw: dict[str, Any]) -> FineTuneProfile | None:
    try:
        return FineTuneProfile.model_validate(raw, by_name=False)
    except ValidationError as exc:
        name = (raw.get("metadata") or {}).get("name")
        log.warning("FineTuneProfile %s is invalid and ignored: %s", name, exc.errors()[:3])
        return None


@dataclass
class Target:
    """A running trainer whose metrics are read."""

    address: tuple[str, int]
    due: float = 0.0
    last: tuple[int, str | None] | None = None  # (step, stage) at the last scrape
    unchanged: int = 0  # scrapes in a row that saw the same step
    busy: bool = False


class Scraper:
    """Reads running trainers' metrics: each due every `interval` seconds, at most `rate` scrapes
    per second in all (a token bucket, so 10,000 trainers are spread over 10,000 / rate seconds
    rather than hit at once), at most `concurrency` at a time, each with a timeout. A trainer
    whose step did not change is read less often (the interval doubles, up to 4x); only a
    changed step or stage queues a reconcile, so status.progress is written at most once per
    scrape and never for a trainer that made no progress."""

    def __init__(
        self,
        fetch: Callable[[str, int], str | None],
        on_progress: Callable[[Key, str], None],
        interval: float,
        rate: float,
        concurrency: int,
        tick: float = 0.1,
    ) -> None:
        self.fetch = fetch
        self.on_progress = on_progress
        self.interval = interval
        self.rate = rate
        self.tick = tick
        self._targets: dict[Key, Target] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kubetune-scrape")
        self._slots = threading.BoundedSemaphore(concurrency)
        self._thread = threading.Thread(target=self._run, name="kubetune-scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._targets)

    def set(self, key: Key, address: tuple[str, int] | None) -> None:
        with self._lock:
            if address is None:
                self._targets.pop(key, None)
                return
            target = self._targets.get(key)
            if target is None or target.address != address:  # a new pod: read it at once
                self._targets[key] = Target(address, due=time.monotonic())

    def _run(self) -> None:
        tokens, refilled = 1.0, time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            tokens = min(max(1.0, self.rate), tokens + (now - refilled) * self.rate)
            refilled = now
            with self._lock:
                due = sorted(
                    (t.due, key) for key, t in self._targets.items() if t.due <= now and not t.busy
                )
                picked = []
                for _, key in due:
                    if tokens < 1:
                        break
                    tokens -= 1
                    self._targets[key].busy = True
                    picked.append((key, self._targets[key].address))
            for key, address in picked:
                self._slots.acquire()
                try:
                    self._pool.submit(self._scrape, key, address)
                except RuntimeError:  # shut down
                    self._slots.release()
                    return

    def _scrape(self, key: Key, address: tuple[str, int]) -> None:
        try:
            text = self.fetch(*address)
        finally:
            self._slots.release()
        reading = None
        if text:
            progress, stage = parse_metrics(text)
            reading = ((progress.step if progress else -1), stage)
        with self._lock:
            target = self._targets.get(key)
            if target is None or target.address != address:
                return
            target.busy = False
            changed = reading is not None and reading != target.last
            target.unchanged = 0 if changed or reading is None else target.unchanged + 1
            target.last = reading or target.last
            target.due = time.monotonic() + self.interval * min(4, 2**target.unchanged)
        if changed and text:
            self.on_progress(key, text)


class Controller:
    """Informers, caches, the work queue, reconcile workers and the scraper, for one operator
    process. Reconciles run only while `leading` is set (at once without leader election); the
    informers run on every replica, so a standby takes over with warm caches."""

    def __init__(
        self,
        kube: Any,
        settings: OperatorSettings,
        metrics: OperatorMetrics,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.stores = {kind: Store(kind, OWNED[kind]) for kind in TRIM}
        self.cached = CachedKube(kube, self.stores, lambda key: self.enqueue(key, Trigger.ADDED))
        self.queue = WorkQueue(rate=settings.retry_rate, burst=settings.retry_burst)
        self.leading = threading.Event()
        self._stop = threading.Event()
        self._texts: dict[Key, str] = {}
        self._triggers: dict[Key, Trigger] = {}
        self._active: set[Key] = set()
        self._lock = threading.Lock()
        self.reconciles = 0
        namespaces: list[str | None] = list(settings.namespaces) or [None]
        self.informers = [
            Informer(
                kube,
                self.stores[kind],
                namespace,
                self._changed,
                selector=MANAGED_SELECTOR if kind in CHILDREN else None,
                page=settings.list_page_size,
            )
            for kind in TRIM
            for namespace in ([None] if kind in CLUSTER_SCOPED else namespaces)
        ]
        self.scraper = Scraper(
            kube.metrics,
            self._progress,
            interval=settings.progress_poll_seconds,
            rate=settings.progress_scrapes_per_second,
            concurrency=settings.progress_scrape_concurrency,
        )

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        for informer in self.informers:
            informer.start()
        for i in range(self.settings.workers):
            threading.Thread(target=self._work, name=f"kubetune-worker-{i}", daemon=True).start()
        threading.Thread(target=self._resync, name="kubetune-resync", daemon=True).start()
        self.scraper.start()

    def stop(self) -> None:
        self._stop.set()
        self.queue.shut_down()
        self.scraper.stop()
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

    # -- triggers -------------------------------------------------------------------------------

    def enqueue(self, key: Key, trigger: Trigger) -> None:
        with self._lock:
            self._triggers.setdefault(key, trigger)
        self.queue.add(key)

    def _changed(self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        obj = new if new is not None else old
        assert obj is not None
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or ""
        if kind in CLUSTER_SCOPED:
            self._cluster_changed(kind, old, new)
            return
        if kind == "finetuneschedules":
            self._schedule_changed(old, new)
            return
        if kind != "finetunejobs":
            owner = (meta.get("labels") or {}).get(JOB_LABEL)
            if owner:
                self.enqueue((namespace, owner), Trigger.CHILD)
            return
        key = (namespace, meta.get("name") or "")
        self._stamped_changed(old, new)
        if new is None:
            self.forget(key)
            return
        before = (old or {}).get("metadata") or {}
        if (
            old is None
            or before.get("generation") != meta.get("generation")
            or before.get("deletionTimestamp") != meta.get("deletionTimestamp")
            or (old.get("status") or {}) != (new.get("status") or {})
        ):
            self.enqueue(key, Trigger.FINETUNEJOB if old is not None else Trigger.ADDED)

    def _schedule_changed(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """A schedule added, its spec changed, or its status changed by someone else."""
        meta = (new or old or {}).get("metadata") or {}
        key = schedule_key(meta.get("namespace") or "", meta.get("name") or "")
        if new is None:
            return  # the garbage collector deletes what it stamped
        before = (old or {}).get("metadata") or {}
        if (
            old is None
            or before.get("generation") != meta.get("generation")
            or (old.get("status") or {}) != (new.get("status") or {})
        ):
            self.enqueue(key, Trigger.SCHEDULE)

    def _stamped_changed(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        """A stamped FineTuneJob came, went, finished or was promoted: its schedule looks again
        (not at every progress write)."""
        obj = new if new is not None else old
        if obj is None:
            return
        meta = obj.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(SCHEDULE_LABEL)
        if not owner:
            return

        def seen(o: dict[str, Any] | None) -> tuple[Any, ...] | None:
            status = (o or {}).get("status") or {}
            return None if o is None else (status.get("phase"), status.get("promotion"))

        if old is None or new is None or seen(old) != seen(new):
            self.enqueue(schedule_key(meta.get("namespace") or "", owner), Trigger.STAMPED)

    def _cluster_changed(
        self, kind: str, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        """A profile or a namespace's labels changed: the runs that may not have started
        because of it are reconciled again (a run that exists keeps its pinned profile)."""
        meta = (new or old or {}).get("metadata") or {}
        name = meta.get("name") or ""
        if kind == "namespaces":
            before = ((old or {}).get("metadata") or {}).get("labels")
            if old is None or new is None or before == meta.get("labels"):
                return
        store = self.stores["finetunejobs"]
        for key in store.names():
            obj = store.get(*key) or {}
            if ((obj.get("status") or {}).get("phase")) in FINAL_PHASES:
                continue
            wanted = (obj.get("spec") or {}).get("profile")
            if (kind == "namespaces" and key[0] == name) or (
                kind == "finetuneprofiles" and wanted in (None, name)
            ):
                self.enqueue(key, Trigger.NAMESPACE if kind == "namespaces" else Trigger.PROFILE)

    def _progress(self, key: Key, text: str) -> None:
        with self._lock:
            self._texts[key] = text
        self.enqueue(key, Trigger.POLL)

    def _resync(self) -> None:
        while not self._stop.wait(self.settings.resync_seconds):
            if not self.leading.is_set():
                continue
            with self._lock:
                active = sorted(self._active)
            for key in active:
                self.enqueue(key, Trigger.RESYNC)

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone: stop reading its trainer and drop it from the metrics."""
        with self._lock:
            self._active.discard(key)
            self._texts.pop(key, None)
        self.scraper.set(key, None)
        self.metrics.forget(*key)

    # -- work -----------------------------------------------------------------------------------

    def _work(self) -> None:
        if not self._wait_ready():
            return
        while True:
            key = self.queue.get()
            if key is None:
                return
            try:
                if len(key) == 3:  # type: ignore[arg-type]
                    self.process_schedule(key)  # type: ignore[arg-type]
                else:
                    self.process(key)  # type: ignore[arg-type]
            except Exception:  # one bad object must not stop a worker
                log.exception("reconcile of %s failed", "/".join(key))  # type: ignore[arg-type]
                self.queue.retry(key)
            finally:
                self.queue.done(key)

    def process_schedule(self, key: tuple[str, str, str]) -> float | None:
        """One FineTuneSchedule; it comes back on the queue when its next time is due."""
        _, namespace, name = key
        with self._lock:
            trigger = self._triggers.pop(key, Trigger.RETRY)
        try:
            with self.metrics.reconcile_duration.labels(trigger).time():
                due = reconcile_schedule(self.cached, namespace, name)
        except Conflict as exc:
            log.info("schedule %s/%s changed meanwhile; reading it again: %s", namespace, name, exc)
            self._read_again(key, lambda: self.cached.refresh_schedule(namespace, name))
            return None
        except Retry as exc:
            delay = self.queue.retry(key, exc.delay)
            log.info("schedule %s/%s deferred %.1f s: %s", namespace, name, delay, exc)
            return None
        self.queue.forget(key)
        if due is not None:
            with self._lock:
                self._triggers.setdefault(key, Trigger.TIMER)
            self.queue.add_after(key, due)
        return due

    def _read_again(self, key: Any, refresh: Callable[[], None]) -> None:
        """After a 409: the object read afresh into the cache, and the key retried (0.5 s,
        doubling if it conflicts again; the read's own delay if it failed)."""
        try:
            refresh()
        except Retry as again:
            self.queue.retry(key, again.delay)
            return
        self.queue.retry(key)

    def process(self, key: Key) -> Outcome | None:
        namespace, name = key
        with self._lock:
            text = self._texts.pop(key, None)
            trigger = self._triggers.pop(key, Trigger.RETRY)
        try:
            with self.metrics.reconcile_duration.labels(trigger).time():
                outcome = reconcile(self.cached, self.settings, namespace, name, metrics_text=text)
                self.reconciles += 1
        except Conflict as exc:
            log.info("%s/%s changed meanwhile; reading it again: %s", namespace, name, exc)
            if text is not None:
                with self._lock:
                    self._texts.setdefault(key, text)
            self._read_again(key, lambda: self.cached.refresh(namespace, name))
            return None
        except Misconfigured as exc:
            self.metrics.reconcile_errors.labels(exc.reason).inc()
            delay = self.queue.retry(key, exc.delay)
            log.warning("reconcile of %s/%s: %s (retry in %.0f s)", namespace, name, exc, delay)
            return None
        except Retry as exc:
            delay = self.queue.retry(key, exc.delay)
            log.info("reconcile of %s/%s deferred %.1f s: %s", namespace, name, delay, exc)
            return None
        self.queue.forget(key)
        if outcome is None:  # gone
            self.forget(key)
            return None
        with self._lock:
            if outcome.final:
                self._active.discard(key)
            else:
                self._active.add(key)
        self.scraper.set(key, outcome.metrics_target)
        if (outcome.before.phase, outcome.before.promotion) != (
            outcome.after.phase,
            outcome.after.promotion,
        ):
            # Its own writes reach the cache before the watch, so the watch shows no change:
            # the schedule that stamped this run is told here.
            self._stamped_changed(None, self.stores["finetunejobs"].get(namespace, name))
        self.metrics.observe(namespace, name, outcome.before, outcome.after, outcome.status_written)
        return outcome

    def requeue_all(self) -> None:
        """Every FineTuneJob in the cache (on becoming the leader)."""
        for key in self.stores["finetunejobs"].names():
            obj = self.stores["finetunejobs"].get(*key)
            phase = ((obj or {}).get("status") or {}).get("phase")
            self.enqueue(key, Trigger.RESUME if phase not in FINAL_PHASES else Trigger.RESUME_FINAL)
        for namespace, name in self.stores["finetuneschedules"].names():
            self.enqueue(schedule_key(namespace, name), Trigger.RESUME)

    def stats(self) -> dict[str, Any]:
        return {
            "synced": self.synced,
            "leading": self.leading.is_set(),
            "queued": len(self.queue),
            "cached": {kind: len(store) for kind, store in self.stores.items()},
            "scraping": len(self.scraper),
            "reconciles": self.reconciles,
            "relists": sum(i.relists for i in self.informers),
        }
