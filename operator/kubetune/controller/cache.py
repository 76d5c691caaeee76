"""Watch-fed caches of FineTuneJobs and their children, so a reconcile reads no API object.

One `Informer` per kind (and per namespace when the operator watches a list of them) does what
client-go's Reflector does: list in pages (`limit`/`continue`), then watch from the list's
resourceVersion with bookmarks; a watch that ends is resumed from the last resourceVersion seen
(an event's or a bookmark's); a `410 Gone` (the version left the API server's window) lists
again and *replaces* the store's contents for that namespace, reporting every object that
vanished meanwhile as deleted (client-go's Replace, DeletedFinalStateUnknown). Other errors back
off (1 s doubling to 30 s) and resume.

Objects are trimmed before they are stored (`TRIM`): no managedFields, no last-applied
annotation, a ConfigMap without its data, a Job without its pod template, a Pod with only its
containers' names, ports and resources and its status. That keeps 10,000 FineTuneJobs with their
children in a few hundred MB. Stored objects are shared: readers must not modify them.

The operator's own writes go into the store as soon as the API answers (`Store.assume`, what
client-go's MutationCache does), so the next reconcile sees a Job it just created even before the
watch reports it: the role controller-runtime users give to "expectations". A write is taken
only when its resourceVersion is newer than the stored one (both integers, as etcd's revisions
are; anything else is taken as newer).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from kubetune.controller.build import PROFILE_FILE, data_hash

log = logging.getLogger("kubetune.operator")
DATA_HASH = "dataHash"  # a trimmed ConfigMap's sha256 of its contents (build.data_hash)

Key = tuple[str, str]  # (namespace, name)
Change = Callable[[str, dict[str, Any] | None, dict[str, Any] | None], None]  # kind, old, new
PAGE = 500
WATCH_SECONDS = 300  # the server ends each watch after this; it is resumed at once
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is older than the API server keeps; list again."""


class ListWatch(Protocol):
    """What an informer needs from the API layer (kube.Kube; a fake in unit tests)."""

    def list_page(
        self, kind: str, namespace: str | None, selector: str | None, limit: int, token: str | None
    ) -> dict[str, Any]: ...

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        resource_version: str,
        timeout: int,
        stop: threading.Event,
    ) -> Iterator[dict[str, Any]]: ...


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return meta


