"""The module that talks to the Kubernetes API (an import-linter contract keeps it so; leader.py
holds the Lease).

Everything here is plain I/O on raw dicts through the official `kubernetes` client: list and
watch for the informers (cache.py), read one FineTuneJob (after a 409), create and delete
children, patch a Job's suspend flag and the FineTuneJob's status, post Events, read the Secrets
a FineTuneJob names (its storage Secret, to read its result.json when the pod that carried the
result is gone; its webhook's signing Secret, to sign a promotion's notification), and read a
trainer pod's metrics over HTTP. Errors come out as the kinds in errors.py: `Retry`, `Rejected`
(the user's) and `Misconfigured` (the operator's or the cluster's). `PERMISSIONS` lists every
API permission the operator uses; the chart's RBAC is tested against it.
"""

from __future__ import annotations

import base64
import collections
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import types
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from kubetune.api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    PROFILE_PLURAL,
    SCHEDULE_PLURAL,
    VERSION,
)
from kubetune.api.wire import MANAGED_BY
from kubetune.controller.build import data_hash
from kubetune.controller.errors import Conflict, Misconfigured, NoCredentials, Rejected, Retry
from kubetune.controller.metrics import OperatorMetrics

log = logging.getLogger("kubetune.operator")

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = (5, 15)  # connect, read seconds (a reconcile holds its object's lock meanwhile)
RETRYABLE = {409, 429, 500, 502, 503, 504}
COMPONENT = MANAGED_BY  # the Events' reporting component
EVENT_WINDOW_SECONDS = 600  # client-go's EventCorrelator: the same Event within 10 min is counted
EVENT_MEMORY = 4096  # and it remembers this many
_RAISE = object()

# (API group, resource, verbs): every permission the operator uses in a watched namespace. It
# lists and watches FineTuneJobs and its children into caches (cache.py) and gets a FineTuneJob
# only after a 409; kopf itself watches and writes nothing. Updating finetunejobs/finalizers is
# what lets children set blockOwnerDeletion on clusters with the OwnerReferencesPermission-
# Enforcement admission plugin (OpenShift). Secrets: `get` of the ones a FineTuneJob names, to
# read result.json when its pod is gone (optional; see results.py) and to sign a notification.
PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, PLURAL, ("get", "list", "watch", "create", "delete")),  # create, delete: schedules
    (GROUP, SCHEDULE_PLURAL, ("get", "list", "watch")),
    (GROUP, f"{PLURAL}/status", ("patch",)),
    (GROUP, f"{SCHEDULE_PLURAL}/status", ("patch",)),
    (GROUP, f"{PLURAL}/finalizers", ("update",)),
    (GROUP, f"{SCHEDULE_PLURAL}/finalizers", ("update",)),
    ("batch", "jobs", ("get", "list", "watch", "create", "delete", "patch")),
    ("", "configmaps", ("get", "list", "watch", "create", "delete")),
    ("", "services", ("get", "list", "watch", "create", "delete")),
    ("", "pods", ("list", "watch")),
    ("", "secrets", ("get",)),
    ("", "events", ("create", "patch")),
)
# Cluster-wide, whatever namespaces are watched: the cluster-scoped FineTuneProfiles, and the
# namespaces' labels (their namespaceSelectors), read into caches.
CLUSTER_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (GROUP, PROFILE_PLURAL, ("get", "list", "watch")),
    ("", "namespaces", ("get", "list", "watch")),
)
# In the operator's own namespace, with leader election: its Lease (leader.py).
LEADER_PERMISSIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("coordination.k8s.io", "leases", ("get", "create", "update")),
)


def _retry_after(exc: ApiException) -> float:
    try:
        return max(1.0, float((exc.headers or {}).get("Retry-After", 1)))
    except (TypeError, ValueError):
        return 1.0


def classify(status: int, message: str, what: str, retry_after: float = 1.0) -> Exception:
    """Whose fault a refused call is (see errors.py), from the status and the API's message."""
    text = f"{what}: HTTP {status} {message}"
    if status in RETRYABLE or status == 0:
        return Retry(text, retry_after)
    if status == 403 and "cannot " in message and "resource " in message:
        # The authorizer's message: 'User "..." cannot create resource "jobs" in API group ...'
        return Misconfigured(
            f"{text} (the operator's RBAC lacks this permission; not a problem with the spec)",
            "OperatorForbidden",
        )
    if status == 403 and "exceeded quota" in message:
        return Misconfigured(f"{text} (waiting for quota)", "QuotaExceeded", delay=30.0)
    if status == 403 and "being terminated" in message:
        return Retry(text, 5.0)  # the namespace is going away, and this object with it
    if status == 404:
        return Misconfigured(
            f"{text} (an API or namespace the operator needs is missing)", "ResourceMissing"
        )
    # 400/422 from validation, a webhook's or a ValidatingAdmissionPolicy's denial, other 403s.
    return Rejected(text)


