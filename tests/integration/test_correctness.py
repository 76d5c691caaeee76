"""Refusals only the emulator can inject (a real API server would need a broken RBAC or a
webhook that denies): each is a defect a user would hit on a real cluster, with the real
messages. The rest of the correctness suite runs on the real control plane
(tests/e2e/test_correctness.py)."""

from __future__ import annotations

from typing import Any

from tests.integration.conftest import FINAL, Platform

RBAC_403 = (
    'jobs.batch is forbidden: User "system:serviceaccount:kubetune:kubetune" cannot create '
    'resource "jobs" in API group "batch" in the namespace "{ns}"'
)


def _condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def test_the_operators_rbac_is_not_the_users_fault(platform: Platform, ns: str) -> None:
    """Defect 4: a 403 from RBAC is retried and shown as ReconcileError, never as InvalidSpec."""
    # Twice: the first retry comes at once, queued by the watch event of the ConfigMap the same
    # reconcile created (as in any informer-driven controller); the second 403 backs off.
    fault = platform.cluster.inject("create", "jobs", 403, times=2, message=RBAC_403.format(ns=ns))
    platform.apply(platform.job(ns, "blocked"))

    def error_shown() -> dict[str, Any] | None:
        condition = _condition(platform.status(ns, "blocked"), "ReconcileError")
        return condition if condition.get("status") == "True" else None

    shown = platform.wait_for("ReconcileError", error_shown, 30)
    assert shown["reason"] == "OperatorForbidden" and "RBAC" in shown["message"]
    assert platform.status(ns, "blocked")["phase"] == "Pending"
    status = platform.wait_phase(ns, "blocked", FINAL, timeout=120)  # retried with backoff
    assert status["phase"] == "Succeeded", status
    assert fault.remaining == 0
    assert _condition(status, "ReconcileError")["status"] == "False"
    assert "Failed" not in platform.phases_written(ns, "blocked")
    errors = platform.operator_metric("kubetune_operator_reconcile_errors_total")
    assert errors[(("reason", "OperatorForbidden"),)] >= 1


def test_an_admission_webhooks_denial_is_the_users_to_fix(platform: Platform, ns: str) -> None:
    message = 'admission webhook "gpu-policy.example.com" denied the request: no H100 for team-x'
    platform.cluster.inject("create", "jobs", 400, message=message)
    platform.apply(platform.job(ns, "denied"))
    status = platform.wait_phase(ns, "denied", "Failed", timeout=30)
    failed = _condition(status, "Failed")
    assert failed["reason"] == "AdmissionDenied" and "no H100 for team-x" in failed["message"]
    platform.assert_no_more_writes(ns, "denied")
