"""A run's life on the real control plane: the real Job controller creates the trainer pods,
the real scheduler binds them, the node agent runs the real trainer on the tiny model in each,
the real garbage collector and TTL controller clean up, artifacts go to a real S3 server. The
operator has the chart's identity and settings. See conftest.py for the parts."""

from __future__ import annotations

import json
import time
from datetime import datetime
from urllib.error import HTTPError

import pytest

from kubetune.api import TrainerResult
from kubetune_trainer import storage
from tests.e2e.conftest import Kubectl
from tests.support.platform import ALLOWED_IMAGE, FINAL, Platform


def _reasons(platform: Platform, ns: str, name: str) -> list[str]:
    return [e["reason"] for e in platform.events(ns, name)]


def _reasons_ending(platform: Platform, ns: str, name: str, *last: str) -> list[str]:
    """The object's Event reasons once the last ones are `last`. The operator posts a
    verdict's Events after the status write that carries it (an Event is never posted for a
    status that did not land), so a test that saw the status may read before they arrive."""
    return platform.wait_for(
        f"Events ending {list(last)}",
        lambda: (r := _reasons(platform, ns, name))[-len(last) :] == list(last) and r,
        10,
    )


def _condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def _trainer_result(pod: dict) -> TrainerResult:
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return TrainerResult.model_validate_json(terminated["message"])


def _by_age(pods: list[dict]) -> list[dict]:
    """Oldest first (the Job controller names its pods with a random suffix)."""
    return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])


def test_happy_path(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns,
        "reviews",
        hyperparameters__maxSteps=120,
        gates=[{"metric": "exactMatch", "min": 0.5}, {"metric": "loss", "minImprovement": 0.1}],
    )
    platform.apply(doc)
    running = platform.wait_phase(ns, "reviews", ("Running", "Evaluating", *FINAL))
    assert running["phase"] != "Failed", running
    status = platform.wait_phase(ns, "reviews", FINAL)
    assert status["phase"] == "Succeeded", status

    obj = platform.get(ns, "reviews")
    run_id = status["runId"]
    assert status["observedGeneration"] == obj["metadata"]["generation"] == 1
    assert status["jobName"] == f"reviews-{run_id}"
    assert status["attempts"] == 1
    assert status["startTime"] and status["completionTime"]
    ready = _condition(status, "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True",
        "Succeeded",
        1,
    )
    assert _condition(status, "Failed")["status"] == "False"
    assert _condition(status, "Running")["status"] == "False"
    progress = status["progress"]
    assert progress["step"] > 0 and progress["totalSteps"] == 120, progress
    assert {"loss", "exactMatch"} <= set(status["metrics"]["tuned"])
    assert {"loss", "exactMatch"} <= set(status["metrics"]["base"])
    assert [g["passed"] for g in status["gates"]] == [True, True]
    assert status["gatesSummary"] == "2/2 passed"
    prefix = f"s3://models/{ns}/reviews/runs/{run_id}"
    assert status["artifacts"]["adapterUri"] == f"{prefix}/adapter/"

    # The artifacts are in S3, the manifest last, and latest.json points at this run.
    keys = set(storage.list_keys(prefix))
    assert {"manifest.json", "result.json", "adapter/adapter_config.json"} <= keys
    latest = json.loads(storage.read_bytes(f"s3://models/{ns}/reviews/latest.json"))
    assert latest["runId"] == run_id

    # Children: one ConfigMap and one Job, deterministic names, owned by the FineTuneJob.
    for kind in ("configmaps", "jobs"):
        (child,) = platform.children(ns, kind, "reviews")
        assert child["metadata"]["name"] == f"reviews-{run_id}"
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == obj["metadata"]["uid"] and owner["controller"] is True
    # latest.json names it: announced.
    reasons = _reasons_ending(platform, ns, "reviews", "Succeeded", "Promoted")
    assert reasons[0] == "Pending" and "Running" in reasons
    assert status["promotion"] == {
        "latestUri": f"s3://models/{ns}/reviews/latest.json",
        "promotedAt": latest["promotedAt"].replace("+00:00", "Z"),
    }  # no earlier run to roll back to, no webhook

    # The storage credentials reached the pod only through the Secret.
    secret_value = platform.s3.env()["AWS_SECRET_ACCESS_KEY"]
    (configmap,) = platform.children(ns, "configmaps", "reviews")
    seen = json.dumps([configmap, obj, platform.events(ns, "reviews")])
    assert secret_value not in seen and secret_value not in platform.operator_log(10**7)
    (pod,) = platform.children(ns, "pods", "reviews")
    trainer_log = platform.kubelet.workdir / ns / pod["metadata"]["name"] / "container.log"
    assert "Published" in trainer_log.read_text()
    assert secret_value not in trainer_log.read_text()


