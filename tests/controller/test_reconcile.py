"""One reconcile against an in-memory KubeIO: what it writes, and that a second pass writes
nothing. (The same code against the real API server is in tests/e2e.)"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune.api import EvalMetrics, ExitCode, FineTuneProfile, MetricsStatus, TrainerResult
from kubetune.api.wire import JOB_LABEL, RUN_LABEL
from kubetune.controller.errors import Misconfigured, Rejected, Retry
from kubetune.controller.finetunejob_controller import reconcile
from kubetune.controller.kube import classify
from kubetune.controller.patch import merge_patch
from kubetune.controller.settings import OperatorSettings
from tests.conftest import valid_job

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(trainer_image="registry.example.com/trainer:1")


class FakeKube:
    """Stores what the reconcile writes and lists it back, like a (very small) API server."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.ftj = copy.deepcopy(doc)
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, ...]] = []
        self.reject: Exception | None = None
        self.secrets: dict[str, dict[str, str]] = {}
        self.profile_objects: list[FineTuneProfile] = []
        self.unreadable: dict[str, bool] = {}
        self.labels: dict[str, str] | None = {}

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.ftj)

    def children(self, namespace: str, job_name: str) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {"jobs": [], "configmaps": [], "pods": []}
        plural = {"Job": "jobs", "ConfigMap": "configmaps", "Pod": "pods"}
        for (kind, _), obj in self.objects.items():
            if obj["metadata"]["labels"].get(JOB_LABEL) == job_name:
                out[plural[kind]].append(copy.deepcopy(obj))
        return out

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    def profiles(self) -> list[FineTuneProfile]:
        return list(self.profile_objects)

    def unreadable_profiles(self) -> dict[str, bool]:
        return dict(self.unreadable)

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        return self.labels

    def create(self, obj: dict[str, Any]) -> None:
        if self.reject and obj["kind"] == "Job":
            raise self.reject
        self.writes.append(("create", obj["kind"], obj["metadata"]["name"]))
        stored = copy.deepcopy(obj)
        stored["metadata"]["uid"] = f"uid-{obj['kind']}-{obj['metadata']['name']}"  # the API's
        self.objects[obj["kind"], obj["metadata"]["name"]] = stored

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.writes.append(("delete", kind, name))
        self.objects.pop((kind, name), None)

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        self.writes.append(("suspend", name, str(suspend)))
        self.objects["Job", name]["spec"]["suspend"] = suspend

    def patch_status(
        self, namespace: str, name: str, patch: dict[str, Any], resource_version: str | None = None
    ) -> bool:
        self.writes.append(("status", str(patch.get("phase"))))
        status = self.ftj.setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            elif isinstance(value, dict) and isinstance(status.get(key), dict):
                status[key] = {k: v for k, v in {**status[key], **value}.items() if v is not None}
            else:
                status[key] = value
        return True

    def event(self, owner: dict[str, Any], type_: str, reason: str, message: str, now: Any) -> None:
        self.writes.append(("event", type_, reason))


def ftj(**spec: Any) -> dict[str, Any]:
    doc = valid_job()
    doc["metadata"].update(uid="uid-1", generation=1)
    doc["spec"].update(spec)
    return doc


def run(kube: FakeKube, **kwargs: Any) -> list[tuple[str, ...]]:
    start = len(kube.writes)
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW, **kwargs)
    return kube.writes[start:]


def start_pod(kube: FakeKube) -> None:
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    job = kube.objects["Job", name]
    job["status"] = {"active": 1, "startTime": "2026-11-22T12:00:00Z"}
    labels = job["spec"]["template"]["metadata"]["labels"]
    kube.objects["Pod", name + "-1"] = {
        "metadata": {
            "name": name + "-1",
            "labels": labels,
            "ownerReferences": [{"kind": "Job", "uid": job["metadata"]["uid"], "controller": True}],
        },
        "spec": {
            "containers": [
                {"name": "trainer", "ports": [{"name": "metrics", "containerPort": 9555}]}
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.7",
            "containerStatuses": [
                {"name": "trainer", "state": {"running": {"startedAt": "2026-11-22T12:01:00Z"}}}
            ],
        },
    }


def test_first_pass_creates_children_and_second_pass_writes_nothing() -> None:
    kube = FakeKube(ftj())
    writes = run(kube)
    assert [w[:2] for w in writes] == [
        ("create", "ConfigMap"),
        ("create", "Job"),
        ("status", "Pending"),
        ("event", "Normal"),
    ]
    assert run(kube) == []  # level-based: the same world, nothing to do


def test_progress_comes_from_the_callers_reading_of_the_pods_port() -> None:
    kube = FakeKube(ftj())
    run(kube)
    start_pod(kube)
    assert [w[0] for w in run(kube)] == ["status", "event"]  # Running
    outcome = reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW)
    assert outcome is not None and outcome.metrics_target == ("10.0.0.7", 9555)
    assert kube.ftj["status"]["startTime"] == "2026-11-22T12:01:00Z"  # the container's start
    text = "kubetune_trainer_step 5\nkubetune_trainer_total_steps 50\n"
    writes = run(kube, metrics_text=text)
    assert writes == [("status", "None")]  # progress only: the phase is unchanged
    assert kube.ftj["status"]["progress"]["step"] == 5
    assert run(kube) == []  # without a reading the last progress stays
    assert run(kube, metrics_text=text) == []  # the same reading: nothing new to write


