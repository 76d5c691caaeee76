"""The cluster client on the real control plane, as a user with the namespace's `edit` role (a
ServiceAccount's token in a kubeconfig of its own, nothing of the operator's): `kubetune submit
--wait` and its exit codes on a run that is promoted, one that fails its gates and one the
operator refuses to start; get, describe, wait, cancel; logs from the live pod (the API server's
pods/log, through the node agent's kubelet endpoint) and from object storage once the pods are
gone; pull and its checksum check; rollback, a rollback that loses a race to a promotion, and
one by a FineTuneSchedule's name, which its status shows; the errors a user meets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import PromotionRecord
from kubetune.client import Client, ClientError, Conflict
from kubetune.client import artifacts as client_artifacts
from kubetune_trainer import promotion, storage
from tests.e2e.conftest import Kubectl
from tests.support.control_plane import ControlPlane
from tests.support.platform import MAX_GPUS, Platform

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user(plane: ControlPlane, kubectl: Kubectl, ns: str, tmp_path: Path) -> Path:
    """A kubeconfig of the namespace's user: ServiceAccount `user` bound to ClusterRole edit
    (which the chart extends with FineTuneJob rights), its namespace the context's."""
    kubectl("create", "serviceaccount", "user", "-n", ns, check=True)
    kubectl(
        "create", "rolebinding", "user-edit", "--clusterrole=edit",
        f"--serviceaccount={ns}:user", "-n", ns, check=True,
    )  # fmt: skip
    return plane.kubeconfig_for(tmp_path / "user.kubeconfig", ns, "user")


