"""Tenants against the real API server, with real RBAC: a ServiceAccount with Kubernetes'
aggregated `edit` role in its namespace (which the chart extends with FineTuneJob rights), and
the operator running as the chart's ServiceAccount under the chart's RBAC. What the tenant can
and cannot write is the API server's answer, not an emulation; the escapes issue 25 found fail
here as in the unit tests (tests/controller/test_tenancy.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJob, make_run_id, spec_hash
from kubetune.api.wire import CONFIG_FILE, JOB_LABEL, RUN_LABEL
from kubetune.controller.build import PROFILE_FILE, data_hash
from tests.e2e.conftest import Kubectl, wait_for
from tests.support.control_plane import NODE, ControlPlane
from tests.support.platform import OperatorProcess

TENANT_NS = "team-a"


@pytest.fixture(scope="module")
def tenant(plane: ControlPlane, kubectl: Kubectl, crds: None, tmp_path_factory: Any) -> Path:
    """The kubeconfig of a tenant: ServiceAccount team-a/tenant bound to ClusterRole edit."""
    kubectl("create", "namespace", TENANT_NS)
    kubectl("create", "serviceaccount", "tenant", "-n", TENANT_NS, check=True)
    kubectl(
        "create", "rolebinding", "tenant-edit", "--clusterrole=edit",
        f"--serviceaccount={TENANT_NS}:tenant", "-n", TENANT_NS, check=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tenant") / "kubeconfig"
    return plane.kubeconfig_for(path, TENANT_NS, "tenant")


def _job(name: str, **spec: Any) -> dict[str, Any]:
    doc = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": TENANT_NS},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": "s3://data/team-a/train.jsonl"},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 10},
            "output": {"uri": f"s3://models/team-a/{name}"},
        },
    }
    doc["spec"].update(spec)
    return doc


def _get(kubectl: Kubectl, kind: str, name: str) -> dict[str, Any] | None:
    done = kubectl("get", kind, name, "-n", TENANT_NS, "-o", "json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def _children(kubectl: Kubectl, kind: str, job: str) -> list[dict[str, Any]]:
    done = kubectl("get", kind, "-n", TENANT_NS, "-l", f"{JOB_LABEL}={job}", "-o", "json")
    return json.loads(done.stdout)["items"] if done.returncode == 0 else []


def test_the_operator_starts_a_run_under_the_charts_rbac(
    kubectl: Kubectl, tenant: Path, operator: OperatorProcess
) -> None:
    """The tenant applies a FineTuneJob; the operator (the chart's identity) creates the
    ConfigMap and the Job; the real Job controller creates the pod, the real scheduler binds it
    to the Node, whose agent starts it (the model cannot be fetched offline: the run fails
    later, which this test does not wait for)."""
    logged = operator.log.stat().st_size  # the operator's log is the session's
    done = kubectl("apply", "-f", "-", stdin_json=_job("first-run"), user=tenant)
    assert done.returncode == 0, done.stderr
    ftj = _get(kubectl, "finetunejob", "first-run")
    assert ftj is not None
    jobs = wait_for("the run's Job", lambda: _children(kubectl, "jobs", "first-run"))
    (owner,) = jobs[0]["metadata"]["ownerReferences"]
    assert (owner["uid"], owner["controller"]) == (ftj["metadata"]["uid"], True)

    def pod() -> dict[str, Any] | None:
        pods = _children(kubectl, "pods", "first-run")
        return pods[0] if pods and pods[0]["spec"].get("nodeName") else None

    bound = wait_for("the Job controller's pod, bound by the scheduler", pod)
    assert bound["spec"]["nodeName"] == NODE
    assert bound["metadata"]["ownerReferences"][0]["uid"] == jobs[0]["metadata"]["uid"]

    def status() -> dict[str, Any] | None:
        found = (_get(kubectl, "finetunejob", "first-run") or {}).get("status") or {}
        return found if found.get("configHash") else None

    written = wait_for("the run's status", status)
    assert written["phase"] in ("Pending", "Running", "Failed") and written["runId"]
    (configmap,) = _children(kubectl, "configmaps", "first-run")
    assert written["configHash"] == data_hash(configmap)
    with operator.log.open("rb") as log:
        log.seek(logged)
        since = log.read().decode(errors="replace")
    assert "forbidden" not in since.lower(), since[-3000:]


@pytest.mark.parametrize(
    ("args", "body"),
    [
        pytest.param(
            ("patch", "finetunejob", "first-run", "--subresource=status", "--type=merge", "-p"),
            json.dumps({"status": {"configHash": "0" * 64}}),
            id="its-jobs-status",
        ),
        pytest.param(
            ("apply", "-f", "-"),
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneProfile",
                "metadata": {"name": "mine"},
                "spec": {"serviceAccountName": "cluster-admin"},
            },
            id="a-profile",
        ),
        pytest.param(
            ("apply", "-n", "kube-system", "-f", "-"),
            {**_job("elsewhere"), "metadata": {"name": "elsewhere", "namespace": "kube-system"}},
            id="a-job-in-another-namespace",
        ),
    ],
)
def test_a_tenant_cannot_write_what_the_operator_trusts(
    kubectl: Kubectl, tenant: Path, operator: OperatorProcess, args: tuple[str, ...], body: Any
) -> None:
    if isinstance(body, str):
        done = kubectl(*args, body, user=tenant)
    else:
        done = kubectl(*args, stdin_json=body, user=tenant)
    assert done.returncode != 0
    assert "forbidden" in done.stderr.lower(), done.stderr


def test_a_forged_configmap_is_replaced_before_any_pod_mounts_it(
    kubectl: Kubectl, tenant: Path, operator: OperatorProcess
) -> None:
    """The tenant queues a job (suspended in a queue: nothing is created yet), writes a
    ConfigMap with the run's name, labels, spec hash, a controller reference to the job (the
    API server lets it: no blockOwnerDeletion) and a profile of its own choosing, then lets the
    run start. The operator neither believes nor mounts it: it replaces it with its own."""
    name = "forged"
    doc = _job(name, queueName="team-a", suspend=True)
    assert kubectl("apply", "-f", "-", stdin_json=doc, user=tenant).returncode == 0
    ftj = _get(kubectl, "finetunejob", name)
    assert ftj is not None
    parsed = FineTuneJob.model_validate({k: v for k, v in ftj.items() if k != "status"})
    run_id = make_run_id(ftj["metadata"]["uid"], ftj["metadata"]["generation"])
    evil = {"serviceAccountName": "cluster-admin", "image": "evil.example.com/x:1"}
    forged = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{name}-{run_id}",
            "namespace": TENANT_NS,
            "labels": {
                "app.kubernetes.io/managed-by": "kubetune-operator",
                JOB_LABEL: name,
                RUN_LABEL: run_id,
            },
            "annotations": {"kubetune.dev/spec-hash": spec_hash(parsed)},
            "ownerReferences": [
                {
                    "apiVersion": "kubetune.dev/v1alpha1",
                    "kind": "FineTuneJob",
                    "name": name,
                    "uid": ftj["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "data": {
            CONFIG_FILE: json.dumps({"forged": True}),
            PROFILE_FILE: json.dumps({"name": "pool", "generation": 1, "spec": evil}),
        },
    }
    done = kubectl("create", "-f", "-", stdin_json=forged, user=tenant)
    assert done.returncode == 0, done.stderr  # Kubernetes lets a tenant write all of this
    done = kubectl(
        "patch", "finetunejob", name, "--type=merge", "-p", '{"spec":{"suspend":false}}',
        user=tenant,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    jobs = wait_for("the run's Job", lambda: _children(kubectl, "jobs", name))
    pod = jobs[0]["spec"]["template"]["spec"]
    assert pod.get("serviceAccountName") != "cluster-admin"
    assert "evil" not in json.dumps(pod)

    def replaced() -> dict[str, Any] | None:
        cms = _children(kubectl, "configmaps", name)
        mine = [c for c in cms if "forged" not in json.loads(c["data"][CONFIG_FILE])]
        return mine[0] if len(cms) == 1 and mine else None

    ours = wait_for("the operator's own ConfigMap, and no other", replaced)
    assert PROFILE_FILE not in ours["data"]  # no profile applies here
    assert "did not write; replacing it" in operator.log.read_text(errors="replace")
    status = wait_for(
        "the status", lambda: (_get(kubectl, "finetunejob", name) or {}).get("status") or {}
    )
    assert status.get("configHash") in (None, data_hash(ours))
