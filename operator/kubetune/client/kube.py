"""The client's Kubernetes API calls, as its user: the kubeconfig's current context (or the one
named) and its namespace, as kubectl chooses them, or in a pod its ServiceAccount. The only
module of kubetune.client that imports the kubernetes package.

Every failure becomes a ClientError of one line that says what to do: no kubeconfig, an API
server that cannot be reached, the CRD not installed, forbidden (which verb on which resource),
an object that does not exist.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from kubetune.api import GROUP as API_GROUP
from kubetune.api import PLURAL, VERSION

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
T = TypeVar("T")


class ClientError(Exception):
    """What went wrong, in one line that names the fix."""


class NotFound(ClientError):
    pass


class Conflict(ClientError):
    pass


class Gone(ClientError):
    """A watch's resourceVersion is too old (410): list again."""


@dataclass(frozen=True)
class Target:
    """Which cluster and namespace: for messages and defaults."""

    context: str  # "in-cluster" in a pod
    namespace: str
    server: str


def _kubeconfig_paths(kubeconfig: str | None) -> list[str]:
    if kubeconfig:
        return [kubeconfig]
    value = os.environ.get("KUBECONFIG")
    if value:
        return [p for p in value.split(os.pathsep) if p]
    return [str(Path("~/.kube/config").expanduser())]


def connect(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[kubernetes.client.ApiClient, Target]:
    """An API client as the user, and where it points. In a pod with no kubeconfig given or
    found, the pod's ServiceAccount (as client-go's in-cluster config)."""
    paths = _kubeconfig_paths(kubeconfig)
    found = [p for p in paths if Path(p).expanduser().is_file()]
    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not found and in_pod and not kubeconfig and not context:
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException as exc:
            raise ClientError(f"in a pod, but its service account cannot be used: {exc}") from exc
        namespace = "default"
        if IN_CLUSTER_NAMESPACE.is_file():
            namespace = IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
        client = kubernetes.client.ApiClient()
        return client, Target("in-cluster", namespace, client.configuration.host)
    if not found:
        where = ", ".join(paths)
        raise ClientError(
            f"no kubeconfig: {where} does not exist; set KUBECONFIG (or --kubeconfig) to your "
            "cluster's kubeconfig, or log in with your cluster's tool (kubetune uses what kubectl "
            "uses)"
        )
    config_file = found[0] if len(found) == 1 else os.pathsep.join(found)
    try:
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file)
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        if chosen is None:
            names = ", ".join(c["name"] for c in contexts) or "none"
            raise ClientError(
                f"--context {context}: no such context in {config_file} (there are: {names})"
            )
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file, context=chosen["name"], client_configuration=configuration
        )
    except kubernetes.config.ConfigException as exc:
        raise ClientError(
            f"the kubeconfig {config_file} cannot be used: {exc}; check it with "
            "`kubectl config view`"
        ) from exc
    namespace = (chosen.get("context") or {}).get("namespace") or "default"
    client = kubernetes.client.ApiClient(configuration)
    return client, Target(chosen["name"], namespace, configuration.host)