def kubetune(
    *args: str, config: Path | None, timeout: float = 300, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """The kubetune command as a user runs it: KUBECONFIG, no -n (the context's namespace)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    if config is not None:
        env["KUBECONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "kubetune.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )


def _lines(text: str) -> str:
    """text as the CLI prints it: line by line."""
    return "".join(line + "\n" for line in text.splitlines())


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _job_file(platform: Platform, ns: str, tmp_path: Path, name: str, **spec: Any) -> Path:
    doc = platform.job(ns, name, **spec)
    del doc["metadata"]["namespace"]  # the context's, as a user's manifest would
    return _write(tmp_path / f"{name}.yaml", doc)


def test_submit_wait_get_describe_logs_pull(
    platform: Platform, ns: str, user: Path, tmp_path: Path
) -> None:
    doc = platform.job(ns, "x", gates=[{"metric": "exactMatch", "min": 0.0}])
    doc["metadata"] = {"generateName": "reviews-"}
    path = _write(tmp_path / "job.yaml", doc)

    done = kubetune("submit", str(path), "--wait", "--timeout", "5m", config=user)
    assert done.returncode == 0, done.stderr
    created = done.stderr.split("finetunejob.kubetune.dev/", 1)[1].split()[0]
    assert created.startswith("reviews-") and len(created) == len("reviews-") + 5
    assert "==> Running" in done.stderr and "==> Succeeded" in done.stderr
    status = platform.status(ns, created)
    run_id = status["runId"]
    assert f"Run {run_id} of {created}: Succeeded" in done.stdout
    assert "PASS  exactMatch" in done.stdout and status["artifacts"]["adapterUri"] in done.stdout

    table = kubetune("get", config=user)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(created))
    assert row.split()[1:4] == ["Succeeded", "lora", run_id] and " yes " in row
    as_json = json.loads(kubetune("get", created, "-o", "json", config=user).stdout)
    assert as_json["status"]["phase"] == "Succeeded" and as_json["metadata"]["namespace"] == ns

    page = kubetune("describe", created, config=user)
    assert page.returncode == 0, page.stderr
    for part in ("Phase:       Succeeded", "Conditions:", "Ready", "Artifacts:", "Events:"):
        assert part in page.stdout, page.stdout
    assert f"{status['promotion']['latestUri']} names it" in page.stdout

    waited = kubetune("wait", created, "--for", "phase=Succeeded", "--timeout", "10s", config=user)
    assert waited.returncode == 0 and "condition met" in waited.stdout

    # The live pod's log, through the API server's pods/log.
    (pod,) = platform.children(ns, "pods", created)
    live = kubetune("logs", created, config=user)
    assert live.returncode == 0, live.stderr
    expected = platform.kubelet.log(ns, pod["metadata"]["name"])
    assert expected and live.stdout == _lines(expected)

    # The pod gone, the archived trainer.log.
    platform.api.delete("pods", ns, pod["metadata"]["name"])
    platform.wait_for("the pod gone", lambda: not platform.children(ns, "pods", created))
    archived = kubetune("logs", created, config=user)
    assert archived.returncode == 0, archived.stderr
    stored = storage.read_bytes(f"s3://models/{ns}/x/runs/{run_id}/trainer.log").decode()
    assert archived.stdout == _lines(stored)
    assert archived.stdout != live.stdout

    # pull: the files, checked against the manifest.
    env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    try:  # the Secret's credentials, read as the user: not this process's environment
        pulled = kubetune("pull", created, config=user, cwd=tmp_path)
    finally:
        os.environ.update(env)
    assert pulled.returncode == 0, pulled.stderr
    got = tmp_path / f"{created}-{run_id}"  # the default: ./NAME-RUNID
    assert pulled.stdout.strip() == str(got)
    for name in ("report.md", "loss.png", "metrics.json", "result.json", "manifest.json"):
        assert (got / name).is_file(), name
    assert (got / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    report = f"s3://models/{ns}/x/runs/{run_id}/report.md"
    assert (got / "report.md").read_bytes() == storage.read_bytes(report)

    # A file changed after the run published it: nothing is left behind.
    storage.write_bytes(report, b"# not what the run wrote\n")
    bad = kubetune("pull", created, "--to", str(tmp_path / "bad"), config=user)
    assert bad.returncode == 1 and "report.md: sha256" in bad.stderr, bad.stderr
    assert "nothing pulled" in bad.stderr and not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad*"))


def test_submit_wait_exit_codes(platform: Platform, ns: str, user: Path, tmp_path: Path) -> None:
    failing = _job_file(
        platform, ns, tmp_path, "strict", gates=[{"metric": "loss", "max": 0.0001}],
    )  # fmt: skip
    done = kubetune("submit", str(failing), "--wait", "--timeout", "5m", config=user)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "GatesFailed" in done.stdout and "FAIL  loss" in done.stdout
    ended = kubetune("wait", "strict", "--for", "phase=Succeeded", config=user)
    assert ended.returncode == 1 and "ended Failed" in ended.stderr

    # One the operator refuses to start: more GPUs than its policy allows.
    greedy = _job_file(platform, ns, tmp_path, "greedy", resources={"gpus": MAX_GPUS + 2})
    refused = kubetune("submit", str(greedy), "--wait", "--timeout", "2m", config=user)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "PolicyViolation" in kubetune("describe", "greedy", config=user).stdout

    # Invalid before anything is created: the file's line and field.
    broken = tmp_path / "broken.yaml"
    broken.write_text(failing.read_text().replace("learningRate:", "learning_rate:"))
    invalid = kubetune("submit", str(broken), config=user)
    assert invalid.returncode == 2 and f"{broken}:" in invalid.stderr
    assert "learning_rate" in invalid.stderr and platform.get(ns, "strict") is not None


def test_cancel_suspends_and_resume_continues(
    platform: Platform, ns: str, user: Path, tmp_path: Path
) -> None:
    path = _job_file(platform, ns, tmp_path, "long", hyperparameters__maxSteps=400)
    assert kubetune("submit", str(path), config=user).stdout.strip() == "long"
    platform.wait_phase(ns, "long", "Running", timeout=120)
    (pod,) = platform.wait_for(
        "the trainer to write", lambda: _writing(platform, ns, "long"), timeout=120
    )
    # logs -f: the live pod's lines as they come, until its container ends (the cancel).
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    follow = subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", "logs", "long", "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "KUBECONFIG": str(user)},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(follow.stdout or []), daemon=True)
    reader.start()
    platform.wait_for("a line followed", lambda: lines, timeout=60)
    grown = len(platform.kubelet.log(ns, pod))
    platform.wait_for(
        "the log to grow while followed",
        lambda: len(platform.kubelet.log(ns, pod)) > grown and len("".join(lines)) > grown,
        timeout=120,
    )
    assert follow.poll() is None  # still following
    cancelled = kubetune("cancel", "long", config=user)
    assert cancelled.returncode == 0 and "suspended" in cancelled.stdout
    assert follow.wait(timeout=60) == 0, follow.stderr.read() if follow.stderr else ""
    reader.join(10)
    assert "".join(lines) == _lines(platform.kubelet.log(ns, pod))  # all of it, in order
    platform.wait_phase(ns, "long", "Suspended", timeout=60)
    platform.wait_for("its pods removed", lambda: not platform.children(ns, "pods", "long"))
    assert "resumed" in kubetune("resume", "long", config=user).stdout
    platform.wait_phase(ns, "long", ("Pending", "Running"), timeout=60)
    deleted = kubetune("cancel", "long", "--delete", config=user)
    assert deleted.returncode == 0 and "deleted" in deleted.stdout
    platform.wait_for("the job gone", lambda: platform.get(ns, "long") is None, timeout=60)


def _writing(platform: Platform, ns: str, job: str) -> list[str]:
    """The job's pod once its container has written a line."""
    pods = platform.children(ns, "pods", job)
    names = [p["metadata"]["name"] for p in pods]
    return names if len(names) == 1 and platform.kubelet.log(ns, names[0]) else []


def test_rollback_and_a_rollback_that_loses_the_race(
    platform: Platform, ns: str, user: Path, tmp_path: Path
) -> None:
    output = f"s3://models/{ns}/shared"
    runs = []
    for name in ("first", "second"):
        path = _job_file(platform, ns, tmp_path, name, output__uri=output)
        done = kubetune("submit", str(path), "--wait", "--timeout", "5m", config=user)
        assert done.returncode == 0, done.stderr
        runs.append(platform.status(ns, name)["runId"])
    latest = PromotionRecord.model_validate_json(storage.read_bytes(f"{output}/latest.json"))
    assert latest.run_id == runs[1] and latest.previous_run_id == runs[0]

    back = kubetune("rollback", output, "--reason", "serving disagrees", config=user)
    assert back.returncode == 0, back.stderr
    assert f"run {runs[0]} is the promoted run again (replacing run {runs[1]})" in back.stdout
    record = PromotionRecord.model_validate_json(storage.read_bytes(f"{output}/latest.json"))
    assert record.run_id == runs[0] and record.previous_run_id == runs[1]
    assert record.rollback is not None and record.rollback.by == f"system:serviceaccount:{ns}:user"
    assert record.rollback.reason == "serving disagrees" and record.adapter_uri
    assert record.adapter_uri.startswith(f"{output}/runs/{runs[0]}/")
    again = kubetune("rollback", output, "--to", runs[0], config=user)
    assert again.returncode == 1 and "already the promoted run" in again.stderr

    # A promotion lands between the rollback's read of latest.json and its conditional write:
    # the write is refused (412), the rollback reads again and says who won.
    client = Client(ns, kubeconfig=str(user))
    rival = record.model_copy(update={"run_id": runs[1], "rollback": None})
    real = promotion.read_champion
    calls = []

    def read_then_lose(uri: str) -> promotion.Champion:
        champion = real(uri)
        calls.append(champion.record.run_id if champion.record else None)
        if len(calls) == 2:  # promote()'s own read: the rival writes right after it
            promotion.promote(output, rival, lambda current: None)
        return champion

    promotion.read_champion = read_then_lose  # type: ignore[assignment]
    try:
        with pytest.raises(Conflict, match=f"run {runs[1]} is promoted now"):
            client_artifacts.rollback(client, output, runs[1], None, ns)
    finally:
        promotion.read_champion = real  # type: ignore[assignment]
    assert len(calls) >= 3  # the rollback's read, promote's read, the read after the 412
    final = PromotionRecord.model_validate_json(storage.read_bytes(f"{output}/latest.json"))
    assert final.run_id == runs[1] and final.rollback is None

    # Rolled back by a FineTuneSchedule's name: the Secret of its template's output, and the
    # schedule's status shows it once the operator has read latest.json itself.
    schedule = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneSchedule",
        "metadata": {"name": "weekly"},
        "spec": {
            "schedule": "0 3 * * 1",
            "jobTemplate": {"spec": platform.job(ns, "t", output__uri=output)["spec"]},
        },
    }
    made = kubetune("submit", str(_write(tmp_path / "s.yaml", schedule)), config=user)
    assert made.returncode == 0, made.stderr
    back = kubetune(
        "rollback", "weekly", "--to", runs[0], "--reason", "a canary regressed", config=user
    )
    assert back.returncode == 0, back.stderr
    assert "schedule weekly: annotated kubetune.dev/rollback" in back.stdout
    promoted = platform.wait_for(
        "the schedule to show the rollback",
        lambda: (p := _schedule_status(platform, ns).get("promoted")) and p.get("rollback") and p,
        60,
    )
    assert promoted["runId"] == runs[0] and promoted["name"] == "first"
    assert promoted["rollback"] == {
        "by": f"system:serviceaccount:{ns}:user",
        "reason": "a canary regressed",
        "fromRunId": runs[1],
    }
    (event,) = [e for e in platform.events(ns, "weekly") if e["reason"] == "RolledBack"]
    assert f"run {runs[0]} is the promoted run again (replacing run {runs[1]})" in event["message"]

    # Anyone with edit can annotate; the operator believes latest.json, not the annotation.
    forged = {
        "metadata": {"annotations": {"kubetune.dev/rollback": f"{runs[1]}@2030-01-01T00:00:00Z"}}
    }
    platform.api.patch("finetuneschedules", ns, "weekly", forged)
    warning = platform.wait_for(
        "the forged annotation refused",
        lambda: [e for e in platform.events(ns, "weekly") if e["reason"] == "RollbackNotFound"],
        60,
    )
    assert f"latest.json names run {runs[0]}, rolled back to at" in warning[0]["message"]
    assert _schedule_status(platform, ns)["promoted"] == promoted


