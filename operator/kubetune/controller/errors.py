"""The ways an API call can fail, as the reconcile and the handlers see them.

Whose fault it is decides what happens:
- `Retry`: nobody's (a conflict, throttling, a 5xx, the network): try again with backoff.
  `Conflict`, a Retry: a write based on a stale cached object; refresh it and reconcile again.
- `Rejected`: the user's. The API server or an admission webhook/policy refused the object built
  from the spec (400, 422, or a 403 that is not RBAC): the run fails with AdmissionDenied.
- `Misconfigured`: the operator's or the cluster's, not the spec's (403 from RBAC, 404 of an API
  or namespace it needs, an exhausted ResourceQuota): retried with backoff, shown as the
  ReconcileError condition and counted in kubetune_operator_reconcile_errors_total.
"""

from __future__ import annotations


class Retry(Exception):
    """A transient failure (conflict, throttling, 5xx, network): the same call can succeed later."""

    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class Conflict(Retry):
    """A write's resourceVersion precondition failed (409): the object changed since the cache
    saw it. The reconcile reads it afresh from the API once and runs again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0.0)


class Rejected(Exception):
    """The API server refused an object built from the spec, for good."""


class Misconfigured(Retry):
    """The operator cannot act for a reason the user did not cause; `reason` names it."""

    def __init__(self, message: str, reason: str, delay: float = 10.0) -> None:
        super().__init__(message, delay)
        self.reason = reason


class NoCredentials(Exception):
    """Neither a pod's service account nor a kubeconfig: the operator cannot start."""
