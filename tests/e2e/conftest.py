"""Real-cluster suite (opt-in: `pytest -m e2e`): the current kubeconfig's cluster (kind, k3d)
with the chart installed (the CRD and the operator), as .github/workflows/e2e.yaml does on a
hosted runner with k3d. It cannot run on the development machines (no Docker engine there)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubetune.api import GROUP, PLURAL, VERSION


class Cluster:
    def __init__(self) -> None:
        import kubernetes

        kubernetes.config.load_kube_config()
        self.core = kubernetes.client.CoreV1Api()
        self.batch = kubernetes.client.BatchV1Api()
        self.custom = kubernetes.client.CustomObjectsApi()
        self.ApiException = kubernetes.client.ApiException

    def apply(self, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def jobs(self, namespace: str, name: str) -> list[Any]:
        selector = f"kubetune.dev/finetunejob={name}"
        return self.batch.list_namespaced_job(namespace, label_selector=selector).items

    def configmaps(self, namespace: str, name: str) -> list[Any]:
        selector = f"kubetune.dev/finetunejob={name}"
        return self.core.list_namespaced_config_map(namespace, label_selector=selector).items

    def services(self, namespace: str, name: str) -> list[Any]:
        selector = f"kubetune.dev/finetunejob={name}"
        return self.core.list_namespaced_service(namespace, label_selector=selector).items

    def events(self, namespace: str, name: str) -> list[Any]:
        return [
            e
            for e in self.core.list_namespaced_event(namespace).items
            if e.involved_object.name == name and e.involved_object.kind == "FineTuneJob"
        ]

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 180) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}")

    def wait_phase(self, namespace: str, name: str, *phases: str, timeout: float = 180) -> dict:
        def check() -> dict | None:
            status = (self.get(namespace, name) or {}).get("status") or {}
            return status if status.get("phase") in phases else None

        return self.wait_for(f"{name} in {phases}", check, timeout)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    return Cluster()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    yield name
    cluster.core.delete_namespace(name)


def job(name: str, **spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": "s3://data/e2e/train.jsonl"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 10},
            "output": {"uri": "s3://models/e2e"},
            "backoffLimit": 0,
        },
    }
    doc["spec"].update(spec)
    return doc