def test_a_nan_loss_never_reaches_the_api() -> None:
    kube = FakeKube(ftj())
    run(kube)
    start_pod(kube)
    text = "kubetune_trainer_step 7\nkubetune_trainer_train_loss NaN\nkubetune_trainer_eta_seconds +Inf\n"
    run(kube, metrics_text=text)
    progress = kube.ftj["status"]["progress"]
    assert progress["step"] == 7 and "loss" not in progress and "etaSeconds" not in progress
    json.dumps(kube.ftj["status"], allow_nan=False)  # what the API server accepts


def test_suspend_only_keeps_the_run_and_suspends_its_job() -> None:
    kube = FakeKube(ftj())
    run(kube)
    run_id = kube.ftj["status"]["runId"]
    kube.ftj["spec"]["suspend"] = True
    kube.ftj["metadata"]["generation"] = 2
    writes = run(kube)
    assert ("suspend", f"sql-lora-{run_id}", "True") in writes
    assert not [w for w in writes if w[0] in ("create", "delete")]
    assert kube.ftj["status"]["runId"] == run_id and kube.ftj["status"]["phase"] == "Suspended"


def test_a_spec_change_replaces_the_run() -> None:
    kube = FakeKube(ftj())
    run(kube)
    old = kube.ftj["status"]["runId"]
    kube.ftj["spec"]["hyperparameters"]["epochs"] = 3
    kube.ftj["metadata"]["generation"] = 2
    writes = run(kube)
    new = kube.ftj["status"]["runId"]
    assert new != old
    assert ("delete", "Job", f"sql-lora-{old}") in writes
    assert ("delete", "ConfigMap", f"sql-lora-{old}") in writes
    assert ("create", "Job", f"sql-lora-{new}") in writes
    assert {o["metadata"]["labels"][RUN_LABEL] for o in kube.objects.values()} == {new}


