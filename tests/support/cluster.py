"""An emulated Kubernetes API for integration tests: kmock's KubernetesEmulator plus the thin
layer of server behaviour that kopf and the operator rely on and kmock leaves out.

kmock stores objects, serves list/watch/get/create/patch/delete over real HTTP and merges
patches. This layer adds what a real API server does on top (see ../shared/notes/environment.md):
- server-set metadata: uid, resourceVersion (bumped on every write), creationTimestamp,
  metadata.namespace, and metadata.generation for objects with a spec (bumped on spec changes);
- equality-based label selectors (`a=b,c`) on list and watch;
- the garbage collector: deleting an owner deletes its dependents (ownerReferences by uid),
  except with propagationPolicy=Orphan, which is also batch/v1 Jobs' default;
- fault injection: the next N requests matching (verb, plural) answer an error status, with the
  message a real API server would give (e.g. the RBAC authorizer's 403 text);
- per-(verb, plural) request counters, all requests and the operator's alone (the tests and the
  test kubelet say who they are in their User-Agent), for the tests and the scale benchmark;
- JSON as the API server decodes it: NaN and Infinity are not JSON (RFC 8259), so a body with
  them is a 400 Bad Request, as from kube-apiserver's decoder;
- resourceVersion as etcd's revision: one counter for the whole store, assigned when a write is
  committed (writes are serialised, as etcd's transactions are), a new one for a deletion too;
- optimistic concurrency: a patch or PUT whose metadata.resourceVersion is not the stored one is
  a 409 Conflict with the registry's message ("the object has been modified; please apply your
  changes to the latest version and try again"); PUT replaces the object (Leases need it);
- lists as the API server serves them: `metadata.resourceVersion` is the store's current
  revision, `limit` and `continue` paginate (the continue token names the last key served; a
  real one also pins the first page's revision, so here a later page can show newer objects,
  which a watch from the list's revision then reports again — harmless to an informer);
- watches as the watch cache serves them (k8s.io/apiserver/pkg/storage/cacher): without a
  resourceVersion (or "0") the current objects as ADDED, then changes; from a resourceVersion,
  every change after it, replayed from a bounded window of history (`history_limit` events per
  resource); older than the window, one `ERROR` event with a 410 Status, reason Expired, "too
  old resource version" (the client must list again); `allowWatchBookmarks=true` gets a
  BOOKMARK (the object carries only metadata.resourceVersion) after `bookmark_seconds` without
  an event; `timeoutSeconds` ends the stream (the server closes watches; clients reconnect).
  `expire_watches()` compacts the history past every version handed out (a bookmark's too)
  and closes every open watch, as an API server restart does while the cluster's revision
  moves on, so tests can show a client relisting;
- the CRD's admission on every FineTuneJob create, update and status write (tests/support/
  apiserver.py: prune, default, schema, CEL; 422 Invalid with the field errors), honouring
  `fieldValidation` (Strict rejects unknown fields, the default prunes them) and validation
  ratcheting on updates (KEP-4008: errors in fields an update leaves unchanged do not refuse
  it). `stale_crd()` turns it off, as if the cluster's CRD were older than the operator.

Only the newest version of each object is kept (kmock keeps every version; 10,000 jobs' worth
of status patches would not fit in memory), and gets, patches and deletes find their object by
key rather than by scanning the store.

It runs in a background thread with its own event loop, so tests, the test kubelet and the
operator (a subprocess, or kopf in a thread) all talk to it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums, parsing, rendering
from kmock._internal.dsl import Reaction

from kubetune.controller.reconcile import merge_patch
from tests.support.apiserver import ApiServer, generate_name
from tests.support.client import PATHS, STRICT, TEST_AGENT, Client  # noqa: F401 (re-exported)

CRDS = Path(__file__).resolve().parents[2] / "crds"
CRD_PATH = CRDS / "kubetune.dev_finetunejobs.yaml"
PROFILE_CRD_PATH = CRDS / "kubetune.dev_finetuneprofiles.yaml"
SCHEDULE_CRD_PATH = CRDS / "kubetune.dev_finetuneschedules.yaml"
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}
GROUPS = {
    "finetunejobs": "kubetune.dev",
    "finetuneprofiles": "kubetune.dev",
    "finetuneschedules": "kubetune.dev",
    "jobs": "batch",
    "leases": "coordination.k8s.io",
}
KINDS = {
    "finetunejobs": "FineTuneJob",
    "finetuneprofiles": "FineTuneProfile",
    "finetuneschedules": "FineTuneSchedule",
}
RESOURCES: dict[str, dict[str, Any]] = {
    "kubetune.dev/v1alpha1/finetunejobs": {
        "kind": "FineTuneJob",
        "singular": "finetunejob",
        "shortnames": {"ftj"},
        "subresources": {"status"},
    },
    "kubetune.dev/v1alpha1/finetuneschedules": {
        "kind": "FineTuneSchedule",
        "singular": "finetuneschedule",
        "shortnames": {"fts"},
        "subresources": {"status"},
    },
    "kubetune.dev/v1alpha1/finetuneprofiles": {
        "kind": "FineTuneProfile",
        "singular": "finetuneprofile",
        "shortnames": {"ftp"},
        "namespaced": False,
    },
    "batch/v1/jobs": {"kind": "Job", "singular": "job", "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "singular": "pod", "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap"},
    "v1/services": {"kind": "Service", "singular": "service"},
    "v1/secrets": {"kind": "Secret", "singular": "secret"},
    "v1/events": {"kind": "Event", "singular": "event"},
    "coordination.k8s.io/v1/leases": {"kind": "Lease", "singular": "lease"},
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
WRITES = ("create", "patch", "update", "delete")
WRITE_METHODS = {enums.method.POST, enums.method.PATCH, enums.method.PUT, enums.method.DELETE}
HISTORY_LIMIT = 20_000  # changes kept per resource for watches that resume from a version
BOOKMARK_SECONDS = 5.0  # the API server sends one about every minute; tests are shorter


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's path parser, plus the namespaces resource itself: `/api/v1/namespaces` and
    `/api/v1/namespaces/NAME` are the cluster-scoped Namespace objects (kmock reads every
    `/namespaces/X` as the start of a namespaced path and fails on the bare collection)."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath("", "v1", "namespaces", None, name, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


@dataclass
class Fault:
    verb: str  # create, patch, delete, get, list
    plural: str
    status: int
    remaining: int
    message: str = ""
    operator_only: bool = False  # spare the tests' and the test kubelet's own requests


class _NotJson(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"invalid character {name[0]!r} looking for beginning of value")


def _strict_json(body: bytes) -> str | None:
    """Why the API server's JSON decoder would refuse body, or None."""
    try:
        json.loads(body, parse_constant=_reject_constant)
    except _NotJson as exc:
        return str(exc)
    except ValueError:
        return None  # not JSON at all (or YAML): kmock answers that itself
    return None


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with server-set metadata, label selectors, GC, faults and counters."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.admission: ApiServer | None = ApiServer(yaml.safe_load(CRD_PATH.read_text()))
        self.profile_admission = ApiServer(yaml.safe_load(PROFILE_CRD_PATH.read_text()))
        self.schedule_admission = ApiServer(yaml.safe_load(SCHEDULE_CRD_PATH.read_text()))
        self.revision = 0  # etcd's revision: the newest resourceVersion handed out
        self.history_limit = HISTORY_LIMIT
        self.bookmark_seconds = BOOKMARK_SECONDS
        self._buses = _Hubs(self)  # kmock publishes every committed change here
        self._write_lock = asyncio.Lock()
        self.faults: list[Fault] = []
        self._in_flight: set[rendering.Request] = set()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # When each object was created (monotonic clock): the benchmark's time to Job.
        self.created_at: dict[tuple[str, str | None, str], float] = {}
        # Requests by anything but the tests and the test kubelet (i.e. by the operator).
        self.operator_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # Writes by anything but the tests and the test kubelet (i.e. by the operator).
        self.writes_by_owner: collections.Counter[str] = collections.Counter()
        self.write_log: list[tuple[str, str, str | None, Any]] = []
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(**{"namespaced": True, **info}, verbs=VERBS)
        self.resources["v1/namespaces"] = kmock.ResourceInfo(
            namespaced=False, kind="Namespace", singular="namespace", verbs=VERBS
        )

    # -- request handling -------------------------------------------------------------------

    def _verb(self, request: rendering.Request) -> str:
        action = request.action
        if request.method == enums.method.PUT:
            return "update"
        if action == enums.action.CREATE:
            return "create"
        if action == enums.action.UPDATE:
            return "patch"
        if action == enums.action.DELETE:
            return "delete"
        if action == enums.action.WATCH:
            return "watch"
        if action == enums.action.LIST:
            return "list"
        return "get"

    def next_revision(self) -> int:
        self.revision += 1
        return self.revision

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._in_flight.add(request)
        self._forget_old_requests()
        try:
            if request.method in WRITE_METHODS and request.resource is not None:
                # One write at a time, as etcd commits them: a precondition checked here still
                # holds when the write is stored, and revisions come in commit order.
                async with self._write_lock:
                    return await self._serve(request)
            return await self._serve(request)
        finally:
            self._in_flight.discard(request)

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        verb, plural = self._verb(request), request.resource.plural
        self.counts[(verb, plural)] += 1
        if not request.headers.get("User-Agent", "").startswith(TEST_AGENT):
            self.operator_counts[(verb, plural)] += 1
        if verb in WRITES and not request.headers.get("User-Agent", "").startswith(TEST_AGENT):
            self._count_owner_write(request, verb, plural)
            self.write_log.append((verb, plural, request.name, request.data))
        by_tests = request.headers.get("User-Agent", "").startswith(TEST_AGENT)
        for fault in self.faults:
            if fault.operator_only and by_tests:
                continue
            if fault.remaining > 0 and fault.verb == verb and fault.plural == plural:
                fault.remaining -= 1
                return await self._render_error(
                    kmock.KubernetesError(
                        status=fault.status,
                        reason=REASONS.get(fault.status, "Injected"),
                        message=fault.message or f"injected {fault.status}",
                    )
                )
        if verb in ("create", "patch") and request.body:
            problem = _strict_json(request.body)
            if problem is not None:
                return await self._render_error(
                    kmock.KubernetesError(status=400, reason="BadRequest", message=problem)
                )
        if request.method == enums.method.PUT and request.name and isinstance(request.data, dict):
            return await self._replace(request, plural)
        if verb == "create" and isinstance(request.data, dict):
            self._fill_metadata(request)
        elif verb == "patch" and isinstance(request.data, dict) and request.name:
            conflict = await self._prepare_patch(request, plural)
            if conflict is not None:
                return await self._render_error(conflict)
        admission = {
            "finetunejobs": self.admission,
            "finetuneprofiles": self.profile_admission,
            "finetuneschedules": self.schedule_admission,
        }
        if verb in ("create", "patch") and (server := admission.get(plural)) is not None:
            refused = await self._admit(request, verb, server, KINDS[plural])
            if refused is not None:
                return await self._render_error(refused)
        response = await self._dispatch(request)
        if verb == "create" and response.status == 200 and not response.prepared:
            response.set_status(201)  # Created, as a real API server answers
        if verb == "delete" and request.name and response.status < 300:
            await self._collect_garbage(request)
        return response

    async def _dispatch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """kmock's own handling of an object request, minus its reaction matching: the change
        to the store as KubernetesEmulator._handle makes it, then the fallback for the action,
        called directly. (kmock finds the fallback by filtering the request through every
        reaction it knows, which made the emulator, not the operator, the bottleneck at
        thousands of jobs; watches and discovery still go that way.)"""
        serve = {
            enums.action.LIST: self._serve_list,
            enums.action.FETCH: self._serve_fetch,
            enums.action.CREATE: self._serve_create,
            enums.action.UPDATE: self._serve_update,
            enums.action.DELETE: self._serve_delete,
        }.get(request.action)
        if serve is None or (request.action == enums.action.DELETE and request.name is None):
            return await super()._handle(request)
        try:
            release = await self._change(request)
            try:
                payload = await serve(request)
            finally:
                if release is not None:  # finalizers removed from an object being deleted
                    async with self._lock:
                        raw = self._objects[release].raw
                        self._objects[release].delete()
                        await self._buses[request.resource].put({"type": "DELETED", "object": raw})
        except kmock.KubernetesError as exc:
            return await self._render_error(exc)
        return aiohttp.web.json_response(payload)

    async def _change(self, request: rendering.Request) -> Any:
        """The store change of kmock.KubernetesEmulator._handle (kmock 0.8), unchanged."""
        release = None
        async with self._lock:
            key = None
            if request.action == enums.action.CREATE:
                meta = request.data.get("metadata", {})
                key = (
                    request.resource,
                    request.namespace or meta.get("namespace"),
                    meta.get("name"),
                )
                if key not in self._objects:
                    self._objects[key] = request.data
                elif not self._objects[key].deleted:
                    # apimachinery's errors.NewAlreadyExists: 409, reason AlreadyExists.
                    plural = request.resource.plural
                    group = GROUPS.get(plural)
                    resource = f"{plural}.{group}" if group else plural
                    raise kmock.KubernetesError(
                        status=409,
                        reason="AlreadyExists",
                        message=f'{resource} "{key[2]}" already exists',
                    )
                else:
                    self._objects[key].create(request.data)
                raw = self._objects[key].last.raw
                await self._buses[request.resource].put({"type": "ADDED", "object": raw})
                self.created_at[(request.resource.plural, key[1], key[2])] = time.monotonic()
            elif request.action == enums.action.DELETE:
                key = (request.resource, request.namespace, request.name)
                if key not in self._objects or self._objects[key].deleted:
                    raise kmock.KubernetesObjectNotFoundError()
                meta = self._objects[key].get("metadata", {})
                if meta.get("deletionTimestamp"):
                    pass  # already being deleted
                elif meta.get("finalizers", []):
                    stamp = datetime.datetime.now(tz=datetime.UTC).isoformat()
                    self._objects[key].patch({"metadata": {"deletionTimestamp": stamp}})
                    raw = self._objects[key].raw
                    await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
                else:
                    self._objects[key].delete()
                    raw = self._objects[key].last.raw
                    await self._buses[request.resource].put({"type": "DELETED", "object": raw})
            elif request.action == enums.action.UPDATE:
                key = (request.resource, request.namespace, request.name)
                if key not in self._objects or self._objects[key].deleted:
                    raise kmock.KubernetesObjectNotFoundError()
                self._objects[key].patch(request.data)
                raw = self._objects[key].raw
                await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
            if key is not None and key in self._objects and not self._objects[key].deleted:
                meta = self._objects[key].get("metadata", {})
                if meta.get("deletionTimestamp") and not meta.get("finalizers", []):
                    release = key
        return release

    async def _admit(
        self, request: rendering.Request, verb: str, server: ApiServer, kind: str
    ) -> kmock.KubernetesError | None:
        """The CRD's admission; the request's body becomes what would be stored."""
        if not isinstance(request.data, dict):
            return None
        strict = request.params.get("fieldValidation") == "Strict"
        if verb == "create":
            stored, errors = server.admit(request.data, strict)
            if not errors:
                request.data.clear()
                request.data.update(stored)
        else:
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects or self.objects[key].deleted:
                    return None
                current = copy.deepcopy(self.objects[key].raw)
            if request.subresource == "status":
                old = current.get("status") or {}
                stored, errors = server.admit_status(_merge(old, request.data.get("status") or {}))
                if not errors:
                    request.data["status"] = merge_patch(old, stored)
            else:
                merged = _merge(current, {k: v for k, v in request.data.items() if k != "metadata"})
                stored, errors = server.admit(merged, strict)
                # Validation ratcheting (KEP-4008, on by default since 1.30): an update is not
                # refused for errors in fields it leaves as they were (e.g. kopf annotating an
                # object stored under an older schema).
                if not all(e.startswith("unknown field") for e in errors):
                    errors = [e for e in errors if _at(stored, e) != _at(current, e)]
                if not errors:
                    request.data["spec"] = merge_patch(current.get("spec") or {}, stored["spec"])
        if not errors:
            return None
        if all(e.startswith(("unknown field", "duplicate field")) for e in errors):
            # Strict decoding fails before validation, as a 400 (KEP-2885).
            return kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message=f'{kind} in version "v1alpha1" cannot be handled as a {kind}: '
                f"strict decoding error: {', '.join(errors)}",
            )
        name = request.name or ((request.data.get("metadata") or {}).get("name"))
        return kmock.KubernetesError(
            status=422,
            reason="Invalid",
            message=f'{kind}.kubetune.dev "{name}" is invalid: [{", ".join(errors)}]',
        )

    def _forget_old_requests(self) -> None:
        """kmock keeps every request for assertions and matches each new one by scanning all
        earlier ones (quadratic over a long run). This suite asserts on counters instead, so
        only requests still being served are kept."""
        if len(self._requests) > 32:
            self._requests[:] = [r for r in self._requests if r in self._in_flight]
            for payload in self._payloads:
                for reaction in payload._walk(Reaction):
                    reaction._requests.clear()

    def _count_owner_write(self, request: rendering.Request, verb: str, plural: str) -> None:
        """Attribute each write to the FineTuneJob it concerns (for the scale benchmark)."""
        owner = None
        if plural == "finetunejobs":
            owner = request.name
        elif plural == "events" and isinstance(request.data, dict):
            owner = (request.data.get("involvedObject") or {}).get("name")
        elif (
            plural in ("jobs", "configmaps", "services")
            and isinstance(request.data, dict)
            and verb == "create"
        ):
            owner = _labels(request.data).get("kubetune.dev/finetunejob")
        elif plural in ("jobs", "configmaps", "services") and request.name:
            owner = request.name.rsplit("-", 1)[0]
        if owner:
            self.writes_by_owner[f"{request.namespace}/{owner}"] += 1

    def _fill_metadata(self, request: rendering.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace
        if meta.get("generateName") and not meta.get("name"):
            meta["name"] = generate_name(meta["generateName"])
        meta["uid"] = str(uuid.uuid4())
        meta.pop("resourceVersion", None)  # set when the write is committed
        meta["creationTimestamp"] = _now()
        if "spec" in request.data:
            meta["generation"] = 1

    async def _prepare_patch(
        self, request: rendering.Request, plural: str
    ) -> kmock.KubernetesError | None:
        """Check the patch's resourceVersion precondition; bump generation on spec changes."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return None
            current = self.objects[key].raw
        meta = request.data.setdefault("metadata", {}) if request.data is not None else {}
        if not isinstance(meta, dict):
            return None
        wanted = meta.pop("resourceVersion", None)  # the new one is set when committed
        stored = (current.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != stored:
            return _conflict(plural, request.name)
        if request.subresource is None and "spec" in request.data:
            merged = _merge(current.get("spec") or {}, request.data["spec"])
            if merged != (current.get("spec") or {}):
                meta["generation"] = int((current.get("metadata") or {}).get("generation", 1)) + 1
        # A status subresource write changes only the status; a main-resource write never does.
        for key in list(request.data):
            if (key == "status") != (request.subresource == "status") and key != "metadata":
                del request.data[key]
        return None

    async def _replace(self, request: rendering.Request, plural: str) -> aiohttp.web.Response:
        """PUT: the body replaces the stored object (update, with its precondition)."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return await self._render_error(kmock.KubernetesObjectNotFoundError())
            current = self.objects[key].raw
            meta = current.get("metadata") or {}
            body = copy.deepcopy(request.data)
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != meta.get("resourceVersion"):
                return await self._render_error(_conflict(plural, request.name))
            new_meta = body.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace", "name", "generation"):
                if field in meta:
                    new_meta[field] = meta[field]
            if "spec" in body and body["spec"] != current.get("spec"):
                new_meta["generation"] = int(meta.get("generation", 1)) + 1
            self.objects[key].create(body)
            await self._buses[request.resource].put({"type": "MODIFIED", "object": body})
            stored = self.objects[key].raw
        return aiohttp.web.json_response(stored)

    async def _collect_garbage(self, request: rendering.Request) -> None:
        policy = request.params.get("propagationPolicy")
        body = request.data if isinstance(request.data, dict) else {}
        policy = policy or body.get("propagationPolicy")
        if policy is None and request.resource.plural == "jobs":
            policy = "Orphan"  # batch/v1 Jobs orphan their pods unless told otherwise
        if policy == "Orphan":
            return
        async with self._lock:
            owner = self.objects[request.resource, request.namespace, request.name].last.raw
            uid = (owner.get("metadata") or {}).get("uid")
            dependents = [
                (resource, namespace, name)
                for (resource, namespace, name), obj in self.objects.items()
                if not obj.deleted
                and any(
                    ref.get("uid") == uid
                    for ref in (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                )
            ]
        for resource, namespace, name in dependents:
            async with self._lock:
                obj = self.objects[resource, namespace, name]
                if obj.deleted:
                    continue
                raw = obj.raw
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
            await self._collect_garbage(
                rendering.Request(
                    resource=resource,
                    namespace=namespace,
                    name=name,
                    params={"propagationPolicy": "Background"},
                )
            )

    # -- reads: by key, lists with pages, watches from a resourceVersion --------------------------

    def _stored(self, request: rendering.Request, name: str | None = None) -> Any:
        """The stored object a named request is about (no scan of the whole store)."""
        key = (request.resource, request.namespace, name or request.name)
        if key not in self.objects:
            return None
        return self.objects[key]

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request)
        assert obj is not None  # patched in _handle, or it answered 404 there
        return obj.last.raw

    _serve_delete = _serve_update

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        meta = request.data.get("metadata") or {}
        key = (request.resource, request.namespace or meta.get("namespace"), meta.get("name"))
        return self.objects[key].raw

    def _current(self, request: rendering.Request) -> list[dict[str, Any]]:
        """The request's objects, sorted by (namespace, name) as etcd's keys are."""
        out = [
            obj.raw
            for (resource, namespace, _), obj in self.objects.items()
            if resource == request.resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
        ]
        selector = request.params.get("labelSelector")
        if selector:
            out = [o for o in out if _selector_matches(selector, _labels(o))]
        return sorted(out, key=_position)

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        items = self._current(request)
        revision = self.revision
        token = request.params.get("continue")
        if token:
            state = json.loads(base64.urlsafe_b64decode(token))
            revision, start = state["rv"], tuple(state["start"])
            items = [o for o in items if _position(o) > start]
        meta: dict[str, Any] = {"resourceVersion": str(revision)}
        limit = int(request.params.get("limit") or 0)
        if 0 < limit < len(items):
            items, rest = items[:limit], len(items) - limit
            state = {"rv": revision, "start": list(_position(items[-1]))}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
            meta["remainingItemCount"] = rest
        info = RESOURCES.get(_resource_key(request.resource)) or {}
        return {
            "apiVersion": _api_version(request.resource),
            "kind": f"{info.get('kind', 'Object')}List",
            "metadata": meta,
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> Any:
        params = request.params
        hub = self._buses[request.resource]
        selector = params.get("labelSelector")
        since = params.get("resourceVersion")
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        yield b""  # the headers go out now, as the API server's do
        # No await from here to the subscription: the backlog and the live events meet exactly.
        if since in (None, "", "0"):
            backlog = [{"type": "ADDED", "object": o} for o in self._current(request)]
        else:
            try:
                start = int(since)
            except ValueError:
                start = -1
            if start < hub.compacted:
                yield {"type": "ERROR", "object": _expired(since)}
                return
            backlog = [e for v, e in hub.history if v > start and _watched(request, e, selector)]
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        hub.subscribers.add(queue)
        try:
            for event in backlog:
                yield event
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                wait = self.bookmark_seconds if bookmarks else None
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        return  # timeoutSeconds: the server ends the watch
                    wait = left if wait is None else min(wait, left)
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if bookmarks and queue.empty():
                        # Every change of this resource up to now has gone out on this stream.
                        yield _bookmark(request.resource, self.revision)
                    continue
                if event is None:
                    return  # closed by expire_watches()
                if _watched(request, event, selector):
                    yield event
        finally:
            hub.subscribers.discard(queue)

    def expire_watches(self) -> None:
        """Compact every resource's history and close every open watch (call on the loop).

        The compaction reaches one revision past every version handed out so far, bookmarks'
        included: in a real cluster the shared etcd revision keeps moving (leases, events) while
        the API server restarts, and its watch cache starts again from a list at the revision of
        that moment (k8s.io/apiserver/pkg/storage/cacher), so every client resuming from an
        older version is told "too old resource version", whatever it last saw."""
        compacted = self.next_revision()
        for hub in self._buses.values():
            hub.compacted = compacted
            hub.history.clear()
            for queue in list(hub.subscribers):
                queue.put_nowait(None)


class _Hub:
    """One resource's committed changes: a window of history and the open watches."""

    def __init__(self, emulator: Emulator, resource: Any) -> None:
        self.emulator = emulator
        self.resource = resource
        self.history: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self.compacted = 0  # changes at or before this revision are no longer in history
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    async def put(self, *events: dict[str, Any]) -> None:
        for event in events:
            self.publish(event)

    def publish(self, event: dict[str, Any]) -> None:
        """Commit: the change gets the next revision, joins the history and every watch."""
        emulator = self.emulator
        revision = emulator.next_revision()
        obj = event["object"]
        meta = obj.setdefault("metadata", {})
        if event["type"] == "DELETED":  # the tombstone, not the stored object's last state
            obj = {**obj, "metadata": {**meta, "resourceVersion": str(revision)}}
        else:  # the stored object's own metadata: what later reads return
            meta["resourceVersion"] = str(revision)
        event = {"type": event["type"], "object": obj}
        self.history.append((revision, event))
        while len(self.history) > emulator.history_limit:
            self.compacted = self.history.popleft()[0]
        for queue in self.subscribers:
            queue.put_nowait(event)
        key = (self.resource, meta.get("namespace"), meta.get("name"))
        if key in emulator.objects:  # keep the newest version only
            history = emulator.objects[key].history
            if len(history) > 2:
                del history[:-2]


class _Hubs(dict):  # type: ignore[type-arg]
    def __init__(self, emulator: Emulator) -> None:
        super().__init__()
        self.emulator = emulator

    def __missing__(self, resource: Any) -> _Hub:
        hub = self[resource] = _Hub(self.emulator, resource)
        return hub


def _position(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _resource_key(resource: Any) -> str:
    group = f"{resource.group}/" if resource.group else ""
    return f"{group}{resource.version}/{resource.plural}"


def _api_version(resource: Any) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else resource.version


def _watched(request: rendering.Request, event: dict[str, Any], selector: str | None) -> bool:
    obj = event.get("object") or {}
    if request.namespace is not None and _position(obj)[0] != request.namespace:
        return False
    return not selector or _selector_matches(selector, _labels(obj))


def _bookmark(resource: Any, revision: int) -> dict[str, Any]:
    info = RESOURCES.get(_resource_key(resource)) or {}
    return {
        "type": "BOOKMARK",
        "object": {
            "apiVersion": _api_version(resource),
            "kind": info.get("kind", "Object"),
            "metadata": {"resourceVersion": str(revision)},
        },
    }


def _expired(since: str) -> dict[str, Any]:
    # What the watch cache sends for a resourceVersion older than its window (cacher.go).
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {since}",
        "reason": "Expired",
        "code": 410,
    }


def _conflict(plural: str, name: str | None) -> kmock.KubernetesError:
    # The registry's message for a failed resourceVersion precondition (storage.
    # NewConflictError via errors.NewConflict; "OptimisticLockErrorMsg" in the apiserver).
    group = GROUPS.get(plural)
    resource = f"{plural}.{group}" if group else plural
    return kmock.KubernetesError(
        status=409,
        reason="Conflict",
        message=f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
    )


_MISSING = object()


def _at(obj: Any, error: str) -> Any:
    """The value at an admission error's path ("spec.gates[0].min: ..."), or _MISSING."""
    path = error.split(": ", 1)[0]
    if path == "<root>":
        return {k: v for k, v in obj.items() if k != "metadata"}
    node = obj
    for part in path.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def wait_until(what: str, check: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    """check()'s first truthy value, polled until timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cluster:
    """The emulator served over HTTP on 127.0.0.1 from a background thread."""

    def __init__(self) -> None:
        self.emulator: Emulator | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)

    def start(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the emulated API server did not start")
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with Emulator() as emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def inject(
        self,
        verb: str,
        plural: str,
        status: int,
        times: int = 1,
        message: str = "",
        operator_only: bool = False,
    ) -> Fault:
        fault = Fault(verb, plural, status, times, message, operator_only)
        assert self.emulator is not None
        self.emulator.faults.append(fault)
        return fault

    def call(self, fn: Any, timeout: float = 60.0) -> Any:
        """fn(emulator), run on the emulator's own loop (so it sees a consistent store)."""
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(fn(self.emulator))
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(timeout) or not result:
            raise RuntimeError("the emulator did not answer")
        return result[0]

    def expire_watches(self) -> None:
        """Compact the history and close every open watch (see Emulator.expire_watches)."""
        self.call(lambda emulator: emulator.expire_watches())

    @contextmanager
    def stale_crd(self) -> Iterator[None]:
        """No CRD admission meanwhile: as if the cluster's CRD were older than the operator."""
        assert self.emulator is not None
        saved, self.emulator.admission = self.emulator.admission, None
        try:
            yield
        finally:
            self.emulator.admission = saved

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emulated", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "emulated"}}],
                    "contexts": [
                        {"name": "emulated", "context": {"cluster": "emulated", "user": "test"}}
                    ],
                    "current-context": "emulated",
                }
            )
        )
        return path


@contextmanager
def running_cluster() -> Iterator[Cluster]:
    cluster = Cluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()
