"""What only the emulated API server can show (conftest.py): a spec the CRD would refuse reaching
the operator through a stale CRD, and API errors injected on its writes. The rest of a run's life
runs on the real control plane (tests/e2e/test_lifecycle.py)."""

from __future__ import annotations

from urllib.error import HTTPError

import pytest

from tests.integration.conftest import FINAL, Platform


def _reasons(platform: Platform, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in platform.events(ns, name)]


def _condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_invalid_spec(platform: Platform, ns: str) -> None:
    doc = platform.job(ns, "typo", method__type="lorra")
    # The API server refuses it against the CRD's schema, naming the field...
    with pytest.raises(HTTPError) as refused:
        platform.apply(doc)
    assert refused.value.code == 422 and "spec.method.type" in refused.value.read().decode()
    # ...so only a cluster whose CRD is older than the operator lets it through to the operator.
    with platform.cluster.stale_crd():
        platform.apply(doc)
    status = platform.wait_phase(ns, "typo", "Failed", timeout=30)
    failed = _condition(status, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.method.type" in failed["message"]
    ready = _condition(status, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    warning = platform.wait_for(
        "the Warning Event",
        lambda: [e for e in platform.events(ns, "typo") if e["type"] == "Warning"],
        10,
    )
    assert len(warning) == 1 and "spec.method.type" in warning[0]["message"]
    _assert_quiet(platform, ns, "typo")


def _assert_quiet(platform: Platform, ns: str, name: str) -> None:
    """Nothing created, and no retry loop."""
    assert platform.children(ns, "configmaps", name) == []
    assert platform.children(ns, "jobs", name) == []
    platform.assert_no_more_writes(ns, name)


def test_api_errors_on_create_are_retried(platform: Platform, ns: str) -> None:
    faults = [
        platform.cluster.inject("create", "configmaps", 409),
        platform.cluster.inject("create", "jobs", 500, times=2),
        platform.cluster.inject("patch", "finetunejobs", 503),
    ]
    platform.apply(platform.job(ns, "flaky"))
    status = platform.wait_phase(ns, "flaky", FINAL, timeout=120)
    assert status["phase"] == "Succeeded", status
    assert [f.remaining for f in faults] == [0, 0, 0]
    assert len(platform.children(ns, "jobs", "flaky")) == 1
    assert len(platform.children(ns, "configmaps", "flaky")) == 1
    assert platform.job_creates(ns, "flaky") == 3  # two answered 500, the third created it
    # ...and the operator counted them (its metrics endpoint, as Prometheus would scrape it).
    errors = platform.operator_metric("kubetune_operator_api_errors_total")
    assert errors[(("code", "500"), ("operation", "create"))] >= 2
    assert errors[(("code", "409"), ("operation", "create"))] >= 1
