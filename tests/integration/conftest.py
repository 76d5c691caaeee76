"""The emulated platform (tests/support/platform.py): the emulated API server (kmock +
tests/support/cluster.py) and its test node (tests/support/kubelet.py). What runs here needs what
only the emulator gives (injected faults, a stale CRD, its request log); the rest runs on the
real control plane (tests/e2e)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune_trainer import storage
from tests.support import s3
from tests.support.cluster import Client, Cluster
from tests.support.kubelet import Kubelet
from tests.support.platform import (  # noqa: F401 (the tests import them from here)
    ALLOWED_IMAGE,
    FINAL,
    POLL_SECONDS,
    OperatorProcess,
    Platform,
)


@pytest.fixture(scope="session")
def platform(
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: s3.S3Server,
    tiny_model: Path,
    task_file: Path,
) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("platform")
    saved = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())  # this process reads S3 too (dataset upload, asserts)
    dataset = "s3://data/reviews.jsonl"
    storage.write_bytes(dataset, task_file.read_bytes())
    cluster = Cluster().start()
    kubeconfig = cluster.kubeconfig(root / "kubeconfig.json")
    kubelet = Kubelet(
        cluster.url, root / "node", env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ).start()
    operator = OperatorProcess(kubeconfig, root / "operator.log").start()
    try:
        yield Platform(
            Client(cluster.url), kubelet, operator, s3_server, tiny_model, dataset, cluster
        )
    finally:
        operator.stop()
        kubelet.stop()
        cluster.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    """A namespace of the test's own."""
    return request.node.name.removeprefix("test_").replace("_", "-")[:40]
