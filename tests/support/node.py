"""The node agent: the kubelet of the real control plane's Node (tests/support/control_plane.py),
a client of the real API server with the node's identity (system:node:NAME, so the Node
authorizer decides what it may read: only the Secrets and ConfigMaps of the pods bound to it).

The real scheduler binds pods to the Node and the real Job controller creates them; this agent
does what a kubelet does with a pod bound to it (pkg/kubelet, cited where it matters):
- it lists and watches the pods whose spec.nodeName is its node (the kubelet's pod source);
- before a container starts it waits, as the kubelet does, for the pod's ConfigMap volumes
  (ContainerCreating: "MountVolume.SetUp failed ... not found" is retried), for the Secrets its
  env names (CreateContainerConfigError `secret "NAME" not found`, `couldn't find key KEY in
  Secret NS/NAME`, kubelet_pods.go makeEnvironmentVariables) and for its image (an image under
  an `unpullable` prefix waits in ErrImagePull and ImagePullBackOff, alternating);
- it runs the container's command as a process of this machine (the stand-in for a container
  runtime: there is none here) with the pod's env (env, envFrom with its prefix, secretKeyRef,
  the downward API's fieldRef), its volumes (configMap and secret files, emptyDirs), and its
  own pod IP: an address of 127.0.0.0/8 (every one of them is this machine's loopback), so two
  pods can listen on the same containerPort as they would in a cluster;
- it posts the pod's status as the kubelet's status manager does: Running with podIP, startTime,
  the Ready conditions and the container's running state; then Succeeded or Failed with the
  container's terminated state, its exit code (128+signal for a signal), reason (Completed,
  Error, OOMKilled) and termination message: the terminationMessagePath file (at most 4096
  bytes), or with FallbackToLogsOnError and a failure, the log's last 80 lines and 2048 bytes
  (kubernetes.io/docs/tasks/debug/debug-application/determine-reason-pod-failure);
- a pod marked for deletion gets SIGTERM, then SIGKILL after its grace period; the kubelet then
  moves it to a terminal phase and deletes it with grace period 0 (status_manager.go
  canBeDeleted / syncPod), which the Job controller's finalizer holds until it has counted it;
- status is written with a strategic merge patch (conditions merge by type), so a condition the
  API server added meanwhile (DisruptionTarget from the Eviction API) stays.

What no process of this machine can give is said plainly:
- paths: there is no mount namespace, so a mountPath (and the terminationMessagePath) is mapped
  to a directory of the pod under the agent's workdir, in the command, the env values and the
  JSON files of its configMap volumes (the trainer's config names container paths);
- DNS: a name `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` in an env value becomes
  the IP of the live pod with that hostname and subdomain once the headless Service exists, as
  cluster DNS answers for a Service's pods;
- ports other than `metrics` (a distributed run's rendezvous, which torch binds on every
  address) get one free port per Job, and an env var `*_PORT` whose value is that containerPort
  gets the mapped one, as a hostPort would;
- logs: it serves the kubelet's `/containerLogs/{namespace}/{pod}/{container}` (pkg/kubelet/
  server/server.go getContainerLogs: follow, tailLines, limitBytes) over TLS on 127.0.0.1 and
  posts that port as the Node's daemonEndpoints.kubeletEndpoint, so `pods/log` on the API server
  reaches it as it reaches a kubelet. The API server has no --kubelet-certificate-authority
  here, so it does not verify the certificate (pkg/kubelet/client/kubelet_client.go:
  transportConfig, Insecure without a CA); unlike a kubelet, the agent does not check the API
  server's client certificate either (it answers on 127.0.0.1 only);
- `fake_seconds`: no process at all; each container "trains" that long and ends with a valid
  TrainerResult (the scale benchmark's fast fake trainer).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.client import TEST_AGENT, Client

TERMINATION_LIMIT = 4096  # bytes of a termination message file the kubelet reads
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048  # FallbackToLogsOnError's tail
STRATEGIC = "application/strategic-merge-patch+json"
TRANSIENT = (429, 500, 502, 503, 504)  # answers a kubelet retries: overload, etcd timeouts
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "ContainersReady", "Ready")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def graph_lag(code: int, message: str) -> bool:
    """The Node authorizer's answer while its graph does not yet link this node to the object
    (a pod just bound, its ConfigMap or Secret not yet an edge of the graph): 403 "no
    relationship found between node '<node>' and this object" (plugin/pkg/auth/authorizer/node/
    node_authorizer.go). A kubelet's volume manager retries MountVolume.SetUp until it passes."""
    return code == 403 and "no relationship found between node" in message


