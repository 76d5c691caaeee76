"""The platform the end-to-end tests drive (tests/e2e/conftest.py starts it): the real
operator (`kubetune operator`, a process of this machine, restartable), the node agent that runs
each trainer pod's command as a local process on the tiny model (tests/support/node.py), a real
S3 server (SeaweedFS) with the dataset and the artifacts, on the real control plane. Each test
uses its own namespace."""

from __future__ import annotations

import base64
import collections
import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer import storage
from tests.support import control_plane, s3
from tests.support.client import Client
from tests.support.control_plane import ControlPlane
from tests.support.node import NodeAgent
from tests.support.prometheus import free_port
from tests.support.specs import override
from tests.support.tools import helm

SECRET = "s3-credentials"
ALLOWED_IMAGE = "registry.example.com/ml/trainer:custom"
MAX_GPUS = 2
POLL_SECONDS = 0.5
FINAL = ("Succeeded", "Failed")


class OperatorProcess:
    """`kubetune operator` as a process of this machine, with `settings` (the chart's env: see
    chart_operator), or, given `container`, a function from the operator's environment to a
    command line, inside its image (tests/images)."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        container: Callable[[dict[str, str]], list[str]] | None = None,
        *,
        settings: dict[str, str],
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.container = container
        self.base = dict(settings)
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_env: dict[str, str] = {}
        self.metrics_port = free_port()
        self.account = ""  # the user the API server knows it as (tests/e2e)

    def settings(self) -> dict[str, str]:
        """What the chart sets, with this machine's kubeconfig and ports."""
        return {
            **self.base,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_BIND_ADDRESS": "127.0.0.1",
            **self.extra_env,
        }

    def replica(self, log: Path) -> OperatorProcess:
        """Another process with the same settings and identity (a second replica)."""
        other = OperatorProcess(self.kubeconfig, log, self.container, settings=self.base)
        other.account = self.account
        return other

    def start(self) -> OperatorProcess:
        if self.container is not None:
            argv, env = self.container(self.settings()), None
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
            env.update(self.settings())
            argv = [str(Path(sys.executable).parent / "kubetune"), "operator"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a node dies under the operator."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


RELEASE, SYSTEM = "kubetune", "kubetune-system"
CHART = Path(__file__).resolve().parents[2] / "helm" / "kubetune"


def install_chart(plane: ControlPlane, values: Sequence[str] = ()) -> None:
    """The chart installed as a platform team installs it (`helm install`, CRDs included), and
    its CRDs Established."""
    done = subprocess.run(
        [str(helm()), "install", RELEASE, str(CHART), f"--kubeconfig={plane.admin}",
         "--namespace", SYSTEM, "--create-namespace", "--wait=hookOnly", *values],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    names = [f"{p.name.removeprefix('kubetune.dev_').removesuffix('.yaml')}.kubetune.dev"
             for p in sorted((CHART.parents[1] / "crds").glob("*.yaml"))]  # fmt: skip
    deadline = time.monotonic() + 60
    for name in names:
        while True:
            crd = plane.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established"
            time.sleep(0.2)


@contextmanager
def installed(
    workdir: Path, values: Sequence[str] = (), namespaces: Sequence[str] = (), api_qps: int = 0
) -> Iterator[ControlPlane]:
    """A control plane of its own, with these namespaces and the chart installed with these
    values (for an operator set up unlike the session's: watching some namespaces only, from its
    image, at scale); stopped and removed at the end."""
    plane = control_plane.start(workdir / "plane", api_qps=api_qps)
    try:
        for namespace in namespaces:
            plane.request("POST", "/api/v1/namespaces", {"metadata": {"name": namespace}})
        install_chart(plane, values)
        yield plane
    finally:
        control_plane.remove(plane)


def chart_operator(plane: ControlPlane, workdir: Path) -> OperatorProcess:
    """The operator as the chart's Deployment would run it: its container's env as the API
    server stores the Deployment (no Deployment controller runs here: the caller starts the
    process) and the pod's ServiceAccount identity (a token from the TokenRequest API)."""
    deployment = plane.request("GET", f"/apis/apps/v1/namespaces/{SYSTEM}/deployments/{RELEASE}")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    account = pod["serviceAccountName"]
    config = plane.kubeconfig_for(workdir / "kubeconfig", SYSTEM, account)
    process = OperatorProcess(
        config, workdir / "operator.log", settings={**env, "POD_NAMESPACE": SYSTEM}
    )
    process.account = f"system:serviceaccount:{SYSTEM}:{account}"
    return process


@dataclass
class Platform:
    """The operator, the node running trainer pods, S3 and the tiny model, on the real control
    plane (`operator_user`: the operator's ServiceAccount, whose requests the API server's audit
    log counts)."""

    api: Client
    kubelet: NodeAgent
    operator: OperatorProcess
    s3: s3.S3Server
    model: Path
    dataset: str
    plane: ControlPlane
    operator_user: str
    namespaces: set[str] = field(default_factory=set)

    def job(self, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
        """A FineTuneJob on the tiny model and the toy task; `a__b=v` sets spec.a.b."""
        doc: dict[str, Any] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "model": {"uri": self.model.as_uri()},
                "dataset": {"uri": self.dataset, "testSplit": 0.1, "validationSplit": 0.05},
                "method": {"type": "lora"},
                "hyperparameters": {"maxSteps": 30, "batchSize": 16, "learningRate": 5e-3},
                "evaluation": {"metrics": ["loss", "exactMatch"], "maxNewTokens": 4},
                "gates": [],
                "output": {"uri": f"s3://models/{namespace}/{name}", "credentialsSecret": SECRET},
            },
        }
        override(doc["spec"], **spec)
        return doc

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """The Namespace object (a real cluster has one for every namespace in use), with
        `labels` added when it exists already."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        if labels:
            body["metadata"]["labels"] = labels
        try:
            self.api.create("namespaces", "", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
            if labels:
                self.api.patch("namespaces", "", name, {"metadata": {"labels": labels}})

    def profile(self, name: str, **spec: Any) -> dict[str, Any]:
        """A FineTuneProfile (cluster-scoped); `a__b=v` sets spec.a.b."""
        body: dict[str, Any] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneProfile",
            "metadata": {"name": name},
            "spec": {},
        }
        override(body["spec"], **spec)
        return self.api.create("finetuneprofiles", "", body)

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create a FineTuneJob (or FineTuneSchedule), with its namespace and S3 Secret."""
        namespace = doc["metadata"]["namespace"]
        self.ensure_namespace(namespace)
        plural = "finetuneschedules" if doc["kind"] == "FineTuneSchedule" else "finetunejobs"
        return self.api.create(plural, namespace, doc)

    def ensure_namespace(self, namespace: str) -> None:
        """The namespace and its S3 Secret, once."""
        if namespace not in self.namespaces:
            self.namespace(namespace)
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": namespace},
                "data": {
                    k: base64.b64encode(v.encode()).decode() for k, v in self.s3.env().items()
                },
            }
            self.api.create("secrets", namespace, secret)
            self.namespaces.add(namespace)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.api.get("finetunejobs", namespace, name)

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self.get(namespace, name)
        assert obj is not None, f"{namespace}/{name} is gone"
        return obj.get("status") or {}

    def wait_for(
        self,
        what: str,
        check: Callable[[], Any],
        timeout: float = 120.0,
        interval: float = 0.1,
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            assert self.operator.alive(), f"the operator died: {self.operator_log()}"
            assert not self.kubelet.errors, self.kubelet.errors[0]
            time.sleep(interval)
        raise AssertionError(f"timed out waiting for {what}\n{self.operator_log()}")

    def wait_phase(
        self, namespace: str, name: str, phases: str | tuple[str, ...], timeout: float = 120.0
    ) -> dict[str, Any]:
        wanted = (phases,) if isinstance(phases, str) else phases

        def check() -> dict[str, Any] | None:
            status = self.status(namespace, name)
            return status if status.get("phase") in wanted else None

        return self.wait_for(f"{namespace}/{name} phase in {wanted}", check, timeout)

    def children(self, namespace: str, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        items = self.api.list(kind, namespace)
        if name is None:
            return items
        return [
            i
            for i in items
            if (i["metadata"].get("labels") or {}).get("kubetune.dev/finetunejob") == name
        ]

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The object's Events in the order they were posted. Lists come sorted by name, as
        etcd's keys are: they are sorted by firstTimestamp (which a repeat, counted on the same
        Event, keeps), then by resourceVersion (etcd's revision, an integer) within a second."""
        events = [
            e for e in self.api.list("events", namespace) if e["involvedObject"]["name"] == name
        ]
        return sorted(
            events, key=lambda e: (e["firstTimestamp"], int(e["metadata"]["resourceVersion"]))
        )

    def _operator_audit(self) -> list[dict[str, Any]]:
        user = self.operator_user
        return [e for e in self.plane.audit() if (e.get("user") or {}).get("username") == user]

    def operator_counts(self) -> collections.Counter[tuple[str, str]]:
        """How many requests the operator made, by (verb, resource): get, list, watch, create,
        patch, delete... From the API server's audit log."""
        return collections.Counter(
            (verb, resource.split("/")[0]) for verb, resource, _, _ in self.operator_requests()
        )

    def operator_requests(self) -> list[tuple[str, str, str, str]]:
        """(verb, resource[/subresource], namespace, name) of each request the operator made,
        in order, from the real API server's audit log: a request at its ResponseComplete
        stage, a watch when it started (ResponseStarted)."""
        out = []
        for event in self._operator_audit():
            stage = "ResponseStarted" if event["verb"] == "watch" else "ResponseComplete"
            if event.get("stage") != stage:
                continue
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "") + (
                f"/{ref['subresource']}" if ref.get("subresource") else ""
            )
            out.append((event["verb"], resource, ref.get("namespace", ""), ref.get("name", "")))
        return out

    def phases_written(self, namespace: str, name: str) -> list[str]:
        """Every phase the operator wrote to this FineTuneJob, in order: the status patches'
        bodies in the API server's audit log (tests/support/control_plane.py)."""
        bodies = [
            event.get("requestObject") or {}
            for event in self._operator_audit()
            if event["verb"] == "patch"
            and (event.get("objectRef") or {}).get("resource") == "finetunejobs"
            and (event["objectRef"].get("namespace"), event["objectRef"].get("name"))
            == (namespace, name)
        ]
        return [b["status"]["phase"] for b in bodies if "phase" in (b.get("status") or {})]

    def writes(self, namespace: str, name: str) -> int:
        """The operator's writes about one FineTuneJob: to it, its children and its Events."""
        return sum(
            1
            for verb, resource, ns, obj in self.operator_requests()
            if verb in ("create", "update", "patch", "delete")
            and ns == namespace
            and (
                (resource.split("/")[0] == "finetunejobs" and obj == name)
                or (resource in ("jobs", "configmaps", "services") and obj.startswith(f"{name}-"))
                or (resource == "events" and obj.startswith(f"{name}."))
            )
        )

    def assert_no_more_writes(self, namespace: str, name: str) -> None:
        """No retry loop: once the verdict's own writes (status, Event) have
        landed, the operator writes nothing more about this object over several poll
        intervals."""
        settled = self.writes(namespace, name)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(1)
            if self.writes(namespace, name) == settled:
                break
            settled = self.writes(namespace, name)
        time.sleep(6 * POLL_SECONDS)
        assert self.writes(namespace, name) == settled

    def job_creates(self, namespace: str, name: str) -> int:
        """How many times the operator created a batch Job for this FineTuneJob."""
        return sum(
            1
            for verb, resource, ns, obj in self.operator_requests()
            if (verb, resource, ns) == ("create", "jobs", namespace) and obj.startswith(f"{name}-")
        )

    def operator_metric(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """One metric from the operator's endpoint, as Prometheus would scrape it."""
        url = f"http://127.0.0.1:{self.operator.metrics_port}/metrics"
        text = urlopen(url, timeout=5).read().decode()
        return {
            tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        }

    def operator_log(self, tail: int = 4000) -> str:
        return self.operator.log.read_text(errors="replace")[-tail:]

    def checkpoints(self, namespace: str, name: str, run_id: str) -> list[str]:
        prefix = f"s3://models/{namespace}/{name}/runs/{run_id}/checkpoints"
        return [k for k in storage.list_keys(prefix) if k.endswith("COMPLETE")]
