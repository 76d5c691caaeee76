"""The operator against the real API server, scheduler, Job controller and garbage collector,
through the official Python client as the cluster's admin: admission by the real CRD schema and
CEL rules, the real Job and Service APIs accepting what the operator builds (queued runs: their
Jobs stay suspended, no pod starts), real garbage collection, and a trainer pod that cannot read
its data failing its run. The operator runs as the chart installs it (conftest.py), with at most
2 GPUs per job.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import GROUP, PLURAL, VERSION
from tests.e2e.conftest import wait_for
from tests.support.control_plane import ControlPlane
from tests.support.platform import Platform


class Cluster:
    def __init__(self, kubeconfig: Path) -> None:
        import kubernetes

        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(client)
        self.batch = kubernetes.client.BatchV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)
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
        return wait_for(what, check, timeout)

    def wait_phase(self, namespace: str, name: str, *phases: str, timeout: float = 180) -> dict:
        def check() -> dict | None:
            status = (self.get(namespace, name) or {}).get("status") or {}
            return status if status.get("phase") in phases else None

        return self.wait_for(f"{name} in {phases}", check, timeout)


@pytest.fixture
def cluster(plane: ControlPlane, platform: Platform) -> Cluster:
    """The admin's client, with the operator and the node running (platform)."""
    return Cluster(plane.admin)


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


def test_the_crd_rejects_an_invalid_spec_at_admission(cluster: Cluster, namespace: str) -> None:
    doc = job("typo", method={"type": "lorra"})
    with pytest.raises(cluster.ApiException) as caught:
        cluster.apply(namespace, doc)
    assert caught.value.status == 422
    assert "spec.method.type" in caught.value.body


def test_queued_job_is_created_suspended_and_owned(cluster: Cluster, namespace: str) -> None:
    created = cluster.apply(namespace, job("queued", queueName="team-a"))
    status = cluster.wait_phase(namespace, "queued", "Queued")
    assert status["observedGeneration"] == 1
    (batch_job,) = cluster.jobs(namespace, "queued")
    assert batch_job.spec.suspend is True
    assert batch_job.metadata.labels["kueue.x-k8s.io/queue-name"] == "team-a"
    (owner,) = batch_job.metadata.owner_references
    assert owner.uid == created["metadata"]["uid"] and owner.controller
    pod = batch_job.spec.template.spec
    assert pod.automount_service_account_token is False
    assert pod.security_context.run_as_non_root is True
    assert pod.containers[0].security_context.read_only_root_filesystem is True
    assert len(cluster.configmaps(namespace, "queued")) == 1


def test_a_run_of_two_pods_is_an_indexed_job_with_a_headless_service(
    cluster: Cluster, namespace: str
) -> None:
    """The real Job API accepts the Indexed Job (queued: it stays suspended, no pod starts) and
    the real Service API the headless Service its pods meet through."""
    cluster.apply(namespace, job("pair", queueName="team-a", resources={"nodes": 2, "gpus": 0}))
    cluster.wait_phase(namespace, "pair", "Queued")
    (batch_job,) = cluster.jobs(namespace, "pair")
    assert (batch_job.spec.completion_mode, batch_job.spec.completions) == ("Indexed", 2)
    assert batch_job.spec.parallelism == 2 and batch_job.spec.suspend is True
    (service,) = cluster.wait_for("the Service", lambda: cluster.services(namespace, "pair"))
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert batch_job.spec.template.spec.subdomain == service.metadata.name


def test_a_failing_trainer_pod_fails_the_run(cluster: Cluster, namespace: str) -> None:
    cluster.apply(namespace, job("broken"))
    status = cluster.wait_phase(namespace, "broken", "Failed", timeout=300)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] in ("BackoffLimitExceeded", "TrainerFailed", "DataError"), failed
    assert status["attempts"] >= 1 and status["completionTime"]
    assert "Warning" in {e.type for e in cluster.events(namespace, "broken")}