def _body(exc: urllib.error.HTTPError) -> str:
    """The API server's Status message of an error answer, for the record."""
    try:
        return str(json.loads(exc.read() or b"{}").get("message", ""))[:500]
    except (OSError, ValueError):
        return ""


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotYet(Exception):
    """The container cannot start yet: the kubelet's waiting reason and message."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


# -- a container as a process ------------------------------------------------------------------


def secret_key(api: Client, namespace: str, ref: dict[str, Any]) -> str:
    """A Secret's key for `valueFrom.secretKeyRef`, or NotYet with the kubelet's message."""
    secret = api.get("secrets", namespace, ref["name"])
    if secret is None:
        raise NotYet("CreateContainerConfigError", f'secret "{ref["name"]}" not found')
    data = secret.get("data") or {}
    if ref["key"] not in data:
        message = f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
        raise NotYet("CreateContainerConfigError", message)
    return base64.b64decode(data[ref["key"]]).decode()


def field_ref(pod: dict[str, Any], source: dict[str, Any]) -> str:
    """The downward API (`valueFrom.fieldRef`): metadata.name, namespace, uid, labels['k'] and
    annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP."""
    path = (source.get("fieldRef") or {}).get("fieldPath", "")
    meta = pod.get("metadata") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName"),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName"),
        "status.podIP": (pod.get("status") or {}).get("podIP"),
        "status.hostIP": (pod.get("status") or {}).get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    for kind in ("annotations", "labels"):
        prefix = f"metadata.{kind}['"
        if path.startswith(prefix) and path.endswith("']"):
            return str((meta.get(kind) or {}).get(path[len(prefix) : -2], ""))
    raise NotYet("CreateContainerConfigError", f"unsupported fieldRef {path!r}")


def check_env_sources(api: Client, namespace: str, container: dict[str, Any]) -> None:
    """NotYet while a Secret the env names (envFrom, secretKeyRef) is missing."""
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef")
        if ref and not ref.get("optional") and api.get("secrets", namespace, ref["name"]) is None:
            raise NotYet("CreateContainerConfigError", f'secret "{ref["name"]}" not found')
    for item in container.get("env") or []:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref and not ref.get("optional"):
            secret_key(api, namespace, ref)


def mount_volumes(
    api: Client, pod: dict[str, Any], container: dict[str, Any], directory: Path
) -> dict[str, Path]:
    """The container's volumes as directories of `directory`: mountPath -> local directory.
    ConfigMap and Secret volumes get a file per key; emptyDirs are empty."""
    namespace = pod["metadata"]["namespace"]
    volumes = {v["name"]: v for v in (pod["spec"].get("volumes") or [])}
    local: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        target = directory / "volumes" / mount["name"]
        target.mkdir(parents=True, exist_ok=True)
        source = volume.get("configMap") or volume.get("secret")
        if source is not None:
            plural = "configmaps" if "configMap" in volume else "secrets"
            name = source.get("name") or source["secretName"]
            obj = api.get(plural, namespace, name)
            if obj is None:
                raise NotYet(
                    "ContainerCreating",
                    f'MountVolume.SetUp failed for volume "{mount["name"]}" : '
                    f'{plural[:-1]} "{name}" not found',
                )
            for key, value in (obj.get("data") or {}).items():  # a Secret's are base64
                data = value.encode() if plural == "configmaps" else base64.b64decode(value)
                (target / key).write_bytes(data)
        elif "projected" in volume:
            _project(api, pod, volume["projected"], target)
        elif "emptyDir" not in volume:
            raise NotYet("ContainerCreating", f"the test node cannot mount {sorted(volume)}")
        local[mount["mountPath"]] = target
    return local


def _project(api: Client, pod: dict[str, Any], projected: dict[str, Any], target: Path) -> None:
    """A projected volume (the ServiceAccount admission plugin's kube-api-access-*): a bound
    token from the TokenRequest API (the kubelet asks for one bound to the pod), ConfigMap
    keys (kube-root-ca.crt) and downward API fields."""
    meta = pod["metadata"]
    for source in projected.get("sources") or []:
        if "serviceAccountToken" in source:
            request = source["serviceAccountToken"]
            account = pod["spec"].get("serviceAccountName") or "default"
            body = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [request["audience"]] if request.get("audience") else None,
                    "expirationSeconds": request.get("expirationSeconds", 3607),
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            }
            path = api.path("serviceaccounts", meta["namespace"], account) + "/token"
            token = api.request("POST", path, body)["status"]["token"]
            (target / request["path"]).write_text(token)
        elif "configMap" in source:
            name = source["configMap"]["name"]
            cm = api.get("configmaps", meta["namespace"], name)
            if cm is None:
                raise NotYet("ContainerCreating", f'configmap "{name}" not found')
            data = cm.get("data") or {}
            for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                (target / item["path"]).write_text(data[item["key"]])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items") or []:
                (target / item["path"]).write_text(field_ref(pod, item))
        else:
            raise NotYet("ContainerCreating", f"the test node cannot project {sorted(source)}")


class Paths:
    """Container paths -> this machine's: the mounts, then the termination message file."""

    def __init__(self, mounts: dict[str, Path], termination: tuple[str, Path]) -> None:
        self.mounts = sorted(mounts.items(), key=lambda m: -len(m[0]))
        self.termination = termination

    def __call__(self, value: str) -> str:
        if value == self.termination[0]:
            return str(self.termination[1])
        for mount_path, directory in self.mounts:
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(directory) + value[len(mount_path) :]
        return value

    def rewrite_json_files(self) -> None:
        """Every JSON file of the mounted volumes, with its container paths mapped."""

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                return self(value)
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        for _, directory in self.mounts:
            for path in directory.glob("*.json"):
                with suppress(ValueError, UnicodeDecodeError):
                    path.write_text(json.dumps(walk(json.loads(path.read_text()))))


def container_env(
    api: Client,
    pod: dict[str, Any],
    container: dict[str, Any],
    paths: Paths,
    network: Any = lambda name, value: value,
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, each key with its
    prefix, then env in order (a later entry wins)."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef")
        if ref:
            secret = api.get("secrets", namespace, ref["name"]) or {}
            prefix = source.get("prefix") or ""
            for key, value in (secret.get("data") or {}).items():
                env[prefix + key] = base64.b64decode(value).decode()
    for item in container.get("env") or []:
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source:
            try:
                env[item["name"]] = secret_key(api, namespace, source["secretKeyRef"])
            except NotYet:
                if not source["secretKeyRef"].get("optional"):
                    raise  # an optional one that is missing leaves the variable unset
        elif "fieldRef" in source:
            env[item["name"]] = field_ref(pod, source)
        elif source:
            raise NotYet("CreateContainerConfigError", f"unsupported env source {sorted(source)}")
        else:
            env[item["name"]] = network(item["name"], paths(item.get("value", "")))
    return env


def termination_message(
    container: dict[str, Any], message_file: Path | None, log: Path | None, exit_code: int
) -> str:
    """What the kubelet puts in the terminated state's message."""
    if message_file is not None and message_file.exists():
        text = message_file.read_bytes()[-TERMINATION_LIMIT:].decode(errors="replace")
        if text:  # the kubelet reads at most the file's last 4096 bytes
            return text
    policy = container.get("terminationMessagePolicy") or "File"
    if policy == "FallbackToLogsOnError" and exit_code != 0 and log is not None and log.exists():
        lines = log.read_bytes().rstrip(b"\n").split(b"\n")[-LOG_FALLBACK_LINES:]
        return b"\n".join(lines)[-LOG_FALLBACK_BYTES:].decode(errors="replace")
    return ""


def local_command(container: dict[str, Any], paths: Paths) -> list[str]:
    """The container's command and args, with `python` this interpreter (the image's Python is
    the one the project's environment has)."""
    command = [paths(part) for part in [*container["command"], *(container.get("args") or [])]]
    if command[0] == "python":
        command[0] = sys.executable
    return command


# -- the agent --------------------------------------------------------------------------------


@dataclass
class PodRun:
    """One pod on this node, by uid."""

    uid: str
    name: str
    namespace: str
    directory: Path
    ip: str
    pod: dict[str, Any] = field(default_factory=dict)  # as last seen
    process: subprocess.Popen[bytes] | None = None
    waiting: str = ""  # the waiting reason last posted
    started_at: str = ""
    started: float = 0.0
    log: Path | None = None
    message_file: Path | None = None
    waiting_since: float = 0.0
    killed_reason: str = ""  # "OOMKilled" after kill()
    terminating_since: float | None = None
    finished: bool = False  # the terminal status is posted
    deleted: bool = False  # the final delete is done
    unposted: dict[str, Any] | None = None  # a status to write again

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NodeAgent:
    def __init__(
        self,
        api: Client,
        workdir: Path,
        node: str = "test-node",
        env: dict[str, str] | None = None,
        unpullable: tuple[str, ...] = ("unreachable.example.com/",),
        interval: float = 0.2,
        fake_seconds: float | None = None,
        ip_prefix: tuple[int, int] = (127, 1),
        parallel: int = 1,
        fake_hooks: tuple[Callable[[PodRun], None], Callable[[PodRun], None]] | None = None,
    ) -> None:
        self.api = api
        self.workdir = workdir
        self.node = node
        self.env = env or {}
        self.unpullable = unpullable
        self.interval = interval
        self.fake_seconds = fake_seconds
        self.ip_prefix = ip_prefix
        # parallel > 1: each pass syncs the pods in that many threads (without the node's lock:
        # for fake containers, which kill() and freeze() do not reach); fake_hooks: called
        # when a fake container starts and when it ends (the scale benchmark's metrics servers).
        self.parallel = parallel
        self.fake_hooks = fake_hooks
        self._pool = ThreadPoolExecutor(parallel) if parallel > 1 else None
        self.pods: dict[str, PodRun] = {}
        self.ports: dict[tuple[str, str, int], int] = {}  # (ns, job, containerPort) -> port
        self.errors: list[str] = []
        # 429 and 5xx answers, retried on the next pass as the kubelet's status manager retries
        # them: not the agent's fault, but counted so that a run can say how many it met.
        self.transient: list[str] = []
        self._seen: dict[str, dict[str, Any]] = {}  # uid -> pod, from the watch
        self._listed = threading.Event()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._ips = 0
        self._log_server: ThreadingHTTPServer | None = None
        self._threads = [
            threading.Thread(target=self._watch, name="node-watch", daemon=True),
            threading.Thread(target=self._loop, name="node-sync", daemon=True),
        ]

    # -- control

    def start(self) -> NodeAgent:
        for thread in self._threads:
            thread.start()
        self._serve_logs()
        self._listed.wait(30)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._log_server is not None:
            self._log_server.shutdown()
            self._log_server.server_close()
        self._threads[1].join(10)  # the watch ends with its connection (a daemon thread)
        if self._pool is not None:
            self._pool.shutdown()
        with self._lock:
            for run in self.pods.values():
                self._signal(run, signal.SIGKILL)

    def running_pods(self) -> list[PodRun]:
        with self._lock:
            return [run for run in self.pods.values() if run.running]

    def kill(self, pod_name: str) -> None:
        """SIGKILL a pod's process, as the kernel's OOM killer does to a container over its
        memory limit: exit code 137, reason OOMKilled (counts against backoffLimit)."""
        with self._lock:
            run = next((r for r in self.pods.values() if r.name == pod_name and r.running), None)
            if run is None:
                raise KeyError(pod_name)
            run.killed_reason = "OOMKilled"
            self._signal(run, signal.SIGKILL)

    def freeze(self, pod_name: str, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT) a pod's process: alive, answering nothing."""
        with self._lock:
            run = next((r for r in self.pods.values() if r.name == pod_name and r.running), None)
            if run is None:
                raise KeyError(pod_name)
            self._signal(run, signal.SIGSTOP if frozen else signal.SIGCONT)

    def log(self, namespace: str, pod_name: str) -> str:
        path = self.workdir / namespace / pod_name / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the kubelet's log endpoint, which the API server's pods/log proxies to

    def _serve_logs(self) -> None:
        from tests.support.oidc import tls_files

        _, cert, key = tls_files(self.workdir / "kubelet-tls")
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                agent._container_log(self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name="node-logs", daemon=True).start()
        self._log_server = server
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": server.server_address[1]}},
        }
        self.api.request(
            "PATCH", f"/api/v1/nodes/{self.node}/status", {"status": status},
            "application/merge-patch+json",
        )  # fmt: skip

    def _container_log(self, request: BaseHTTPRequestHandler) -> None:
        """GET /containerLogs/NS/POD/CONTAINER: the container's output as the kubelet serves
        it; with follow, until the container has ended. 404 for a pod this node never ran."""
        url = urllib.parse.urlsplit(request.path)
        parts = url.path.strip("/").split("/")
        query = urllib.parse.parse_qs(url.query)
        if len(parts) != 4 or parts[0] != "containerLogs":
            request.send_error(404)
            return
        _, namespace, pod, container = parts
        with self._lock:
            run = next(
                (r for r in self.pods.values() if r.namespace == namespace and r.name == pod), None
            )
        path = self.workdir / namespace / pod / "container.log"
        if run is None or not path.exists():
            body = f'container "{container}" in pod "{pod}" is waiting to start'.encode()
            request.send_response(400 if run is not None else 404)
            request.send_header("Content-Type", "text/plain")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
            return
        data = path.read_bytes()
        tail = query.get("tailLines")
        if tail:
            data = b"".join(data.splitlines(keepends=True)[-int(tail[0]) :])
        limit = int(query.get("limitBytes", ["0"])[0]) or None
        request.send_response(200)
        request.send_header("Content-Type", "text/plain")
        request.end_headers()  # no Content-Length: the body ends when the connection does
        sent = 0
        offset = path.stat().st_size
        try:
            chunk = data[:limit] if limit else data
            request.wfile.write(chunk)
            sent += len(chunk)
            while query.get("follow") == ["true"] and not self._stop.is_set():
                if limit and sent >= limit:
                    break
                ended = not run.running
                with path.open("rb") as log:
                    log.seek(offset)
                    more = log.read()
                offset += len(more)
                if more:
                    request.wfile.write(more[: limit - sent] if limit else more)
                    request.wfile.flush()
                    sent += len(more)
                elif ended:
                    break
                else:
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the API server (its client) went away

    # -- the pod source: list, then watch from the list's resourceVersion

    def _watch(self) -> None:
        path = f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.node}"
        while not self._stop.is_set():
            try:
                listing = self.api.request("GET", path)
                with self._lock:
                    self._seen = {p["metadata"]["uid"]: p for p in listing["items"]}
                self._listed.set()
                since = listing["metadata"]["resourceVersion"]
                url = f"{self.api.url}{path}&watch=true&resourceVersion={since}"
                url += "&allowWatchBookmarks=true&timeoutSeconds=300"
                request = urllib.request.Request(url, headers={"User-Agent": TEST_AGENT})
                with urllib.request.urlopen(request, timeout=330, context=self.api.context) as w:
                    for line in w:
                        if self._stop.is_set():
                            return
                        event = json.loads(line) if line.strip() else {}
                        if event.get("type") == "ERROR":
                            break  # 410 Gone: list again
                        pod = event.get("object") or {}
                        uid = (pod.get("metadata") or {}).get("uid")
                        if event.get("type") == "BOOKMARK" or not uid:
                            continue
                        with self._lock:
                            if event["type"] == "DELETED":
                                self._seen.pop(uid, None)
                            else:
                                self._seen[uid] = pod
            except Exception:  # the API server restarting, or going away at the end
                self._stop.wait(0.5)

    # -- the sync loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:  # keep the node alive; the tests assert on errors
                self.errors.append(traceback.format_exc())
            self._stop.wait(self.interval)

    def _sync(self) -> None:
        with self._lock:
            seen = dict(self._seen)
            for uid, run in list(self.pods.items()):
                if uid not in seen:  # deleted on the server: its containers go too
                    self._signal(run, signal.SIGKILL)
                    del self.pods[uid]
            todo = []
            for uid, pod in seen.items():
                run = self.pods.get(uid)
                if run is None:
                    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                        continue  # finished before this agent started
                    run = self.pods[uid] = self._admit(pod)
                run.pod = pod
                todo.append(run)
            if self._pool is None:
                for run in todo:
                    self._sync_one(run)
                return
        chunks = [todo[i :: self.parallel] for i in range(self.parallel)]
        list(self._pool.map(lambda chunk: [self._sync_one(run) for run in chunk], chunks))

    def _sync_one(self, run: PodRun) -> None:
        try:
            self._sync_pod(run)
        except urllib.error.HTTPError as exc:
            body = _body(exc)
            if exc.code in TRANSIENT or graph_lag(exc.code, body):  # next pass, as a kubelet
                self.transient.append(f"pod {run.namespace}/{run.name}: {exc}: {body}")
            elif exc.code not in (404, 409):  # gone or changed meanwhile: next pass
                self.errors.append(f"pod {run.namespace}/{run.name}: {exc}: {body}")
        except (OSError, urllib.error.URLError):
            pass  # the API server is away: the next pass tries again
        except Exception:  # one bad pod does not stall the others
            self.errors.append(traceback.format_exc())

    def _admit(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        self._ips += 1
        a, b = self.ip_prefix
        ip = f"{a}.{b}.{self._ips // 250}.{self._ips % 250 + 1}"
        directory = self.workdir / meta["namespace"] / meta["name"]
        directory.mkdir(parents=True, exist_ok=True)
        return PodRun(meta["uid"], meta["name"], meta["namespace"], directory, ip)

    def _sync_pod(self, run: PodRun) -> None:
        pod = run.pod
        if run.unposted is not None:  # a status write that did not reach the API server
            self._post(run, run.unposted)
        if run.finished:
            if pod["metadata"].get("deletionTimestamp"):
                self._delete(run)
            return
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(run)
            return
        if run.process is None and not run.started:
            self._try_to_start(run)
            return
        code = self._exit_code(run)
        if code is not None:
            self._finish(run, code)

    def _try_to_start(self, run: PodRun) -> None:
        pod = run.pod
        (container,) = pod["spec"]["containers"]
        try:
            if container.get("image", "").startswith(self.unpullable):
                reason = "ImagePullBackOff" if run.waiting == "ErrImagePull" else "ErrImagePull"
                raise NotYet(reason, f'Back-off pulling image "{container["image"]}"')
            mounts = mount_volumes(self.api, pod, container, run.directory)
            check_env_sources(self.api, run.namespace, container)
            run.message_file = run.directory / "termination-log"
            terminated_at = container.get("terminationMessagePath") or "/dev/termination-log"
            paths = Paths(mounts, (terminated_at, run.message_file))
            env = container_env(
                self.api, pod, container, paths, lambda n, v: self._network(run, n, v)
            )
        except NotYet as waiting:
            # Posted when the reason changes; an image pull's back-off alternates every 2 s.
            pulling = waiting.reason.startswith(("ErrImage", "ImagePull"))
            if waiting.reason != run.waiting and (
                not pulling or time.monotonic() - run.waiting_since >= 2
            ):
                run.waiting, run.waiting_since = waiting.reason, time.monotonic()
                self._post(run, self._waiting_status(container, waiting))
            return
        run.started, run.started_at = time.monotonic(), now()
        if self.fake_hooks is not None and self.fake_seconds is not None:
            self.fake_hooks[0](run)
        if self.fake_seconds is None:
            paths.rewrite_json_files()
            base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
            env = {**base, **self.env, **env, "KUBETUNE_METRICS_ADDR": run.ip}
            run.log = run.directory / "container.log"
            with run.log.open("ab") as out:
                run.process = subprocess.Popen(
                    local_command(container, paths),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=run.directory,
                )
        state = {"running": {"startedAt": run.started_at}}
        self._post(run, self._status(container, "Running", state, ready=True))

    def _exit_code(self, run: PodRun) -> int | None:
        if run.process is not None:
            code = run.process.poll()
            return None if code is None else (128 - code if code < 0 else code)
        if run.killed_reason:
            return 137
        if self.fake_seconds is not None and time.monotonic() - run.started >= self.fake_seconds:
            return 0
        return None

    def _terminate(self, run: PodRun) -> None:
        """A pod marked for deletion: SIGTERM, SIGKILL after the grace period, then the
        terminal status, then the final delete."""
        if run.running:
            if run.terminating_since is None:
                run.terminating_since = time.monotonic()
                self._signal(run, signal.SIGTERM)
            grace = run.pod["metadata"].get("deletionGracePeriodSeconds") or 0
            if time.monotonic() - run.terminating_since >= grace:
                self._signal(run, signal.SIGKILL)
            return
        if run.started:
            code = self._exit_code(run)
            self._finish(run, 137 if code is None else code)
        else:  # it never ran
            message = "The container could not be located when the pod was terminated"
            self._finish(run, 137, "ContainerStatusUnknown", message)
        self._delete(run)

    def _finish(self, run: PodRun, code: int, reason: str = "", message: str = "") -> None:
        (container,) = run.pod["spec"]["containers"]
        if self.fake_seconds is not None and code == 0:
            message = json.dumps(self._fake_result(run))
        elif not message:
            message = termination_message(container, run.message_file, run.log, code)
        reason = reason or ("Completed" if code == 0 else (run.killed_reason or "Error"))
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": run.started_at or None,
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        phase = "Succeeded" if code == 0 else "Failed"
        status = self._status(container, phase, {"terminated": terminated}, ready=False)
        if self.fake_hooks is not None and self.fake_seconds is not None:
            self.fake_hooks[1](run)
        self._post(run, status)
        run.finished = True

    def _delete(self, run: PodRun) -> None:
        if run.deleted:
            return
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": run.uid}}
        path = self.api.path("pods", run.namespace, run.name)
        try:
            self.api.request("DELETE", path, body)
        except urllib.error.HTTPError as exc:
            if exc.code not in (404, 409):
                raise
        run.deleted = True

    # -- status

    def _conditions(self, ready: bool, started: bool) -> list[dict[str, Any]]:
        def condition(kind: str, true: bool) -> dict[str, Any]:
            return {
                "type": kind,
                "status": "True" if true else "False",
                "lastTransitionTime": now(),
            }

        return [
            condition("PodReadyToStartContainers", started),
            condition("Initialized", True),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ]

    def _status(
        self, container: dict[str, Any], phase: str, state: dict[str, Any], ready: bool
    ) -> dict[str, Any]:
        return {
            "phase": phase,
            "conditions": self._conditions(ready, started=True),
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }

    def _waiting_status(self, container: dict[str, Any], waiting: NotYet) -> dict[str, Any]:
        state = {"waiting": {"reason": waiting.reason, "message": waiting.message}}
        status = self._status(container, "Pending", state, ready=False)
        status["conditions"] = self._conditions(ready=False, started=False)
        return status

    def _post(self, run: PodRun, status: dict[str, Any]) -> None:
        """Write the pod's status (a strategic merge patch of pods/status, as the kubelet's
        status manager). A pod deleted on the server meanwhile is not an error: the status
        manager drops the update."""
        if run.started_at:
            status.update(
                podIP=run.ip,
                podIPs=[{"ip": run.ip}],
                hostIP="127.0.0.1",
                hostIPs=[{"ip": "127.0.0.1"}],
                startTime=run.started_at,
            )
        path = self.api.path("pods", run.namespace, run.name) + "/status"
        run.unposted = status  # until the API server has it (the status manager retries)
        self.api.request("PATCH", path, {"status": status}, STRATEGIC)
        run.unposted = None

    # -- what a process of this machine stands in for

    def _signal(self, run: PodRun, sig: int) -> None:
        """SIGTERM to the container's first process only, as a container runtime sends it to
        PID 1 (which must pass it on); SIGKILL, SIGSTOP and SIGCONT to all its processes, as
        the runtime's cgroup kill and freezer reach them."""
        if run.process is not None and run.process.poll() is None:
            with suppress(ProcessLookupError):
                if sig == signal.SIGTERM:
                    os.kill(run.process.pid, sig)
                else:
                    os.killpg(run.process.pid, sig)
            if sig == signal.SIGKILL:
                run.process.wait()

    def _network(self, run: PodRun, name: str, value: str) -> str:
        parts = value.split(".")
        if len(parts) >= 4 and parts[3] == "svc" and parts[2] == run.namespace:
            return self._resolve(run.namespace, parts[0], parts[1])
        ports = run.pod["spec"]["containers"][0].get("ports") or []
        named = {int(p["containerPort"]) for p in ports if p.get("name") != "metrics"}
        if name.endswith("_PORT") and value.isdigit() and int(value) in named:
            job = (run.pod["metadata"].get("labels") or {}).get("job-name", run.name)
            key = (run.namespace, job, int(value))
            return str(self.ports.setdefault(key, free_port()))
        return value

    def _resolve(self, namespace: str, hostname: str, subdomain: str) -> str:
        """Cluster DNS for a headless Service's pods: the live pod with that hostname."""
        if self.api.get("services", namespace, subdomain) is None:
            raise NotYet("ContainerCreating", f"service {subdomain} not found (DNS)")
        with self._lock:
            for run in self.pods.values():
                spec = run.pod.get("spec") or {}
                if (
                    run.namespace == namespace
                    and (spec.get("hostname"), spec.get("subdomain")) == (hostname, subdomain)
                    and not run.finished
                    and not run.pod["metadata"].get("deletionTimestamp")
                ):
                    return run.ip
        raise NotYet("ContainerCreating", f"{hostname}.{subdomain} does not resolve yet")

    def _fake_result(self, run: PodRun) -> dict[str, Any]:
        labels = run.pod["metadata"].get("labels") or {}
        return {
            "runId": labels.get("kubetune.dev/run-id"),
            "outcome": "Succeeded",
            "exitCode": 0,
            "message": "fake trainer: done",
            "steps": 10,
        }