def test_unparseable_spec_is_invalid_and_creates_nothing() -> None:
    kube = FakeKube(ftj(method={"type": "lorra"}))
    writes = run(kube)
    assert [w[:3] for w in writes] == [("status", "Failed"), ("event", "Warning", "InvalidSpec")]
    (failed,) = [c for c in kube.ftj["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "InvalidSpec" and "spec.method.type" in failed["message"]
    assert run(kube) == []


def test_garbage_status_is_replaced_not_kept() -> None:
    doc = ftj()
    doc["status"] = {"phase": 17, "conditions": "yes", "leftover": {"x": 1}}
    kube = FakeKube(doc)
    run(kube)
    assert kube.ftj["status"]["phase"] == "Pending"
    assert "leftover" not in kube.ftj["status"]


def test_a_child_the_api_server_rejects_is_reported_not_retried() -> None:
    kube = FakeKube(ftj())
    kube.reject = classify(422, "spec.template: forbidden by policy", "create Job ml/sql-lora-x")
    writes = run(kube)
    assert ("status", "Failed") in writes
    (failed,) = [c for c in kube.ftj["status"]["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "AdmissionDenied" and "forbidden by policy" in failed["message"]


RBAC_403 = (
    'jobs.batch is forbidden: User "system:serviceaccount:kubetune:kubetune" cannot create '
    'resource "jobs" in API group "batch" in the namespace "ml"'
)


@pytest.mark.parametrize(
    ("status", "message", "kind", "reason"),
    [
        pytest.param(403, RBAC_403, Misconfigured, "OperatorForbidden", id="rbac-403"),
        pytest.param(
            404,
            "the server could not find the requested resource",
            Misconfigured,
            "ResourceMissing",
            id="missing-api-404",
        ),
        pytest.param(
            403,
            'jobs.batch "x" is forbidden: exceeded quota: gpu-jobs',
            Misconfigured,
            "QuotaExceeded",
            id="quota-403",
        ),
        pytest.param(
            403,
            'admission webhook "policy.example.com" denied the request: no GPUs on Fridays',
            Rejected,
            None,
            id="webhook-403",
        ),
        pytest.param(
            400,
            'admission webhook "policy.example.com" denied the request: bad image',
            Rejected,
            None,
            id="webhook-400",
        ),
        pytest.param(
            422,
            "ValidatingAdmissionPolicy 'gpu-cap' denied request: too many GPUs",
            Rejected,
            None,
            id="vap-422",
        ),
        pytest.param(409, "already exists", Retry, None, id="conflict-409"),
        pytest.param(503, "unavailable", Retry, None, id="unavailable-503"),
    ],
)
def test_whose_fault_a_refusal_is(
    status: int, message: str, kind: type, reason: str | None
) -> None:
    error = classify(status, message, "create Job ml/x")
    assert type(error) is kind
    assert getattr(error, "reason", None) == reason


def test_the_operators_own_misconfiguration_is_retried_and_shown_not_blamed_on_the_spec() -> None:
    kube = FakeKube(ftj())
    kube.reject = classify(403, RBAC_403, "create Job ml/sql-lora-x")
    with pytest.raises(Misconfigured):
        run(kube)
    status = kube.ftj["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending" and conditions["Failed"]["status"] == "False"
    assert conditions["ReconcileError"]["reason"] == "OperatorForbidden"
    assert "RBAC" in conditions["ReconcileError"]["message"]
    kube.reject = None  # the platform team fixed the RBAC
    run(kube)
    conditions = {c["type"]: c for c in kube.ftj["status"]["conditions"]}
    assert conditions["ReconcileError"]["status"] == "False"
    assert [k for k in kube.objects if k[0] == "Job"]


def test_a_finished_run_whose_pod_is_gone_reads_result_json() -> None:
    kube = FakeKube(ftj(output={"uri": "s3://models/sql", "credentialsSecret": "s3"}))
    kube.secrets["s3"] = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    run(kube)
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    kube.objects["Job", name]["status"] = {
        "conditions": [
            {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-22T13:00:00Z"}
        ]
    }
    reads: list[tuple[str, str, dict[str, str]]] = []
    stored = TrainerResult(
        run_id="r",
        outcome="Succeeded",
        exit_code=ExitCode.SUCCEEDED,
        message="promoted",
        metrics=MetricsStatus(tuned=EvalMetrics(exact_match=0.9)),
    )

    def read_result(uri: str, run_id: str, credentials: dict[str, str]) -> TrainerResult:
        reads.append((uri, run_id, credentials))
        return stored

    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW, read_result=read_result)
    status = kube.ftj["status"]
    assert status["phase"] == "Succeeded" and status["metrics"]["tuned"]["exactMatch"] == 0.9
    assert reads == [("s3://models/sql", status["runId"], kube.secrets["s3"])]
    del kube.objects["Job", name]  # then the TTL controller deletes the Job
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW, read_result=read_result)
    assert len(reads) == 1 and not [k for k in kube.objects if k[0] == "Job"]


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"p": {"x": 1, "y": 2}}, {"p": {"x": 1}}, {"p": {"y": None}}),
        ({"l": [1, 2]}, {"l": [2]}, {"l": [2]}),
        ({}, {"p": {"x": 1}}, {"p": {"x": 1}}),
    ],
)
def test_merge_patch(old: dict[str, Any], new: dict[str, Any], patch: dict[str, Any]) -> None:
    assert merge_patch(old, new) == patch


def _job_ended(kube: FakeKube, kind: str, reason: str) -> str:
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    kube.objects["Job", name]["status"] = {
        "conditions": [
            {
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": "the Job controller's words",
                "lastTransitionTime": "2026-11-22T12:00:00Z",
            }
        ]
    }
    return name


def _pod_reports(kube: FakeKube, name: str, result: TrainerResult) -> None:
    pod = kube.objects["Pod", name + "-1"]
    pod["status"]["phase"] = "Failed" if result.exit_code else "Succeeded"
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {
            "exitCode": int(result.exit_code),
            "message": result.model_dump_json(by_alias=True, exclude_none=True),
            "startedAt": "2026-11-22T12:01:00Z",
            "finishedAt": "2026-11-22T12:00:00Z",
        }
    }


