"""The Argo CD health check in docs/gitops.md, run by a real Lua interpreter (lupa) against the
status the operator writes for every phase; and kstatus's reading of the same statuses."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune.controller.conditions import State, conditions_for, phase_of
from tests.conftest import ROOT

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def health_check_lua(kind: str = "FineTuneJob") -> str:
    """The block docs/gitops.md gives for the kind (the FineTuneJob's first, then the
    FineTuneSchedule's)."""
    text = (ROOT / "docs" / "gitops.md").read_text()
    job, schedule = re.findall(r"```lua\n(.*?)```", text, re.S)
    return schedule if kind == "FineTuneSchedule" else job


def status_for(reason: str, message: str = "", generation: int = 3) -> dict[str, Any]:
    conditions = conditions_for(State(reason, message), [], generation, NOW)
    return {
        "phase": phase_of(conditions),
        "observedGeneration": generation,
        "runId": "0123abcd",
        "gatesSummary": "2/2 passed" if reason == "Succeeded" else None,
        "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
    }


def argocd_health(obj: dict[str, Any], kind: str = "FineTuneJob") -> dict[str, str]:
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items() if v is not None})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    check = lua.eval(f"function(obj)\n{health_check_lua(kind)}\nend")
    result = check(to_lua(obj))
    return {"status": result["status"], "message": result["message"]}


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Pending", "Progressing"),
        ("Queued", "Progressing"),
        ("Running", "Progressing"),
        ("Evaluating", "Progressing"),
        ("Succeeded", "Healthy"),
        ("Suspended", "Suspended"),
        ("InvalidSpec", "Degraded"),
        ("GatesFailed", "Degraded"),
        ("BackoffLimitExceeded", "Degraded"),
        ("DeadlineExceeded", "Degraded"),
    ],
)
def test_argocd_health_for_each_phase(reason: str, expected: str) -> None:
    obj = {"metadata": {"name": "x", "generation": 3}, "status": status_for(reason, "because")}
    health = argocd_health(obj)
    assert health["status"] == expected, health
    if expected == "Degraded":
        assert health["message"] == f"{reason}: because"


def test_argocd_health_before_the_operator_has_seen_the_spec() -> None:
    assert argocd_health({"metadata": {"generation": 1}})["status"] == "Progressing"
    stale = {"metadata": {"generation": 4}, "status": status_for("Succeeded", generation=3)}
    health = argocd_health(stale)
    assert health == {
        "status": "Progressing",
        "message": "Waiting for the operator to observe generation 4",
    }


def kstatus(obj: dict[str, Any]) -> str:
    """kstatus's generic rules for custom resources, as sigs.k8s.io/cli-utils
    pkg/kstatus/status/generic.go applies them (no Go toolchain here to run the real one):
    observedGeneration behind generation -> InProgress; Reconciling=True -> InProgress;
    Stalled=True -> Failed; Ready=False -> InProgress; otherwise Current."""
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if observed is not None and observed != obj["metadata"]["generation"]:
        return "InProgress"
    conditions = {c["type"]: c for c in status.get("conditions") or []}
    if conditions.get("Reconciling", {}).get("status") == "True":
        return "InProgress"
    if conditions.get("Stalled", {}).get("status") == "True":
        return "Failed"
    if conditions.get("Ready", {}).get("status") == "False":
        return "InProgress"
    return "Current"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Pending", "InProgress"),
        ("Running", "InProgress"),
        ("Succeeded", "Current"),
        ("GatesFailed", "Failed"),
        ("InvalidSpec", "Failed"),
    ],
)
def test_kstatus_reads_ready_and_observed_generation(reason: str, expected: str) -> None:
    obj = {"metadata": {"generation": 3}, "status": status_for(reason)}
    assert kstatus(obj) == expected
    assert kstatus({"metadata": {"generation": 4}, "status": status_for(reason)}) == "InProgress"


def test_bumping_the_dataset_in_the_gitops_example_means_a_new_run() -> None:
    import copy

    import yaml

    from kubetune.api import FineTuneJob, make_run_id
    from kubetune.controller.build import spec_hash
    from kubetune.manifests import Loader

    doc = yaml.load((ROOT / "examples" / "gitops" / "finetunejob.yaml").read_text(), Loader=Loader)
    doc["metadata"].update(uid="uid-1", generation=1)
    before = FineTuneJob.model_validate(doc)
    bumped = copy.deepcopy(doc)
    bumped["spec"]["dataset"]["uri"] = bumped["spec"]["dataset"]["uri"].replace("/v7/", "/v8/")
    bumped["metadata"]["generation"] = 2  # what the API server does on a spec change
    after = FineTuneJob.model_validate(bumped)
    assert spec_hash(after) != spec_hash(before)
    assert make_run_id("uid-1", 2) != make_run_id("uid-1", 1)
    paused = copy.deepcopy(doc)
    paused["spec"]["suspend"] = True
    assert spec_hash(FineTuneJob.model_validate(paused)) == spec_hash(before)  # same run


def test_argocd_health_of_a_schedule() -> None:
    from tests.unit.test_schedules import Cluster

    def health(cluster: Cluster) -> dict[str, str]:
        return argocd_health(cluster.schedule, "FineTuneSchedule")

    c = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * *")
    assert health(c)["status"] == "Progressing"  # no status yet
    (first,) = c.tick("2026-11-01T01:00:00")
    c.run(first)
    c.tick("2026-11-01T01:10:00")
    assert health(c) == {"status": "Healthy", "message": "Next run at 2026-11-01T02:00:00Z"}
    c.finish(first, "Succeeded", "2026-11-01T01:30:00Z", promoted=True)
    c.tick("2026-11-01T01:31:00")
    assert health(c)["message"] == f"Next run at 2026-11-01T02:00:00Z; promoted: {first}"
    (second,) = c.tick("2026-11-01T02:00:00")
    c.finish(second, "Failed", "2026-11-01T02:30:00Z")
    c.tick("2026-11-01T02:31:00")
    assert health(c) == {
        "status": "Degraded",
        "message": f"The newest finished run {second} failed",
    }
    c.schedule["spec"]["suspend"] = True
    c.schedule["metadata"]["generation"] = 2
    assert health(c)["status"] == "Progressing"  # the operator has not seen generation 2
    c.tick("2026-11-01T02:32:00")
    assert health(c)["status"] == "Suspended"

    bad = Cluster("2026-11-01T00:00:30Z", schedule="0 * * * * *")
    bad.tick("2026-11-01T01:00:00")
    verdict = health(bad)
    assert verdict["status"] == "Degraded" and verdict["message"].startswith("InvalidSpec: ")
    assert kstatus(bad.schedule) == "Failed" and kstatus(c.schedule) == "Current"
