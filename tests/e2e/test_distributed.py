"""A distributed run end to end on the real control plane: an Indexed Job of two pods and its
headless Service, the real trainer's launcher in each pod (gloo over the loopback, the pods'
rendezvous at rank 0's DNS name), artifacts in the real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import ExitCode, TrainerResult
from kubetune_trainer import storage
from tests.support.platform import FINAL, Platform
from tests.trainer.conftest import run_job

# The 2-pod run's loss at each step against one process's at the same global batch (the same
# examples per step: the pods take turns at the micro-batches): the gradients differ only by
# the order of float additions.
LOSS_TOLERANCE = 0.01  # relative, per step


def _history(uri: str) -> list[float]:
    metrics = json.loads(storage.read_bytes(uri))
    return [entry["loss"] for entry in metrics["history"] if "loss" in entry]


def _result(pod: dict) -> TrainerResult:
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return TrainerResult.model_validate_json(terminated["message"])


def _index(pod: dict) -> int:
    return int(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def test_two_pods_train_as_one(platform: Platform, ns: str, tmp_path: Path) -> None:
    spec = {
        "hyperparameters__maxSteps": 16,
        "hyperparameters__microBatchSize": 8,
        "hyperparameters__checkpointEverySteps": 8,
        # No dropout: its masks are drawn per process, which is noise this test would measure.
        "method__lora": {"dropout": 0.0},
    }
    doc = platform.job(ns, "pair", resources={"nodes": 2, "gpus": 0}, **spec)
    platform.apply(doc)
    status = platform.wait_phase(ns, "pair", FINAL, timeout=300)
    assert status["phase"] == "Succeeded", status
    run_id = status["runId"]
    assert status["attempts"] == 1
    assert status["distributed"]["nodes"] == 2 and status["distributed"]["worldSize"] == 2
    assert status["distributed"]["strategy"] == "ddp"
    assert [(p["index"], p["phase"]) for p in status["distributed"]["pods"]] == [
        (0, "Succeeded"),
        (1, "Succeeded"),
    ]
    assert status["progress"]["totalSteps"] == 16

    # The children: an Indexed Job of two pods, and the headless Service they met through.
    (job,) = platform.children(ns, "jobs", "pair")
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    (service,) = platform.children(ns, "services", "pair")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == job["spec"]["template"]["spec"]["subdomain"]
    pods = sorted(platform.children(ns, "pods", "pair"), key=_index)
    assert [_index(p) for p in pods] == [0, 1]
    assert _result(pods[0]) == _result(pods[1])  # every pod ends with rank 0's result
    logs = [
        (platform.kubelet.workdir / ns / p["metadata"]["name"] / "container.log").read_text()
        for p in pods
    ]
    assert "Published" in logs[0] and "Published" not in logs[1]  # rank 0 alone writes

    # One artifact set, written once; latest.json names the run.
    prefix = f"s3://models/{ns}/pair/runs/{run_id}"
    keys = storage.list_keys(prefix)
    assert keys.count("manifest.json") == 1 and "adapter/adapter_config.json" in keys
    assert json.loads(storage.read_bytes(f"s3://models/{ns}/pair/latest.json"))["runId"] == run_id

    # The loss curve of one process at the same global batch.
    single = platform.job(ns, "pair", **spec)
    single["spec"]["output"] = {"uri": (tmp_path / "single").as_uri()}
    single["metadata"].update(uid="uid-single", generation=1)
    result, _ = run_job(single, tmp_path / "work")
    assert result.outcome == "Succeeded", result.message
    one = _history((tmp_path / "single" / "runs" / "0123abcd" / "metrics.json").as_uri())
    two = _history(f"{prefix}/metrics.json")
    assert len(one) == len(two) == 16
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(a), (step, one, two)


@pytest.mark.parametrize("lost", [1, 0], ids=["a-worker-pod", "rank-0s-pod"])
def test_a_lost_pod_restarts_the_group_from_its_checkpoint(
    platform: Platform, ns: str, lost: int
) -> None:
    """Either pod: rank 0's pod also hosts the rendezvous, which the new group makes again."""
    name = f"lost{lost}"
    doc = platform.job(
        ns,
        name,
        resources={"nodes": 2, "gpus": 0},
        hyperparameters__maxSteps=120,
        hyperparameters__checkpointEverySteps=20,
    )
    platform.apply(doc)
    status = platform.wait_phase(ns, name, ("Running", *FINAL), timeout=180)
    run_id = status["runId"]
    platform.wait_for("a checkpoint", lambda: platform.checkpoints(ns, name, run_id), 180)
    (victim,) = [p for p in platform.children(ns, "pods", name) if _index(p) == lost]
    platform.kubelet.kill(victim["metadata"]["name"])  # OOM-killed: counts against backoffLimit

    status = platform.wait_phase(ns, name, FINAL, timeout=300)
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 2  # one restart of the group, not one per pod
    pods = platform.children(ns, "pods", name)
    assert sorted(_index(p) for p in pods) == [0, 0, 1, 1]
    first_round = {_index(p): p for p in pods if p["status"]["phase"] == "Failed"}
    assert sorted(first_round) == [0, 1]
    # The killed pod, and the other one, which lost its peer: told apart by their results.
    killed = first_round[lost]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert killed["exitCode"] == 137
    assert _result(first_round[1 - lost]).exit_code == ExitCode.PEER_LOST
    final = [_result(p) for p in pods if p["status"]["phase"] == "Succeeded"]
    assert len(final) == 2 and final[0] == final[1]
    assert final[0].resumed_from_step and final[0].resumed_from_step > 0
    assert final[0].steps == 120
    assert len(platform.children(ns, "jobs", name)) == 1