def test_gates_failing(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns, "strict", hyperparameters__maxSteps=2, gates=[{"metric": "exactMatch", "min": 0.99}]
    )
    platform.apply(doc)
    status = platform.wait_phase(ns, "strict", FINAL)
    assert status["phase"] == "Failed", status
    failed = _condition(status, "Failed")
    assert failed["reason"] == "GatesFailed", failed
    assert status["gatesSummary"] == "0/1 passed"
    assert status["gates"][0]["passed"] is False
    assert status["attempts"] == 1  # exit code 4 fails the Job at once: no retry
    (job,) = platform.children(ns, "jobs", "strict")
    assert any(c["reason"] == "PodFailurePolicy" for c in job["status"]["conditions"])
    assert not storage.exists(f"s3://models/{ns}/strict/latest.json")
    _reasons_ending(platform, ns, "strict", "GatesFailed")
    warning = [e for e in platform.events(ns, "strict") if e["type"] == "Warning"]
    assert warning and "exactMatch" in warning[-1]["message"]


def test_killed_pod_is_retried_and_resumes(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns, "preempted", hyperparameters__maxSteps=150, hyperparameters__checkpointEverySteps=25
    )
    platform.apply(doc)
    status = platform.wait_phase(ns, "preempted", ("Running", *FINAL))
    run_id = status["runId"]
    platform.wait_for("a checkpoint", lambda: platform.checkpoints(ns, "preempted", run_id), 120)
    (pod,) = platform.children(ns, "pods", "preempted")
    platform.kubelet.kill(pod["metadata"]["name"])  # OOM-killed: counts against backoffLimit

    status = platform.wait_phase(ns, "preempted", FINAL, timeout=180)
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2
    pods = _by_age(platform.children(ns, "pods", "preempted"))
    assert len(pods) == 2
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    result = _trainer_result(pods[1])
    assert result.resumed_from_step and result.resumed_from_step > 0
    assert result.steps == 150
    assert len(platform.children(ns, "jobs", "preempted")) == 1

    # Usage counts both pods, each from its trainer's start to its end, as the pods say.
    usage = status["usage"]
    ran = [pod["status"]["containerStatuses"][0]["state"]["terminated"] for pod in pods]
    seconds = [(_time(t["finishedAt"]) - _time(t["startedAt"])).total_seconds() for t in ran]
    assert [p["name"] for p in usage["pods"]] == [p["metadata"]["name"] for p in pods]
    assert all(p["gpus"] == 1 and p["finishedAt"] for p in usage["pods"]), usage
    assert usage["gpuSeconds"] == pytest.approx(sum(seconds))
    assert usage["tokens"] == result.tokens and result.tokens
    # The operator's counter grew by what the status says (one run in this namespace); it may
    # be ahead by the moments between a pod's end and the operator seeing it (usage.py).
    counted = platform.operator_metric("kubetune_operator_usage_gpu_seconds_total")
    (mine,) = [value for labels, value in counted.items() if ("namespace", ns) in labels]
    assert usage["gpuSeconds"] <= mine <= usage["gpuSeconds"] + 3 * len(pods)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_policy_violation(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns, "greedy", image="docker.io/someone/trainer:latest", resources={"gpus": 4}
    )
    platform.apply(doc)
    status = platform.wait_phase(ns, "greedy", "Failed", timeout=30)
    failed = _condition(status, "Failed")
    assert failed["reason"] == "PolicyViolation"
    assert "spec.image" in failed["message"] and ALLOWED_IMAGE in failed["message"]
    assert "spec.resources.gpus" in failed["message"]
    _assert_quiet(platform, ns, "greedy")


