"""A fault-injecting proxy in front of the real API server: what no real control plane gives on
demand (a 500 on the third create, a 503 on a list, an admission webhook's denial, a 403 from an
RBAC rule that went missing) for the operator's requests, and nothing else.

The operator's kubeconfig names the proxy (plain HTTP on 127.0.0.1) and keeps its own bearer
token, which the proxy passes on over TLS: authentication, RBAC, admission and everything the
API server answers stay the real ones. Responses are streamed as they come, so watches work.
An injected fault is answered instead of forwarding, with the body the API server sends for
that code (a metav1.Status with its reason, as apimachinery's errors package builds them:
staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go), `times` times for requests that
match its verb (create, get, list, watch, patch, update, delete) and resource (plural).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.control_plane import free_port, kubeconfig

# The reason each code carries in a metav1.Status (errors.go's New* functions).
REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    410: "Expired",
    409: "Conflict",  # AlreadyExists for a create (_status)
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade"}


@dataclass
class Fault:
    verb: str
    plural: str
    status: int
    remaining: int
    message: str


def verb_and_resource(method: str, path: str, query: dict[str, str]) -> tuple[str, str]:
    """The API's verb and resource plural of a request, as the API server's request info
    resolver reads them (staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go)."""
    parts = path.strip("/").split("/")
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # after /api/v1 or /apis/g/v
    watch = query.get("watch") in ("true", "1")
    if rest[:1] == ["watch"]:  # the old /watch/ path prefix
        rest, watch = rest[1:], True
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # a namespaced resource (a Namespace's own subresource stays below)
    plural = rest[0] if rest else ""
    named = len(rest) >= 2
    if len(rest) >= 3:
        plural = f"{plural}/{rest[2]}"  # a subresource: finetunejobs/status, pods/eviction
    if method == "GET":
        verb = "watch" if watch else ("get" if named else "list")
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }.get(method, method.lower())
    return verb, plural


class FaultProxy:
    def __init__(self, upstream: str, ca_file: Path) -> None:
        self.upstream = upstream
        self.ssl = ssl.create_default_context(cafile=str(ca_file))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.faults: list[Fault] = []
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None

    # -- control

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            # What is still streaming (watches): cancelled, so nothing is left pending.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def inject(
        self, verb: str, plural: str, status: int, times: int = 1, message: str = ""
    ) -> Fault:
        fault = Fault(verb, plural, status, times, message or f"injected {status}")
        with self._lock:
            self.faults.append(fault)
        return fault

    def kubeconfig(self, path: Path, token: str, namespace: str) -> Path:
        """A kubeconfig that reaches the API server through this proxy with `token`."""
        return kubeconfig(path, self.url, None, token=token, namespace=namespace)

    # -- serving

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._setup())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _setup(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)

    def _take(self, verb: str, plural: str) -> Fault | None:
        with self._lock:
            self.counts[(verb, plural)] += 1
            for fault in self.faults:
                if fault.remaining > 0 and (fault.verb, fault.plural) == (verb, plural):
                    fault.remaining -= 1
                    return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        verb, plural = verb_and_resource(request.method, request.path, dict(request.query))
        fault = self._take(verb, plural)
        if fault is not None:
            # As the API server: Retry-After on 429 and 503 (the operator waits that long).
            retry = {"Retry-After": "1"} if fault.status in (429, 503) else {}
            return web.json_response(status=fault.status, data=_status(fault), headers=retry)
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in {"host", *HOP_BY_HOP}
        }
        try:
            upstream = await self._session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body or None,
                ssl=self.ssl,
                allow_redirects=False,
                # As sent: no Content-Type is no Content-Type (the API server reads JSON; the
                # kubernetes client sends none on some creates), not application/octet-stream.
                skip_auto_headers=("Content-Type",),
            )
        except aiohttp.ClientConnectionError:  # the API server is down: a load balancer's 503
            down = Fault(verb, plural, 503, 0, "the API server is unavailable")
            return web.json_response(status=503, data=_status(down))
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, ConnectionError) as exc:
                # The API server went away mid-stream: the client's connection is cut, not
                # ended (a list is not a whole 200, a watch not a timeout).
                raise ConnectionResetError("the API server went away") from exc
            await response.write_eof()
            return response


def _status(fault: Fault) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": fault.message,
        "reason": "AlreadyExists"
        if (fault.status, fault.verb) == (409, "create")
        else REASONS.get(fault.status, "Unknown"),
        "code": fault.status,
    }