def test_policy_violation_creates_nothing(cluster: Cluster, namespace: str) -> None:
    cluster.apply(namespace, job("greedy", resources={"gpus": 4}))
    status = cluster.wait_phase(namespace, "greedy", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PolicyViolation" and "spec.resources.gpus" in failed["message"]
    assert cluster.jobs(namespace, "greedy") == []


def test_spec_change_replaces_the_job(cluster: Cluster, namespace: str) -> None:
    cluster.apply(namespace, job("gitops", queueName="team-a"))
    first = cluster.wait_phase(namespace, "gitops", "Queued")["runId"]
    cluster.patch_spec(namespace, "gitops", {"hyperparameters": {"maxSteps": 20}})

    def replaced() -> bool:
        names = [j.metadata.name for j in cluster.jobs(namespace, "gitops")]
        status = (cluster.get(namespace, "gitops") or {}).get("status") or {}
        return status.get("runId") not in (None, first) and names == [f"gitops-{status['runId']}"]

    cluster.wait_for("the new run's Job to replace the old one", replaced)


def test_deleting_the_finetunejob_removes_its_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply(namespace, job("doomed", queueName="team-a"))
    cluster.wait_phase(namespace, "doomed", "Queued")
    cluster.delete(namespace, "doomed")
    cluster.wait_for(
        "the garbage collector",
        lambda: (
            not cluster.jobs(namespace, "doomed") and not cluster.configmaps(namespace, "doomed")
        ),
    )


def _profile(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneProfile",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_profiles_are_admitted_by_the_real_cel_and_shape_the_run(
    cluster: Cluster, namespace: str
) -> None:
    """The real API server's CEL (its quantity library included) refuses a profile whose
    default exceeds its limit; a queued job under a valid profile gets its defaults and
    ServiceAccount, and a job over its limit is refused naming the field and the profile."""
    pool = f"{namespace}-pool"
    with pytest.raises(cluster.ApiException) as caught:
        cluster.custom.create_cluster_custom_object(
            "kubetune.dev", "v1alpha1", "finetuneprofiles",
            _profile(f"{pool}-bad", resources={"memory": "9Gi"}, limits={"memory": "8Gi"}),
        )  # fmt: skip
    assert caught.value.status == 422 and "resources.memory (a default)" in caught.value.body
    cluster.core.create_namespaced_service_account(namespace, {"metadata": {"name": "tuner"}})
    cluster.custom.create_cluster_custom_object(
        "kubetune.dev", "v1alpha1", "finetuneprofiles",
        _profile(pool, resources={"gpus": 0, "memory": "2Gi"}, limits={"gpus": 1},
                 serviceAccountName="tuner", queueName="team-a"),
    )  # fmt: skip
    try:
        cluster.apply(namespace, job("under", profile=pool, resources={}))
        cluster.wait_phase(namespace, "under", "Queued")
        (batch_job,) = cluster.jobs(namespace, "under")
        pod = batch_job.spec.template.spec
        assert pod.service_account_name == "tuner" and pod.automount_service_account_token
        assert pod.containers[0].resources.requests == {"memory": "2Gi"}
        cluster.apply(namespace, job("over", profile=pool, resources={"gpus": 2}))
        failed = cluster.wait_phase(namespace, "over", "Failed")
        assert f"more than FineTuneProfile '{pool}' allows" in failed["message"]
    finally:
        cluster.custom.delete_cluster_custom_object(
            "kubetune.dev", "v1alpha1", "finetuneprofiles", pool
        )


def test_a_schedule_stamps_a_queued_run_the_real_api_accepts(
    cluster: Cluster, namespace: str
) -> None:
    """The real API server serves FineTuneSchedule (schema, status subresource), accepts the
    FineTuneJob the operator stamps from its template (queued: no pod starts), and the real
    garbage collector deletes it with the schedule."""
    from datetime import UTC, datetime, timedelta

    from croniter import croniter

    from kubetune.api import GROUP, SCHEDULE_PLURAL, VERSION

    weekly = "0 3 * * 1"
    schedule = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSchedule",
        "metadata": {"name": "weekly"},
        "spec": {
            "schedule": weekly,
            "jobTemplate": {"spec": job("template", queueName="team-a")["spec"]},
        },
    }
    args = (GROUP, VERSION, namespace, SCHEDULE_PLURAL)
    cluster.custom.create_namespaced_custom_object(*args, schedule)

    def status() -> dict:
        obj = cluster.custom.get_namespaced_custom_object(*args, "weekly")
        return obj.get("status") or {}

    cluster.wait_for("the next time", lambda: status().get("nextScheduleTime"))
    due = croniter(weekly, datetime.now(UTC)).get_prev(datetime)
    before = (due - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cluster.custom.patch_namespaced_custom_object_status(
        *args, "weekly", {"status": {"lastScheduleTime": before}}
    )
    name = f"weekly-{int(due.timestamp()) // 60}"
    cluster.wait_phase(namespace, name, "Queued")
    cluster.custom.delete_namespaced_custom_object(*args, "weekly")
    cluster.wait_for("the stamped run to go", lambda: cluster.get(namespace, name) is None)