def _translate(exc: Exception, what: str, metrics: OperatorMetrics | None = None) -> Exception:
    if metrics is not None:
        code = exc.status if isinstance(exc, ApiException) else 0
        metrics.api_error(what.split(" ", 1)[0], code or 0)
    if isinstance(exc, ApiException):
        return classify(exc.status or 0, _api_message(exc), what, _retry_after(exc))
    return Retry(f"{what}: {exc}")  # connection refused, timeouts, DNS


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


def load_client() -> kubernetes.client.ApiClient:
    """In a pod: the service account. Elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config),
    the same credentials kopf's login uses."""
    try:
        kubernetes.config.load_incluster_config()
        return kubernetes.client.ApiClient()
    except kubernetes.config.ConfigException:
        pass
    try:
        return kubernetes.config.new_client_from_config()
    except (kubernetes.config.ConfigException, OSError) as exc:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise NoCredentials(
            f"no Kubernetes credentials: not in a pod (no service account token) and no usable "
            f"kubeconfig at {where} ({exc}); set KUBECONFIG or run the operator in the cluster"
        ) from exc


class Kube:
    """API I/O for the operator, on raw dicts."""

    def __init__(
        self, client: kubernetes.client.ApiClient, metrics: OperatorMetrics | None = None
    ) -> None:
        self._metrics = metrics
        self._events: collections.OrderedDict[tuple[Any, ...], tuple[str, int, datetime]] = (
            collections.OrderedDict()
        )
        self._events_lock = threading.Lock()
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    def _call(
        self, what: str, method: Any, *args: Any, missing: Any = _RAISE, **kwargs: Any
    ) -> Any:
        """One API call on raw JSON. A 404 returns `missing` when given; other errors come out
        as Retry or Rejected."""
        try:
            response = method(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and missing is not _RAISE:
                return missing
            raise _translate(exc, what, self._metrics) from exc
        except Exception as exc:
            raise _translate(exc, what, self._metrics) from exc
        return json.loads(response.data or b"null")

    # -- list and watch (the informers') --------------------------------------------------------

    def _lister(self, kind: str, namespace: str | None) -> tuple[Any, tuple[Any, ...]]:
        if kind in ("finetunejobs", "finetuneschedules"):
            plural = PLURAL if kind == "finetunejobs" else SCHEDULE_PLURAL
            if namespace is None:
                return self.custom.list_cluster_custom_object, (GROUP, VERSION, plural)
            return self.custom.list_namespaced_custom_object, (GROUP, VERSION, namespace, plural)
        if kind == "finetuneprofiles":  # cluster-scoped
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PROFILE_PLURAL)
        if kind == "namespaces":
            return self.core.list_namespace, ()
        calls = {
            "jobs": (self.batch.list_job_for_all_namespaces, self.batch.list_namespaced_job),
            "pods": (self.core.list_pod_for_all_namespaces, self.core.list_namespaced_pod),
            "configmaps": (
                self.core.list_config_map_for_all_namespaces,
                self.core.list_namespaced_config_map,
            ),
            "services": (
                self.core.list_service_for_all_namespaces,
                self.core.list_namespaced_service,
            ),
        }
        everywhere, namespaced = calls[kind]
        return (everywhere, ()) if namespace is None else (namespaced, (namespace,))

    def list_page(
        self, kind: str, namespace: str | None, selector: str | None, limit: int, token: str | None
    ) -> dict[str, Any]:
        """One page of a list, raw (items, metadata.resourceVersion, metadata.continue)."""
        call, args = self._lister(kind, namespace)
        kwargs: dict[str, Any] = {"limit": limit}
        if selector:
            kwargs["label_selector"] = selector
        if token:
            kwargs["_continue"] = token
        where = namespace or "all namespaces"
        return self._call(f"list {kind} in {where}", call, *args, **kwargs)

    def watch(
        self,
        kind: str,
        namespace: str | None,
        selector: str | None,
        resource_version: str,
        timeout: int,
        stop: threading.Event,
    ) -> Iterator[dict[str, Any]]:
        """A watch's events, raw, from resource_version, with bookmarks, until the server ends
        it (timeout seconds) or stop is set (checked at each event and bookmark)."""
        call, args = self._lister(kind, namespace)
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "resource_version": resource_version,
            "timeout_seconds": timeout,
        }
        if selector:
            kwargs["label_selector"] = selector
        try:
            response = call(
                *args, _preload_content=False, _request_timeout=(5, timeout + 30), **kwargs
            )
        except ApiException as exc:
            if exc.status == 410:
                yield {"type": "ERROR", "object": {"code": 410, "message": _api_message(exc)}}
                return
            raise _translate(exc, f"watch {kind}", self._metrics) from exc
        try:
            for line in iter_resp_lines(response):
                if stop.is_set():
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            response.close()
            response.release_conn()

    # -- reads --------------------------------------------------------------------------------

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            f"get FineTuneJob {namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            *(GROUP, VERSION, namespace, PLURAL, name),
            missing=None,
        )

    def get_schedule(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(
            f"get FineTuneSchedule {namespace}/{name}",
            self.custom.get_namespaced_custom_object,
            *(GROUP, VERSION, namespace, SCHEDULE_PLURAL, name),
            missing=None,
        )

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None when it does not exist."""
        secret = self._call(
            f"get Secret {namespace}/{name}",
            self.core.read_namespaced_secret,
            name,
            namespace,
            missing=None,
        )
        if secret is None:
            return None
        return {
            key: base64.b64decode(value).decode("utf-8", "replace")
            for key, value in (secret.get("data") or {}).items()
        }

    @staticmethod
    def metrics(ip: str, port: int, timeout: float = 3.0, max_bytes: int = 1 << 20) -> str | None:
        """A trainer's Prometheus metrics text, or None when it cannot be read right now: no
        answer, not a 200, not whole within `timeout` seconds (the whole request: connect, send
        and every read, not each read), or over `max_bytes` (a trainer's are a few KiB). Any pod
        can answer on a trainer's address, so a trickling or endless answer holds a scrape slot
        for `timeout` at most and memory for `max_bytes`; no redirect or proxy is followed."""
        try:
            raw = Kube._get(ip, port, "/metrics", time.monotonic() + timeout, max_bytes)
            # http.client parses what came (status, headers, Content-Length, chunks) from memory.
            response = http.client.HTTPResponse(
                types.SimpleNamespace(makefile=lambda *_: io.BytesIO(raw))
            )
            response.begin()
            if response.status != 200:
                raise http.client.HTTPException(f"{response.status} {response.reason}")
            return response.read().decode("utf-8", "replace")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.debug("metrics of %s:%d not readable: %s", ip, port, exc)
            return None

    @staticmethod
    def _get(ip: str, port: int, path: str, deadline: float, max_bytes: int) -> bytes:
        """The raw answer to an HTTP/1.0 GET (the server closes the connection after it), read in
        chunks, each read's timeout the time left before `deadline` (time.monotonic)."""
        host = f"[{ip}]" if ":" in ip else ip
        request = f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/plain\r\n\r\n"
        raw = bytearray()
        with socket.create_connection((ip, port), timeout=deadline - time.monotonic()) as sock:
            sock.sendall(request.encode())
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the answer was not whole in time")
                sock.settimeout(left)
                chunk = sock.recv(min(1 << 16, max_bytes + 1 - len(raw)))
                if not chunk:
                    break
                raw += chunk
                if len(raw) > max_bytes:
                    raise ValueError(f"the answer is over {max_bytes} bytes")
        return bytes(raw)

    # -- writes -------------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create a child and return it as stored; one that exists already (an earlier
        attempt's) is adopted if ours."""
        meta = obj["metadata"]
        namespace, name, kind = meta["namespace"], meta["name"], obj["kind"]
        create, read = {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "ConfigMap": (
                self.core.create_namespaced_config_map,
                self.core.read_namespaced_config_map,
            ),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            KIND: (  # stamped by a FineTuneSchedule
                lambda ns, body, **kw: self.custom.create_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, body, **kw
                ),
                lambda n, ns, **kw: self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, n, **kw
                ),
            ),
        }[kind]
        what = f"{kind} {namespace}/{name}"
        try:
            response = create(namespace, obj, _preload_content=False, _request_timeout=TIMEOUT)
            log.info("created %s", what)
            return json.loads(response.data or b"null") or obj
        except ApiException as exc:
            if exc.status != 409:
                raise _translate(exc, f"create {what}", self._metrics) from exc
            if self._metrics is not None:
                self._metrics.api_error("create", 409)
        except Exception as exc:
            raise _translate(exc, f"create {what}", self._metrics) from exc
        existing = self._call(f"read {what}", read, name, namespace, missing=None)
        if existing is None:
            raise Retry(f"create {what}: conflict, but it does not exist")
        owner_uid = meta["ownerReferences"][0]["uid"]
        owners = (existing.get("metadata") or {}).get("ownerReferences") or []
        if not any(ref.get("uid") == owner_uid for ref in owners):
            # Left by an earlier FineTuneJob of the same name; the garbage collector removes it.
            raise Retry(f"{what} belongs to another owner; waiting", 5.0)
        if (existing.get("metadata") or {}).get("deletionTimestamp"):
            raise Retry(f"{what} is still being deleted; waiting", 2.0)
        if kind == "ConfigMap" and data_hash(existing) != data_hash(obj):
            # An owner reference is no proof: whoever can create ConfigMaps in the namespace
            # can write one. A run mounts only the config the operator wrote.
            log.warning("%s has contents the operator did not write; replacing it", what)
            self.delete(kind, namespace, name)
            raise Retry(f"{what} was not the operator's; replaced", 1.0)
        log.info("adopted existing %s", what)
        return existing

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a child and what it owns (pods of a Job); gone already is fine."""
        call = {
            "Job": self.batch.delete_namespaced_job,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
            KIND: lambda n, ns, **kw: self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, n, **kw
            ),
        }[kind]
        what = f"{kind} {namespace}/{name}"
        if (
            self._call(
                f"delete {what}",
                call,
                name,
                namespace,
                propagation_policy="Background",
                missing=False,
            )
            is not False
        ):
            log.info("deleted %s", what)

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        job = self._call(
            f"patch Job {namespace}/{name}",
            self.batch.patch_namespaced_job,
            *(name, namespace, {"spec": {"suspend": suspend}}),
            _content_type=MERGE_PATCH,
        )
        log.info("%s Job %s/%s", "suspended" if suspend else "resumed", namespace, name)
        return job

    def patch_status(
        self,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        resource_version: str | None = None,
        plural: str = PLURAL,
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource of a FineTuneJob (or of another kind's object:
        plural); returns the object as stored, None when it is gone. With resource_version,
        only if the object is still at that version (else Conflict: the status was decided
        from a stale copy)."""
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        what = f"patch status of {namespace}/{name}"
        try:
            return self._call(
                what,
                self.custom.patch_namespaced_custom_object_status,
                *(GROUP, VERSION, namespace, plural, name, body),
                _content_type=MERGE_PATCH,
                missing=None,
            )
        except Retry as exc:
            if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 409:
                raise Conflict(str(exc)) from exc
            raise

    def event(
        self, owner: dict[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None:
        """Post a core/v1 Event about the FineTuneJob (or FineTuneSchedule): best effort, a lost
        Event is logged.

        The same Event (object, type, reason, message) again within ten minutes is not a new
        object: the first one's `count` and `lastTimestamp` are patched, as client-go's
        EventCorrelator does (the API server itself aggregates nothing; kubectl shows
        "(x3 over 5m)" from these fields). The last 4096 are remembered, client-go's size."""
        meta = owner["metadata"]
        stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = (meta["namespace"], meta["name"], meta.get("uid"), type_, reason, message[:1024])
        with self._events_lock:
            seen = self._events.get(key)
        if seen is not None and (now - seen[2]).total_seconds() < EVENT_WINDOW_SECONDS:
            name, count, _ = seen
            try:
                self.core.patch_namespaced_event(
                    name,
                    meta["namespace"],
                    {"count": count + 1, "lastTimestamp": stamp},
                    _preload_content=False,
                    _request_timeout=TIMEOUT,
                )
                self._remember(key, (name, count + 1, now))
                return
            except Exception as exc:  # gone (Events expire after an hour): post a new one
                log.debug("could not update Event %s: %s", name, exc)
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": owner.get("kind") or KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(
                meta["namespace"], body, _preload_content=False, _request_timeout=TIMEOUT
            )
            self._remember(key, (name, 1, now))
        except Exception as exc:  # an Event is worth a log line, not a failed reconcile
            log.warning("could not post Event %s for %s: %s", reason, meta["name"], exc)

    def _remember(self, key: tuple[Any, ...], value: tuple[str, int, datetime]) -> None:
        with self._events_lock:
            self._events[key] = value
            self._events.move_to_end(key)
            while len(self._events) > EVENT_MEMORY:
                self._events.popitem(last=False)
