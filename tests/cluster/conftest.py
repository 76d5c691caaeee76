"""The real control plane (tests/support/control_plane.py): etcd, kube-apiserver,
kube-controller-manager and kube-scheduler built from their Go modules, started once per session
on 127.0.0.1, with kubetune's CRDs applied by kubectl. Every test here is marked `cluster`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import control_plane
from tests.support.control_plane import ControlPlane
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


@pytest.fixture(scope="session")
def crds(kubectl: Kubectl) -> None:
    for path in CRDS:
        kubectl("apply", "--server-side", "-f", str(path), check=True)
    names = [f"crd/{p.name.removeprefix('kubetune.dev_').removesuffix('.yaml')}.kubetune.dev"
             for p in CRDS]  # fmt: skip
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *names, check=True)


@pytest.fixture(scope="session")
def namespace(kubectl: Kubectl, crds: None) -> str:
    """The namespace of the validation table's manifests (valid_job's)."""
    kubectl("create", "namespace", "ml")
    return "ml"