def _status(exc: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def translate(exc: Exception, verb: str, resource: str, namespace: str, server: str) -> ClientError:
    """One line for a failed call: `verb` on `resource` (e.g. create finetunejobs)."""
    where = f" in namespace {namespace}" if namespace else ""
    if isinstance(exc, ApiException):
        body = _status(exc)
        message = body.get("message") or str(exc.reason)
        details = body.get("details") or {}
        if exc.status == 401:
            return ClientError(
                f"unauthorized at {server}: the kubeconfig's credentials were refused (an "
                "expired token?); log in again"
            )
        if exc.status == 403:
            group = f".{API_GROUP}" if resource.startswith("finetune") else ""
            # RBAC answers before the resource is looked up: a cluster without kubetune
            # says forbidden to anyone but an admin.
            installed = " (or whether kubetune is installed there)" if group else ""
            return ClientError(
                f"forbidden: {message}; ask your platform team for the right to {verb} "
                f"{resource}{where}{installed} (check with: kubectl auth can-i {verb} "
                f"{resource}{group}{f' -n {namespace}' if namespace else ''})"
            )
        if exc.status == 404 and not details.get("name"):
            if resource.startswith("finetune"):  # a kind of ours
                return ClientError(
                    f"the {resource}.{API_GROUP} API is not served by {server}: the kubetune "
                    "CRDs are not installed in this cluster (helm install kubetune, "
                    "docs/install.md), or this is not the cluster you meant (--context)"
                )
            return NotFound(f"{verb} {resource}{where}: {message}")
        if exc.status == 404:
            return NotFound(f"{message}{where}")
        if exc.status == 410:
            return Gone(message)
        if exc.status == 409:
            return Conflict(message)
        if exc.status == 422:
            causes = details.get("causes") or []
            lines = [f"{c.get('field', '')}: {c.get('message', '')}" for c in causes]
            return ClientError(f"the API server refused it: {'; '.join(lines) or message}")
        return ClientError(f"{verb} {resource}{where}: {exc.status} {message}")
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return ClientError(
            f"cannot reach the API server at {server}: {exc.__class__.__name__}; is the cluster "
            "up, and is this the context you meant (--context)?"
        )
    raise exc


class Kube:
    """The calls the client makes, on plain dicts."""

    def __init__(self, client: kubernetes.client.ApiClient, target: Target) -> None:
        self.client = client
        self.target = target
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)

    def _call(self, verb: str, resource: str, namespace: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate(exc, verb, resource, namespace, self.target.server) from None

    # FineTuneJobs and FineTuneSchedules
    def create(self, namespace: str, body: dict[str, Any], plural: str = PLURAL) -> dict[str, Any]:
        return self._call(
            "create",
            plural,
            namespace,
            lambda: self.custom.create_namespaced_custom_object(
                API_GROUP, VERSION, namespace, plural, body, field_validation="Strict"
            ),
        )

    def get(self, namespace: str, name: str, plural: str = PLURAL) -> dict[str, Any]:
        return self._call(
            "get",
            plural,
            namespace,
            lambda: self.custom.get_namespaced_custom_object(
                API_GROUP, VERSION, namespace, plural, name
            ),
        )

    def list(self, namespace: str | None, plural: str = PLURAL) -> dict[str, Any]:
        if namespace is None:
            return self._call(
                "list",
                plural,
                "",
                lambda: self.custom.list_cluster_custom_object(API_GROUP, VERSION, plural),
            )
        return self._call(
            "list",
            plural,
            namespace,
            lambda: self.custom.list_namespaced_custom_object(
                API_GROUP, VERSION, namespace, plural
            ),
        )

    def patch(
        self, namespace: str, name: str, body: dict[str, Any], plural: str = PLURAL
    ) -> dict[str, Any]:
        return self._call(
            "patch",
            plural,
            namespace,
            lambda: self.custom.patch_namespaced_custom_object(
                API_GROUP, VERSION, namespace, plural, name, body
            ),
        )

    def delete(self, namespace: str, name: str) -> None:
        self._call(
            "delete",
            PLURAL,
            namespace,
            lambda: self.custom.delete_namespaced_custom_object(
                API_GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            ),
        )

    def watch(
        self, namespace: str, name: str, resource_version: str, timeout: int
    ) -> Iterator[dict[str, Any]]:
        """The watch events of one FineTuneJob after resource_version, for up to timeout s."""
        watch = kubernetes.watch.Watch()
        stream = watch.stream(
            self.custom.list_namespaced_custom_object,
            API_GROUP,
            VERSION,
            namespace,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=resource_version,
            timeout_seconds=timeout,
            allow_watch_bookmarks=False,
        )
        try:
            yield from stream
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise translate(exc, "watch", PLURAL, namespace, self.target.server) from None
        finally:
            watch.stop()

    # What the run's namespace holds about it
    def events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        answer = self._call(
            "list",
            "events",
            namespace,
            lambda: self.core.list_namespaced_event(namespace, field_selector=selector),
        )
        return [self.client.sanitize_for_serialization(e) for e in answer.items]

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        answer = self._call(
            "list",
            "pods",
            namespace,
            lambda: self.core.list_namespaced_pod(namespace, label_selector=selector),
        )
        return [self.client.sanitize_for_serialization(p) for p in answer.items]

    def pod_log(self, namespace: str, pod: str, container: str, follow: bool) -> Iterator[str]:
        """The container's log as the kubelet serves it through the API server, line by line."""
        response = self._call(
            "get",
            "pods/log",
            namespace,
            lambda: self.core.read_namespaced_pod_log(
                pod, namespace, container=container, follow=follow, _preload_content=False
            ),
        )
        try:
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            response.release_conn()

    def secret(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's keys, decoded."""
        secret = self._call(
            "get", "secrets", namespace, lambda: self.core.read_namespaced_secret(name, namespace)
        )
        data = secret.data or {}
        return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}

    def whoami(self) -> str:
        """The user's name as the API server authenticated it (SelfSubjectReview)."""
        api = kubernetes.client.AuthenticationV1Api(self.client)
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        try:
            review = api.create_self_subject_review(body)
        except (ApiException, urllib3.exceptions.HTTPError, OSError):
            return "unknown"  # an API server without the review API still lets the user act
        info = review.status.user_info if review.status else None
        return (info.username if info else None) or "unknown"