def _schedule_status(platform: Platform, ns: str) -> dict[str, Any]:
    obj = platform.api.get("finetuneschedules", ns, "weekly")
    assert obj is not None
    return obj.get("status") or {}


def test_errors_name_the_fix(
    platform: Platform, plane: ControlPlane, kubectl: Kubectl, ns: str, user: Path, tmp_path: Path
) -> None:
    missing = kubetune("get", config=tmp_path / "nowhere")
    assert missing.returncode == 1 and "no kubeconfig" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    gone = kubetune("describe", "nosuch", config=user)
    assert gone.returncode == 1 and f"FineTuneJob nosuch not found in namespace {ns}" in gone.stderr

    # A reader only (ClusterRole view): submit is forbidden, and it says which verb on what.
    kubectl("create", "serviceaccount", "reader", "-n", ns, check=True)
    kubectl("create", "rolebinding", "reader-view", "--clusterrole=view",
            f"--serviceaccount={ns}:reader", "-n", ns, check=True)  # fmt: skip
    reader = plane.kubeconfig_for(tmp_path / "reader.kubeconfig", ns, "reader")
    path = _job_file(platform, ns, tmp_path, "nope")
    refused = kubetune("submit", str(path), config=reader)
    assert refused.returncode == 1, refused.stderr
    assert "forbidden" in refused.stderr and "create finetunejobs" in refused.stderr

    # What a cluster without the CRDs answers for a kind: to an admin a 404 for the resource
    # itself; to anyone else RBAC's forbidden, which comes first.
    admin = Client(ns, kubeconfig=str(plane.admin))
    with pytest.raises(ClientError, match="CRDs are not installed"):
        admin.kube.get(ns, "x", "finetunewidgets")
    with pytest.raises(
        ClientError, match=r"forbidden: .*\(or whether kubetune is installed there\)"
    ):
        Client(ns, kubeconfig=str(user)).kube.get(ns, "x", "finetunewidgets")
