"""Failures on the real control plane, each a defect a user would hit on a real cluster: the
operator's RBAC losing a rule (a real 403 from the RBAC authorizer), an admission policy denying
the run's Job (a real ValidatingAdmissionPolicy), API errors on the operator's writes and lists
(500, 503, 409: injected by a proxy in front of the real API server, tests/support/faults.py,
the one thing no real control plane gives on demand), and a watch gap from an API server
restart while another API server of the same etcd took changes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Kubectl
from tests.support.control_plane import ControlPlane
from tests.support.faults import FaultProxy
from tests.support.platform import FINAL, SYSTEM, OperatorProcess, Platform


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


@pytest.fixture(scope="module")
def proxy(plane: ControlPlane) -> Iterator[FaultProxy]:
    started = FaultProxy(plane.url, plane.ca_file).start()
    yield started
    started.stop()


@pytest.fixture
def proxied(
    platform: Platform, plane: ControlPlane, proxy: FaultProxy, tmp_path: Path
) -> Iterator[FaultProxy]:
    """For one test, the operator reaches the API server through the proxy: the shared one
    stops (releasing the Lease) and one with the same settings and identity takes its place."""
    shared = platform.operator
    shared.stop()
    account = shared.account.rsplit(":", 1)[1]
    config = proxy.kubeconfig(tmp_path / "kubeconfig", plane.token(SYSTEM, account), SYSTEM)
    replica = OperatorProcess(config, tmp_path / "operator.log", settings=shared.base)
    replica.account = shared.account
    platform.operator = replica.start()
    try:
        yield proxy
    finally:
        replica.stop()
        platform.operator = shared
        shared.start()


def test_api_errors_on_create_are_retried(platform: Platform, proxied: FaultProxy, ns: str) -> None:
    faults = [
        proxied.inject("create", "configmaps", 409),
        proxied.inject("create", "jobs", 500, times=2),
        proxied.inject("patch", "finetunejobs/status", 503),
    ]
    creates = proxied.counts[("create", "jobs")]
    platform.apply(platform.job(ns, "flaky"))
    status = platform.wait_phase(ns, "flaky", FINAL, timeout=120)
    assert status["phase"] == "Succeeded", status
    assert [f.remaining for f in faults] == [0, 0, 0]
    assert len(platform.children(ns, "jobs", "flaky")) == 1
    assert len(platform.children(ns, "configmaps", "flaky")) == 1
    # Two answered 500, the third created it (and the API server saw that one only).
    assert proxied.counts[("create", "jobs")] - creates == 3
    assert platform.job_creates(ns, "flaky") == 1
    # ...and the operator counted them (its metrics endpoint, as Prometheus would scrape it).
    errors = platform.operator_metric("kubetune_operator_api_errors_total")
    assert errors[(("code", "500"), ("operation", "create"))] >= 2
    assert errors[(("code", "409"), ("operation", "create"))] >= 1


def test_a_watch_gap_after_an_api_server_restart_is_repaired_by_listing_again(
    platform: Platform, plane: ControlPlane, proxied: FaultProxy, ns: str
) -> None:
    """The operator's API server stops; meanwhile a second one (an HA control plane: both on
    the same etcd) takes a deletion and a creation the operator does not see. When the first
    comes back its watch cache starts at etcd's current revision: the operator's watches,
    resumed from their last resourceVersion, get 410 Gone, and it must list again, which is
    refused twice (503) before it works."""
    platform.apply(platform.job(ns, "deleted-unseen", resources={"gpus": 4}))  # refused: Failed
    platform.wait_phase(ns, "deleted-unseen", "Failed", timeout=30)

    def failed_here() -> float:
        gauge = platform.operator_metric("kubetune_operator_finetunejobs")
        return gauge.get((("namespace", ns), ("phase", "Failed")), 0.0)

    platform.wait_for("the gauge to count it", lambda: failed_here() == 1.0, 10)
    lists_before = platform.operator_counts()[("list", "finetunejobs")]
    other = plane.client(plane.second_apiserver())
    plane.stop_apiserver()
    try:
        refusals = [
            proxied.inject("list", plural, 503, times=2) for plural in ("finetunejobs", "jobs")
        ]
        other.delete("finetunejobs", ns, "deleted-unseen")
        other.create("finetunejobs", ns, platform.job(ns, "created-unseen"))
        time.sleep(2)
    finally:
        plane.start_apiserver()
    status = platform.wait_phase(ns, "created-unseen", FINAL, timeout=180)
    assert status["phase"] == "Succeeded", status
    assert [f.remaining for f in refusals] == [0, 0]
    assert platform.operator_counts()[("list", "finetunejobs")] > lists_before
    # The relist noticed the deletion it never saw as an event: the gauge forgot it.
    platform.wait_for("the gauge to forget it", lambda: failed_here() == 0.0, 10)
    assert platform.job_creates(ns, "created-unseen") == 1


def _clusterrole(kubectl: Kubectl) -> dict[str, Any]:
    done = kubectl("get", "clusterrole", "kubetune", "-o", "json", check=True)
    return json.loads(done.stdout)


def test_the_operators_rbac_is_not_the_users_fault(
    platform: Platform, kubectl: Kubectl, ns: str
) -> None:
    """Defect 4: a 403 from RBAC (the chart's ClusterRole lost `create` on Jobs, as after a
    botched upgrade) is retried and shown as ReconcileError, never as InvalidSpec; once the
    rule is back, the run goes on."""
    role = _clusterrole(kubectl)
    broken = json.loads(json.dumps(role))
    (batch,) = [r for r in broken["rules"] if r.get("apiGroups") == ["batch"]]
    batch["verbs"] = [v for v in batch["verbs"] if v != "create"]
    kubectl("replace", "-f", "-", stdin_json=broken, check=True)
    try:
        platform.apply(platform.job(ns, "blocked"))

        def error_shown() -> dict[str, Any] | None:
            condition = _condition(platform.status(ns, "blocked"), "ReconcileError")
            return condition if condition.get("status") == "True" else None

        shown = platform.wait_for("ReconcileError", error_shown, 30)
        assert shown["reason"] == "OperatorForbidden" and "RBAC" in shown["message"]
        assert platform.status(ns, "blocked")["phase"] == "Pending"
    finally:
        restored = _clusterrole(kubectl)
        restored["rules"] = role["rules"]
        kubectl("replace", "-f", "-", stdin_json=restored, check=True)
    status = platform.wait_phase(ns, "blocked", FINAL, timeout=180)  # retried with backoff
    assert status["phase"] == "Succeeded", status
    assert _condition(status, "ReconcileError")["status"] == "False"
    assert "Failed" not in platform.phases_written(ns, "blocked")
    errors = platform.operator_metric("kubetune_operator_reconcile_errors_total")
    assert errors[(("reason", "OperatorForbidden"),)] >= 1


def test_an_admission_policys_denial_is_the_users_to_fix(
    platform: Platform, kubectl: Kubectl, ns: str
) -> None:
    """A platform's admission policy (a real ValidatingAdmissionPolicy) refuses the run's Job:
    the run fails as AdmissionDenied with the policy's message, and is not retried."""
    name = f"no-h100-{ns}"[:63]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["batch"],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["jobs"],
                    }
                ]
            },
            "validations": [{"expression": "false", "message": "no H100 for team-x"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}
            },
        },
    }
    kubectl("apply", "-f", "-", stdin_json=policy, check=True)
    kubectl("apply", "-f", "-", stdin_json=binding, check=True)
    try:
        probe = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "probe"},
                 "spec": {"template": {"spec": {"restartPolicy": "Never",
                          "containers": [{"name": "c", "image": "x"}]}}}}  # fmt: skip
        platform.wait_for(  # the policy is in force once the API server has compiled it
            "the policy to deny",
            lambda: (
                "no H100"
                in kubectl(
                    "create", "-n", ns, "--dry-run=server", "-f", "-", stdin_json=probe
                ).stderr
            ),
            30,
        )
        platform.apply(platform.job(ns, "denied"))
        status = platform.wait_phase(ns, "denied", "Failed", timeout=30)
        failed = _condition(status, "Failed")
        assert failed["reason"] == "AdmissionDenied" and "no H100 for team-x" in failed["message"]
        assert name in failed["message"]  # the API server names the policy
        platform.assert_no_more_writes(ns, "denied")
    finally:
        kubectl("delete", "validatingadmissionpolicybinding", name)
        kubectl("delete", "validatingadmissionpolicy", name)