GATES_FAILED = TrainerResult(
    run_id="r",
    outcome="GatesFailed",
    exit_code=ExitCode.GATES_FAILED,
    message="gate exactMatch >= 0.9 failed: 0.5",
    metrics=MetricsStatus(tuned=EvalMetrics(exact_match=0.5)),
)
SUCCEEDED = TrainerResult(
    run_id="r",
    outcome="Succeeded",
    exit_code=ExitCode.SUCCEEDED,
    message="promoted",
    metrics=MetricsStatus(tuned=EvalMetrics(exact_match=0.9)),
)


@pytest.mark.parametrize(
    ("kind", "reason", "result", "phase", "why"),
    [
        pytest.param(
            "FailureTarget", "PodFailurePolicy", GATES_FAILED, "Failed", "GatesFailed", id="gates"
        ),
        pytest.param("SuccessCriteriaMet", "", SUCCEEDED, "Succeeded", "Succeeded", id="success"),
    ],
)
def test_no_verdict_from_the_job_while_the_pods_report_is_on_its_way(
    kind: str, reason: str, result: TrainerResult, phase: str, why: str
) -> None:
    """Issue 25, 6b: the Job's watch said the run ended before the Pods' watch delivered the
    termination message; the run waits for it instead of ending without gates or metrics."""
    kube = FakeKube(ftj())
    run(kube)
    start_pod(kube)
    run(kube)
    name = _job_ended(kube, kind, reason)
    with pytest.raises(Retry, match="waiting for its trainer's report") as wait:
        reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW, read_result=lambda *_: None)
    assert 0 < (wait.value.delay or 0) <= 30
    assert kube.ftj["status"]["phase"] == "Running"
    _pod_reports(kube, name, result)
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW)
    status = kube.ftj["status"]
    assert (status["phase"], status["conditions"][0]["reason"]) == (phase, why)
    assert status["metrics"]["tuned"]["exactMatch"] == result.metrics.tuned.exact_match


def test_the_wait_for_a_report_is_bounded() -> None:
    kube = FakeKube(ftj())
    run(kube)
    start_pod(kube)
    run(kube)
    _job_ended(kube, "FailureTarget", "PodFailurePolicy")
    later = NOW + timedelta(seconds=31)  # the pod's update never came
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=later, read_result=lambda *_: None)
    assert kube.ftj["status"]["phase"] == "Failed"


@pytest.mark.parametrize(
    ("named", "unreadable", "waits"),
    [
        pytest.param(None, {"pool": True}, True, id="an-unreadable-default"),
        pytest.param("pool", {"pool": False}, True, id="the-named-one-unreadable"),
        pytest.param(None, {"pool": False}, False, id="an-unreadable-non-default"),
        pytest.param("other", {"pool": True}, False, id="another-one-named"),
    ],
)
def test_a_profile_the_operator_cannot_read_fails_closed(
    named: str | None, unreadable: dict[str, bool], waits: bool
) -> None:
    """Issue 25, finding 10: with requireProfile false, a default profile the operator cannot
    parse (version skew) let its namespaces run with no profile and no limits."""
    kube = FakeKube(ftj(**({"profile": named} if named else {})))
    kube.unreadable = unreadable
    if named == "other":
        kube.profile_objects = [
            FineTuneProfile.model_validate(
                {
                    "apiVersion": "kubetune.dev/v1alpha1",
                    "kind": "FineTuneProfile",
                    "metadata": {"name": "other", "generation": 1},
                    "spec": {},
                }
            )
        ]
    writes = run(kube)
    created = [w for w in writes if w[0] == "create"]
    status = kube.ftj["status"]
    if waits:
        assert created == []
        assert (status["phase"], status["conditions"][0]["reason"]) == (
            "Pending",
            "ProfileUnreadable",
        )
    else:
        assert ("create", "Job") in [w[:2] for w in created]


def test_a_secret_the_operator_may_not_read_ends_the_run_without_its_stored_result() -> None:
    """readStorageSecrets: false (or a namespace outside rbac.secretNamespaces): the 403 on the
    output's Secret ends the run on the Job's word instead of retrying it forever."""

    class Forbidden(FakeKube):
        def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
            raise Misconfigured("forbidden: secrets", "Forbidden")

    kube = Forbidden(ftj(output={"uri": "s3://models/sql", "credentialsSecret": "s3"}))
    run(kube)
    _job_ended(kube, "Complete", "")
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW)
    assert kube.ftj["status"]["phase"] == "Succeeded"
