"""A minimal JSON client of the real API server (tests/support/control_plane.py) for tests, the
node agent and the benchmarks: what kubectl would do, through urllib, over TLS with a client
certificate."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

TEST_AGENT = "kubetune-tests"

PATHS = {
    "finetunejobs": "/apis/kubetune.dev/v1alpha1",
    "finetuneprofiles": "/apis/kubetune.dev/v1alpha1",
    "finetuneschedules": "/apis/kubetune.dev/v1alpha1",
    "namespaces": "/api/v1",
    "jobs": "/apis/batch/v1",
    "pods": "/api/v1",
    "configmaps": "/api/v1",
    "services": "/api/v1",
    "secrets": "/api/v1",
    "events": "/api/v1",
    "serviceaccounts": "/api/v1",
    "nodes": "/api/v1",
    "leases": "/apis/coordination.k8s.io/v1",
}


STRICT = "?fieldValidation=Strict"


class Client:
    """A minimal JSON client for tests and the node agent (what kubectl would do)."""

    def __init__(self, url: str, context: ssl.SSLContext | None = None) -> None:
        self.url = url
        self.context = context  # TLS with a client certificate: the real API server's

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
        with urllib.request.urlopen(req, timeout=30, context=self.context) as response:
            raw = response.read()
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError:  # /readyz, /healthz: text
            return raw.decode()

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