def trim_finetunejob(obj: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": _meta(obj)}


def trim_job(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("spec") or {}
    return {
        "metadata": _meta(obj),
        "spec": {k: spec[k] for k in ("suspend", "ttlSecondsAfterFinished") if k in spec},
        "status": obj.get("status") or {},
    }


def trim_configmap(obj: dict[str, Any]) -> dict[str, Any]:
    """Its metadata, the hash of its contents (a tenant can write a ConfigMap that looks like a
    run's: reconcile trusts one only when the hash is the one the operator wrote in the job's
    status) and the pinned profile, the one key a reconcile reads."""
    trimmed: dict[str, Any] = {"metadata": _meta(obj), DATA_HASH: data_hash(obj)}
    pinned = (obj.get("data") or {}).get(PROFILE_FILE)
    if pinned is not None:
        trimmed["data"] = {PROFILE_FILE: pinned}
    return trimmed


def trim_service(obj: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": _meta(obj)}  # the metadata is all a run needs of its Service


def trim_pod(obj: dict[str, Any]) -> dict[str, Any]:
    containers = ((obj.get("spec") or {}).get("containers")) or []
    return {
        "metadata": _meta(obj),
        "spec": {
            "containers": [
                {
                    "name": c.get("name"),
                    "ports": c.get("ports") or [],
                    "resources": c.get("resources") or {},  # for status.usage (usage.py)
                }
                for c in containers
            ]
        },
        "status": obj.get("status") or {},
    }


def trim_namespace(obj: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": _meta(obj)}  # its labels, for profiles' namespaceSelectors


TRIM: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "finetunejobs": trim_finetunejob,
    "finetuneprofiles": trim_finetunejob,
    "finetuneschedules": trim_finetunejob,
    "namespaces": trim_namespace,
    "jobs": trim_job,
    "configmaps": trim_configmap,
    "services": trim_service,
    "pods": trim_pod,
}


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _version(obj: dict[str, Any] | None) -> str:
    return ((obj or {}).get("metadata") or {}).get("resourceVersion") or ""


def newer(candidate: dict[str, Any], stored: dict[str, Any] | None) -> bool:
    """Whether candidate is a later state of the object than stored."""
    if stored is None:
        return True
    a, b = _version(candidate), _version(stored)
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a != b


class Store:
    """One kind's objects by (namespace, name), indexed by the FineTuneJob that owns them."""

    def __init__(self, kind: str, owner_label: str | None = None) -> None:
        self.kind = kind
        self.owner_label = owner_label
        self._lock = threading.Lock()
        self._objects: dict[Key, dict[str, Any]] = {}
        self._owned: dict[Key, set[str]] = {}  # (namespace, FineTuneJob) -> names

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)

    def _owner(self, obj: dict[str, Any]) -> Key | None:
        if self.owner_label is None:
            return None
        meta = obj.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(self.owner_label)
        return (meta.get("namespace") or "", owner) if owner else None

    def _put(self, key: Key, obj: dict[str, Any] | None) -> dict[str, Any] | None:
        old = self._objects.pop(key, None)
        if old is not None and (owner := self._owner(old)) is not None:
            names = self._owned.get(owner)
            if names is not None:
                names.discard(key[1])
                if not names:
                    del self._owned[owner]
        if obj is not None:
            self._objects[key] = obj
            if (owner := self._owner(obj)) is not None:
                self._owned.setdefault(owner, set()).add(key[1])
        return old

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((namespace, name))

    def owned_by(self, namespace: str, owner: str) -> list[dict[str, Any]]:
        with self._lock:
            names = sorted(self._owned.get((namespace, owner), ()))
            return [self._objects[(namespace, n)] for n in names]

    def names(self) -> list[Key]:
        with self._lock:
            return list(self._objects)

    def apply(
        self, event: str, obj: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """A watch event; returns (old, new) as stored before and after."""
        trimmed = TRIM[self.kind](obj)
        key = _key(trimmed)
        with self._lock:
            if event == "DELETED":
                return self._put(key, None), None
            stored = self._objects.get(key)
            if stored is not None and newer(stored, trimmed):
                # The operator's own write, taken from the API's answer, got here before the
                # watch delivered this earlier change: keep the later state.
                return stored, stored
            old = self._put(key, trimmed)
            return old, trimmed

    def assume(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]] | None:
        """The answer to the operator's own write, unless the store already has a later state;
        returns (old, new) as stored before and after, or None: nothing changed."""
        trimmed = TRIM[self.kind](obj)
        key = _key(trimmed)
        with self._lock:
            if not newer(trimmed, self._objects.get(key)):
                return None
            return self._put(key, trimmed), trimmed

    def forget(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._put((namespace, name), None)

    def replace(
        self, namespace: str | None, items: Iterable[dict[str, Any]]
    ) -> list[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
        """A fresh listing replaces what the store held for namespace (None: all); returns
        (old, new) for each object that changed, appeared or vanished."""
        fresh = {}
        for item in items:
            trimmed = TRIM[self.kind](item)
            fresh[_key(trimmed)] = trimmed
        changes = []
        with self._lock:
            for key in [k for k in self._objects if namespace is None or k[0] == namespace]:
                if key not in fresh:
                    changes.append((self._put(key, None), None))
            for key, obj in fresh.items():
                old = self._put(key, obj)
                if old is None or _version(old) != _version(obj):
                    changes.append((old, obj))
        return changes


class Informer:
    """List, then watch, one kind in one namespace (None: all) into a Store; `on_change` is
    called (from this informer's thread) for every change, with the stored old and new."""

    def __init__(
        self,
        api: ListWatch,
        store: Store,
        namespace: str | None,
        on_change: Change,
        selector: str | None = None,
        page: int = PAGE,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.api = api
        self.store = store
        self.namespace = namespace
        self.on_change = on_change
        self.selector = selector
        self.page = page
        self.watch_seconds = watch_seconds
        self.synced = threading.Event()
        self.relists = 0  # lists after a 410 Gone
        self.resource_version = ""
        self._stop = threading.Event()
        where = namespace or "all"
        self._thread = threading.Thread(
            target=self._run, name=f"informer-{store.kind}-{where}", daemon=True
        )

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._list()
                self._watch()
                delay = 1.0
            except WatchExpired:
                log.info("%s watch expired; listing again", self.store.kind)
                self.resource_version = ""
                self.relists += 1
            except Exception as exc:  # the API is down, a proxy dropped us, ...
                log.warning("%s informer: %s; retrying in %.0f s", self.store.kind, exc, delay)
                self._stop.wait(delay)
                delay = min(30.0, delay * 2)

    def _list(self) -> None:
        items: list[dict[str, Any]] = []
        token = None
        version = ""
        while True:
            page = self.api.list_page(
                self.store.kind, self.namespace, self.selector, self.page, token
            )
            meta = page.get("metadata") or {}
            version = version or meta.get("resourceVersion") or ""
            items.extend(page.get("items") or [])
            token = meta.get("continue")
            if not token:
                break
        for old, new in self.store.replace(self.namespace, items):
            self._notify(old, new)
        self.resource_version = version
        self.synced.set()

    def _watch(self) -> None:
        events = self.api.watch(
            self.store.kind,
            self.namespace,
            self.selector,
            self.resource_version,
            self.watch_seconds,
            self._stop,
        )
        for event in events:
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise WatchExpired(obj.get("message") or "410 Gone")
                raise RuntimeError(f"watch error: {obj.get('message') or obj}")
            version = _version(obj)
            if kind == "BOOKMARK":
                self.resource_version = version or self.resource_version
                continue
            if kind not in ("ADDED", "MODIFIED", "DELETED"):
                continue
            old, new = self.store.apply(kind, obj)
            if version:
                self.resource_version = version
            self._notify(old, new)

    def _notify(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        try:
            self.on_change(self.store.kind, old, new)
        except Exception:  # a handler's bug must not stop the watch
            log.exception("handling a %s change failed", self.store.kind)