def _assert_quiet(platform: Platform, ns: str, name: str) -> None:
    """Nothing created, and no retry loop."""
    assert platform.children(ns, "configmaps", name) == []
    assert platform.children(ns, "jobs", name) == []
    platform.assert_no_more_writes(ns, name)


# The enum of spec.method.type in the CRD's schema (its one version).
METHOD_ENUM = (
    "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/method/properties/type/enum"
)


def test_invalid_spec(platform: Platform, kubectl: Kubectl, ns: str) -> None:
    doc = platform.job(ns, "typo", method__type="lorra")
    # The API server refuses it against the CRD's schema, naming the field...
    with pytest.raises(HTTPError) as refused:
        platform.apply(doc)
    assert refused.value.code == 422 and "spec.method.type" in refused.value.read().decode()
    # ...so only a cluster whose CRD is older than the operator lets it through to the operator:
    # here, a CRD whose method types were not an enum yet.
    crd = json.loads(kubectl("get", "crd", "finetunejobs.kubetune.dev", "-o", "json").stdout)
    enum = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    enum = enum["properties"]["method"]["properties"]["type"]["enum"]
    patch = [{"op": "remove", "path": METHOD_ENUM}]
    kubectl("patch", "crd", "finetunejobs.kubetune.dev", "--type=json", "-p", json.dumps(patch),
            check=True)  # fmt: skip

    def admitted() -> bool:
        try:
            platform.apply(doc)
        except HTTPError as exc:  # the API server serves the new schema a moment later
            if exc.code != 422:
                raise
            return False
        return True

    try:
        platform.wait_for("the old schema to admit it", admitted, 30, interval=0.5)
    finally:
        patch = [{"op": "add", "path": METHOD_ENUM, "value": enum}]
        kubectl("patch", "crd", "finetunejobs.kubetune.dev", "--type=json", "-p",
                json.dumps(patch), check=True)  # fmt: skip
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


def _patch_spec(platform: Platform, ns: str, name: str, spec: dict) -> None:
    platform.api.patch("finetunejobs", ns, name, {"spec": spec})


def _running_pods(platform: Platform, ns: str) -> list[str]:
    return [p.name for p in platform.kubelet.running_pods() if p.namespace == ns]


def test_spec_change_starts_a_new_run(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns, "gitops", hyperparameters__maxSteps=3000, hyperparameters__checkpointEverySteps=20
    )
    platform.apply(doc)
    first = platform.wait_phase(ns, "gitops", "Running")["runId"]
    platform.wait_for("a checkpoint", lambda: platform.checkpoints(ns, "gitops", first), 120)

    # As when a new dataset version is committed to git: a new generation, a new run.
    _patch_spec(platform, ns, "gitops", {"hyperparameters": {"maxSteps": 30}})
    status = platform.wait_phase(ns, "gitops", FINAL, timeout=120)
    assert status["phase"] == "Succeeded", status
    assert status["observedGeneration"] == 2
    second = status["runId"]
    assert second != first
    assert [j["metadata"]["name"] for j in platform.children(ns, "jobs", "gitops")] == [
        f"gitops-{second}"
    ]
    assert [c["metadata"]["name"] for c in platform.children(ns, "configmaps", "gitops")] == [
        f"gitops-{second}"
    ]
    assert platform.checkpoints(ns, "gitops", first), "the old run's artifacts stay"
    assert json.loads(storage.read_bytes(f"s3://models/{ns}/gitops/latest.json"))["runId"] == second


