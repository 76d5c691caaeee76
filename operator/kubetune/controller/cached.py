"""What the operator caches, and the reconcilers' I/O over the caches: reads come from the
watch-fed stores (cache.py), writes go through the API (kube.py) and their answers into the
stores at once.

In steady state a reconcile reads nothing from the API. Secrets are not cached: a reconcile
reads one rarely (the storage Secret a FineTuneJob names, for the result.json of a finished run
whose pod is gone; the signing Secret of its spec.notify.webhook, for a promotion's
notification). A status write carries the cached object's resourceVersion; a 409 means the
cache was stale, and `refresh` reads the object afresh once.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from kubetune.api import SCHEDULE_LABEL, SCHEDULE_PLURAL, FineTuneProfile
from kubetune.api.wire import JOB_LABEL, MANAGED_BY
from kubetune.controller.cache import TRIM, Change, Store

log = logging.getLogger("kubetune.operator")

# The children a run owns: watched with MANAGED_SELECTOR, indexed by the run's FineTuneJob.
CHILDREN = ("jobs", "configmaps", "pods", "services")
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
CLUSTER_SCOPED = ("finetuneprofiles", "namespaces")  # watched cluster-wide, unlabelled
# Each store's index: a run's children by its FineTuneJob, FineTuneJobs by their schedule.
OWNED = {kind: JOB_LABEL if kind in CHILDREN else None for kind in TRIM}
OWNED["finetunejobs"] = SCHEDULE_LABEL
PLURAL = {
    "Job": "jobs",
    "ConfigMap": "configmaps",
    "Service": "services",
    "FineTuneJob": "finetunejobs",
}


class CachedKube:
    """Both reconcilers' I/O (FineTuneJobIO, ScheduleIO): reads from the caches, writes through
    the API into the caches. Each write that changed a store is reported to `on_write` (kind,
    old, new), as a watch event would be: the runtime asks each controller whether its own
    write wakes anything (a FineTuneJob a schedule stamped must be reconciled; a stamped run's
    new phase wakes its schedule), because the watch, which delivers it later, then finds the
    store already up to date and reports no change."""

    def __init__(self, kube: Any, stores: dict[str, Store], on_write: Change | None = None) -> None:
        self.kube = kube
        self.stores = stores
        self.on_write = on_write
        self._profiles: dict[str, tuple[str, FineTuneProfile | None]] = {}  # by resourceVersion
        self._profiles_lock = threading.Lock()

    # -- reads ----------------------------------------------------------------------------------

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stores["finetunejobs"].get(namespace, name)

    def children(self, namespace: str, job_name: str) -> dict[str, list[dict[str, Any]]]:
        return {kind: self.stores[kind].owned_by(namespace, job_name) for kind in CHILDREN}

    def get_schedule(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stores["finetuneschedules"].get(namespace, name)

    def stamped(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The FineTuneJobs labelled as the schedule's."""
        return self.stores["finetunejobs"].owned_by(namespace, name)

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

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.kube.secret_data(namespace, name)

    # -- reads afresh (after a 409) ---------------------------------------------------------------

    def refresh(self, namespace: str, name: str) -> None:
        """Read the FineTuneJob from the API into the cache."""
        fresh = self.kube.get_finetunejob(namespace, name)
        self._took("finetunejobs", namespace, name, fresh, fresh=True)

    def refresh_schedule(self, namespace: str, name: str) -> None:
        """Read the FineTuneSchedule from the API into the cache."""
        fresh = self.kube.get_schedule(namespace, name)
        self._took("finetuneschedules", namespace, name, fresh, fresh=True)

    # -- writes ---------------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> None:
        created = self.kube.create(obj)
        self._assumed(PLURAL[obj["kind"]], self.stores[PLURAL[obj["kind"]]].assume(created))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.kube.delete(kind, namespace, name)

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        answer = self.kube.set_suspend(namespace, name, suspend)
        self._assumed("jobs", self.stores["jobs"].assume(answer))

    def patch_status(
        self,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
    ) -> dict[str, Any] | None:
        stored = self.kube.patch_status(namespace, name, patch, resource_version)
        return self._took("finetunejobs", namespace, name, stored)

    def patch_schedule_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None
    ) -> dict[str, Any] | None:
        stored = self.kube.patch_status(namespace, name, patch, resource_version, SCHEDULE_PLURAL)
        return self._took("finetuneschedules", namespace, name, stored)

    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None:
        self.kube.event(owner, type_, reason, message, now)

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
        before = store.get(namespace, name)
        if answer is None or fresh:
            store.forget(namespace, name)
        if answer is not None:
            store.assume(answer)
        after = store.get(namespace, name)
        if after is not before:
            self._assumed(kind, (before, after))
        return answer

    def _assumed(
        self, kind: str, change: tuple[dict[str, Any] | None, dict[str, Any] | None] | None
    ) -> None:
        if change is not None and self.on_write is not None:
            self.on_write(kind, *change)


def _parse_profile(raw: dict[str, Any]) -> FineTuneProfile | None:
    try:
        return FineTuneProfile.model_validate(raw, by_name=False)
    except ValidationError as exc:
        name = (raw.get("metadata") or {}).get("name")
        log.warning("FineTuneProfile %s is invalid and ignored: %s", name, exc.errors()[:3])
        return None
