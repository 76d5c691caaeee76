"""The real control plane (tests/support/control_plane.py): etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built from their Go modules, started once per session
on 127.0.0.1, with kubetune's CRDs applied by kubectl. Every test here is marked `cluster`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import control_plane
from tests.support.control_plane import ControlPlane
from tests.support.tools import helm
from tests.support.tools import kubectl as kubectl_binary

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "crds").glob("*.yaml"))

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    started = control_plane.start(tmp_path_factory.mktemp("control-plane"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def kubectl(plane: ControlPlane) -> Kubectl:
    """kubectl as the cluster's admin; stdin_json: a document to pipe in (`-f -`)."""
    binary = str(kubectl_binary())

    def run(*args: str, stdin_json: Any = None, check: bool = False, user: Path | None = None):
        config = user or plane.admin
        return subprocess.run(
            [binary, f"--kubeconfig={config}", *args],
            input=None if stdin_json is None else json.dumps(stdin_json),
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    return run


RELEASE, SYSTEM = "kubetune", "kubetune-system"


@pytest.fixture(scope="session")
def crds(plane: ControlPlane, kubectl: Kubectl) -> None:
    """The chart installed as a platform team installs it (`helm install`, CRDs included)."""
    done = subprocess.run(
        [str(helm()), "install", RELEASE, str(ROOT / "helm" / "kubetune"),
         f"--kubeconfig={plane.admin}", "--namespace", SYSTEM, "--create-namespace", "--wait=false"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    names = [f"crd/{p.name.removeprefix('kubetune.dev_').removesuffix('.yaml')}.kubetune.dev"
             for p in CRDS]  # fmt: skip
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *names, check=True)


@pytest.fixture(scope="session")
def namespace(kubectl: Kubectl, crds: None) -> str:
    """The namespace of the validation table's manifests (valid_job's)."""
    kubectl("create", "namespace", "ml")
    return "ml"


@dataclass
class Operator:
    """`kubetune operator` as a process of this machine, as the chart deploys it: the
    Deployment's settings as the API server stores them, and the chart's ServiceAccount's
    identity (a token from the TokenRequest API), so the chart's RBAC is the real one."""

    process: subprocess.Popen[bytes]
    log: Path
    kubeconfig: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _chart_env(kubectl: Kubectl) -> tuple[dict[str, str], str]:
    deployment = json.loads(
        kubectl("get", "deployment", RELEASE, "-n", SYSTEM, "-o", "json", check=True).stdout
    )
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env, pod["serviceAccountName"]


@pytest.fixture(scope="session")
def operator(
    plane: ControlPlane, kubectl: Kubectl, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    env, account = _chart_env(kubectl)
    workdir = tmp_path_factory.mktemp("operator")
    config = plane.kubeconfig_for(workdir / "kubeconfig", SYSTEM, account)
    env.update(
        KUBECONFIG=str(config),
        POD_NAMESPACE=SYSTEM,
        KUBETUNE_HEALTH_PORT="0",
        KUBETUNE_METRICS_PORT=str(control_plane.free_port()),
        KUBETUNE_BIND_ADDRESS="127.0.0.1",
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
    log = workdir / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "kubetune"), "operator"],
            env={**base, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield Operator(process, log, config)
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