def test_suspend_and_resume(platform: Platform, ns: str) -> None:
    doc = platform.job(
        ns, "pausable", hyperparameters__maxSteps=200, hyperparameters__checkpointEverySteps=25
    )
    platform.apply(doc)
    run_id = platform.wait_phase(ns, "pausable", "Running")["runId"]
    platform.wait_for("a checkpoint", lambda: platform.checkpoints(ns, "pausable", run_id), 120)

    _patch_spec(platform, ns, "pausable", {"suspend": True})
    status = platform.wait_phase(ns, "pausable", "Suspended", timeout=30)
    assert status["runId"] == run_id  # suspending is not a new run
    (job,) = platform.children(ns, "jobs", "pausable")
    assert job["spec"]["suspend"] is True
    platform.wait_for("the pod to stop", lambda: not _running_pods(platform, ns), 30)

    _patch_spec(platform, ns, "pausable", {"suspend": False})
    platform.wait_phase(ns, "pausable", ("Running", "Evaluating", *FINAL), timeout=30)
    status = platform.wait_phase(ns, "pausable", FINAL, timeout=180)
    assert status["phase"] == "Succeeded", status
    # Same run; the pod removed by the suspension is not a failed attempt.
    assert status["runId"] == run_id and status["attempts"] == 1
    pods = _by_age(platform.children(ns, "pods", "pausable"))
    assert _trainer_result(pods[-1]).resumed_from_step > 0
    reasons = _reasons_ending(platform, ns, "pausable", "Succeeded", "Promoted")
    assert reasons.index("Suspended") < len(reasons) - 2


def test_queued_through_kueue(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "queued", queueName="team-a"))
    status = platform.wait_phase(ns, "queued", "Queued", timeout=30)
    assert "team-a" in _condition(status, "Ready")["message"]
    (job,) = platform.children(ns, "jobs", "queued")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    time.sleep(2)
    assert platform.status(ns, "queued")["phase"] == "Queued"
    assert not _running_pods(platform, ns)

    # Kueue admits the workload by unsuspending the Job; the operator leaves that to Kueue.
    platform.api.patch("jobs", ns, job["metadata"]["name"], {"spec": {"suspend": False}})
    status = platform.wait_phase(ns, "queued", FINAL, timeout=120)
    assert status["phase"] == "Succeeded", status
    assert "Queued" in _reasons(platform, ns, "queued")


def test_deletion_during_a_run(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "doomed", hyperparameters__maxSteps=3000))
    platform.wait_phase(ns, "doomed", "Running")
    platform.wait_for("the trainer process", lambda: _running_pods(platform, ns), 30)

    platform.api.delete("finetunejobs", ns, "doomed")
    platform.wait_for(
        "the children to go",
        lambda: (
            not any(
                platform.children(ns, kind, "doomed") for kind in ("jobs", "configmaps", "pods")
            )
        ),
        30,
    )
    platform.wait_for("the trainer to stop", lambda: not _running_pods(platform, ns), 30)
    assert platform.get(ns, "doomed") is None


def test_operator_restart_adopts_the_run(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "steady", hyperparameters__maxSteps=500))
    platform.wait_phase(ns, "steady", "Running")
    platform.operator.kill()
    time.sleep(1)
    platform.operator.start()
    status = platform.wait_phase(ns, "steady", FINAL, timeout=180)
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 1
    assert len(platform.children(ns, "jobs", "steady")) == 1
    assert platform.job_creates(ns, "steady") == 1


def test_backoff_limit_exceeded(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "fragile", hyperparameters__maxSteps=3000, backoffLimit=0))
    platform.wait_phase(ns, "fragile", "Running")
    platform.wait_for("the trainer process", lambda: _running_pods(platform, ns), 30)
    (pod,) = platform.children(ns, "pods", "fragile")
    platform.kubelet.kill(pod["metadata"]["name"])
    status = platform.wait_phase(ns, "fragile", FINAL, timeout=60)
    failed = _condition(status, "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "BackoffLimitExceeded"), status
    assert "backoff limit" in failed["message"]
    assert status["completionTime"]


def test_deadline_exceeded(platform: Platform, ns: str) -> None:
    platform.apply(
        platform.job(ns, "slow", hyperparameters__maxSteps=3000, activeDeadlineSeconds=8)
    )
    status = platform.wait_phase(ns, "slow", FINAL, timeout=60)
    failed = _condition(status, "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "DeadlineExceeded"), status
    assert not _running_pods(platform, ns)
    assert not storage.exists(f"s3://models/{ns}/slow/latest.json")
