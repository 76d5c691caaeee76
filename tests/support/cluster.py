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
- a per-(verb, plural) request counter, for the scale benchmark's API-writes figure;
- JSON as the API server decodes it: NaN and Infinity are not JSON (RFC 8259), so a body with
  them is a 400 Bad Request, as from kube-apiserver's decoder;
- the CRD's admission on every FineTuneJob create, update and status write (tests/support/
  apiserver.py: prune, default, schema, CEL; 422 Invalid with the field errors), honouring
  `fieldValidation` (Strict rejects unknown fields, the default prunes them) and validation
  ratcheting on updates (KEP-4008: errors in fields an update leaves unchanged do not refuse
  it). `stale_crd()` turns it off, as if the cluster's CRD were older than the operator.

It runs in a background thread with its own event loop, so tests, the test kubelet and the
operator (a subprocess, or kopf in a thread) all talk to it over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums, rendering
from kmock._internal.dsl import Reaction

from kubetune.controller.reconcile import merge_patch
from tests.support.apiserver import ApiServer, generate_name

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "kubetune.dev_finetunejobs.yaml"
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 422: "Invalid"}
RESOURCES: dict[str, dict[str, Any]] = {
    "kubetune.dev/v1alpha1/finetunejobs": {
        "kind": "FineTuneJob",
        "singular": "finetunejob",
        "shortnames": {"ftj"},
        "subresources": {"status"},
    },
    "batch/v1/jobs": {"kind": "Job", "singular": "job", "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "singular": "pod", "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "singular": "configmap"},
    "v1/secrets": {"kind": "Secret", "singular": "secret"},
    "v1/events": {"kind": "Event", "singular": "event"},
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
WRITES = ("create", "patch", "delete")
TEST_AGENT = "kubetune-tests"


@dataclass
class Fault:
    verb: str  # create, patch, delete, get, list
    plural: str
    status: int
    remaining: int
    message: str = ""


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
        self._versions = itertools.count(1)
        self.faults: list[Fault] = []
        self._in_flight: set[rendering.Request] = set()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # Writes by anything but the tests and the test kubelet (i.e. by the operator).
        self.writes_by_owner: collections.Counter[str] = collections.Counter()
        self.write_log: list[tuple[str, str, str | None, Any]] = []
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(namespaced=True, verbs=VERBS, **info)
        self.resources["v1/namespaces"] = kmock.ResourceInfo(
            namespaced=False, kind="Namespace", singular="namespace", verbs=VERBS
        )

    # -- request handling -------------------------------------------------------------------

    def _verb(self, request: rendering.Request) -> str:
        action = request.action
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

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self._in_flight.add(request)
        self._forget_old_requests()
        try:
            return await self._serve(request)
        finally:
            self._in_flight.discard(request)

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None:
            return await super()._handle(request)
        verb, plural = self._verb(request), request.resource.plural
        self.counts[(verb, plural)] += 1
        if verb in WRITES and not request.headers.get("User-Agent", "").startswith(TEST_AGENT):
            self._count_owner_write(request, verb, plural)
            self.write_log.append((verb, plural, request.name, request.data))
        for fault in self.faults:
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
        if verb == "create" and isinstance(request.data, dict):
            self._fill_metadata(request)
        elif verb == "patch" and isinstance(request.data, dict) and request.name:
            await self._prepare_patch(request)
        if plural == "finetunejobs" and verb in ("create", "patch") and self.admission:
            refused = await self._admit(request, verb)
            if refused is not None:
                return await self._render_error(refused)
        response = await super()._handle(request)
        if verb == "create" and response.status == 200 and not response.prepared:
            response.set_status(201)  # Created, as a real API server answers
        if verb == "delete" and request.name and response.status < 300:
            await self._collect_garbage(request)
        return response

    async def _admit(self, request: rendering.Request, verb: str) -> kmock.KubernetesError | None:
        """The CRD's admission; the request's body becomes what would be stored."""
        assert self.admission is not None
        if not isinstance(request.data, dict):
            return None
        strict = request.params.get("fieldValidation") == "Strict"
        if verb == "create":
            stored, errors = self.admission.admit(request.data, strict)
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
                stored, errors = self.admission.admit_status(
                    _merge(old, request.data.get("status") or {})
                )
                if not errors:
                    request.data["status"] = merge_patch(old, stored)
            else:
                merged = _merge(current, {k: v for k, v in request.data.items() if k != "metadata"})
                stored, errors = self.admission.admit(merged, strict)
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
                message=f'FineTuneJob in version "v1alpha1" cannot be handled as a FineTuneJob: '
                f"strict decoding error: {', '.join(errors)}",
            )
        name = request.name or ((request.data.get("metadata") or {}).get("name"))
        return kmock.KubernetesError(
            status=422,
            reason="Invalid",
            message=f'FineTuneJob.kubetune.dev "{name}" is invalid: [{", ".join(errors)}]',
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
            plural in ("jobs", "configmaps") and isinstance(request.data, dict) and verb == "create"
        ):
            owner = _labels(request.data).get("kubetune.dev/finetunejob")
        elif plural in ("jobs", "configmaps") and request.name:
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
        meta["resourceVersion"] = str(next(self._versions))
        meta["creationTimestamp"] = _now()
        if "spec" in request.data:
            meta["generation"] = 1

    async def _prepare_patch(self, request: rendering.Request) -> None:
        """Bump resourceVersion (and generation when the spec changes) within the patch itself."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return
            current = self.objects[key].raw
        meta = request.data.setdefault("metadata", {}) if request.data is not None else {}
        if not isinstance(meta, dict):
            return
        meta["resourceVersion"] = str(next(self._versions))
        if request.subresource is None and "spec" in request.data:
            merged = _merge(current.get("spec") or {}, request.data["spec"])
            if merged != (current.get("spec") or {}):
                meta["generation"] = int((current.get("metadata") or {}).get("generation", 1)) + 1
        # A status subresource write changes only the status; a main-resource write never does.
        for key in list(request.data):
            if (key == "status") != (request.subresource == "status") and key != "metadata":
                del request.data[key]

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

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [
                o for o in payload["items"] if _selector_matches(selector, _labels(o))
            ]
        payload["metadata"] = {"resourceVersion": str(next(self._versions))}
        return payload

    async def _serve_watch(self, request: rendering.Request) -> Any:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if (
                not selector
                or not isinstance(event, dict)
                or _selector_matches(selector, _labels(event.get("object") or {}))
            ):
                yield event


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
        self, verb: str, plural: str, status: int, times: int = 1, message: str = ""
    ) -> Fault:
        fault = Fault(verb, plural, status, times, message)
        assert self.emulator is not None
        self.emulator.faults.append(fault)
        return fault

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


PATHS = {
    "finetunejobs": "/apis/kubetune.dev/v1alpha1",
    "jobs": "/apis/batch/v1",
    "pods": "/api/v1",
    "configmaps": "/api/v1",
    "secrets": "/api/v1",
    "events": "/api/v1",
}


STRICT = "?fieldValidation=Strict"


class Client:
    """A minimal JSON client for tests and the test kubelet (what kubectl would do)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def path(self, plural: str, namespace: str | None = None, name: str | None = None) -> str:
        out = PATHS[plural]
        if namespace:
            out += f"/namespaces/{namespace}"
        out += f"/{plural}"
        if name:
            out += f"/{name}"
        return out

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "User-Agent": TEST_AGENT},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def list(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.request("GET", self.path(plural, namespace))["items"]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(plural, namespace, name))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        # As kubectl does: unknown fields are errors (fieldValidation=Strict).
        return self.request("POST", self.path(plural, namespace) + STRICT, body)

    def patch(
        self, plural: str, namespace: str, name: str, body: dict[str, Any], status: bool = False
    ) -> dict[str, Any]:
        path = self.path(plural, namespace, name) + ("/status" if status else STRICT)
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, plural: str, namespace: str, name: str, policy: str = "Background") -> None:
        path = self.path(plural, namespace, name) + f"?propagationPolicy={policy}"
        try:
            self.request("DELETE", path)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
