"""The end-to-end suite on a real Kubernetes control plane (marker `e2e`; in `make test`):
etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from their Go modules
(tests/support/control_plane.py), a Node whose kubelet is the node agent (tests/support/node.py,
with the node's own identity), the chart installed with `helm install` (CRDs included), and the
operator as a process of this machine with the Deployment's settings as the API server stores
them and the chart's ServiceAccount's identity (a token from the TokenRequest API), so the
chart's RBAC is the real one. The trainer runs in each pod on the tiny model; S3 is SeaweedFS.
Everything is started once per session on 127.0.0.1; each test has a namespace of its own."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import storage
from tests.support import control_plane, s3
from tests.support.control_plane import ControlPlane
from tests.support.node import NodeAgent
from tests.support.platform import (
    ALLOWED_IMAGE,
    MAX_GPUS,
    POLL_SECONDS,
    OperatorProcess,
    Platform,
    chart_operator,
    install_chart,
)
from tests.support.tools import kubectl as kubectl_binary

ROOT = Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "crds").glob("*.yaml"))
# What a platform team would set for this suite (the chart's values): the operator polls
# progress often, allows one extra image and two GPUs per job.
VALUES = (
    # The operator's own checks are what most tests here exercise; test_admission_policy.py
    # turns the chart's admission policies on (helm upgrade) and off again.
    "--set", "admissionPolicy.enabled=false",
    "--set-json", f"progressPollSeconds={POLL_SECONDS}",
    "--set", f"trainer.maxGpusPerJob={MAX_GPUS}",
    "--set-string", f"trainer.allowedImages[0]={ALLOWED_IMAGE}",
)  # fmt: skip

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    started = control_plane.start(tmp_path_factory.mktemp("control-plane"))
    yield started
    started.stop()


@pytest.fixture(scope="session")
def kubectl(plane: ControlPlane) -> Kubectl:
    """kubectl as the cluster's admin (or `user`'s kubeconfig); stdin_json: a document to pipe
    in (`-f -`)."""
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


@pytest.fixture(scope="session")
def crds(plane: ControlPlane) -> None:
    install_chart(plane, VALUES)


@pytest.fixture(scope="session")
def namespace(kubectl: Kubectl, crds: None) -> str:
    """The namespace of the validation table's manifests (valid_job's)."""
    kubectl("create", "namespace", "ml")
    return "ml"


@pytest.fixture(scope="session")
def operator(
    plane: ControlPlane, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = chart_operator(plane, tmp_path_factory.mktemp("operator"))
    yield process.start()
    process.stop()


@pytest.fixture(scope="session")
def node(plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    agent = NodeAgent(
        plane.node_client(),
        tmp_path_factory.mktemp("node"),
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    ).start()
    yield agent
    agent.stop()


@pytest.fixture(scope="session")
def platform(
    plane: ControlPlane,
    operator: OperatorProcess,
    node: NodeAgent,
    s3_server: s3.S3Server,
    tiny_model: Path,
    task_file: Path,
) -> Iterator[Platform]:
    saved = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())  # this process reads S3 too (dataset upload, asserts)
    dataset = "s3://data/reviews.jsonl"
    storage.write_bytes(dataset, task_file.read_bytes())
    try:
        yield Platform(
            plane.client(),
            node,
            operator,
            s3_server,
            tiny_model,
            dataset,
            plane=plane,
            operator_user=operator.account,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def ns(request: pytest.FixtureRequest, platform: Platform) -> str:
    """A namespace of the test's own, with the S3 Secret."""
    name = request.node.name.removeprefix("test_").replace("_", "-").replace("[", "-")
    name = "".join(c for c in name if c.isalnum() or c == "-")[:40].strip("-")
    platform.ensure_namespace(name)
    return name


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
