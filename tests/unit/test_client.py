"""The cluster client's parts that need no cluster: the exit codes of a run's outcome, what
`submit` sends, how API errors read, the kubeconfig's problems, and pull and rollback on
file:// outputs (the real control plane's tests are tests/e2e/test_client.py)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from kubetune.api import ExitCode, FineTuneJobStatus, PromotionRecord
from kubetune.client import ClientError, Conflict, Invalid, NotFound, exit_code
from kubetune.client import artifacts as client_artifacts
from kubetune.client.artifacts import ChecksumMismatch
from kubetune.client.kube import connect, translate
from kubetune.client.manifests import bodies
from kubetune_trainer import promotion
from tests.controller.test_notify import SECRET, Receiver
from tests.support.specs import minimal_job


def _status(phase: str, reason: str | None = None) -> FineTuneJobStatus:
    conditions = []
    if reason:
        conditions.append({"type": "Failed", "status": "True", "reason": reason, "message": "",
                           "lastTransitionTime": "2026-12-07T00:00:00Z"})  # fmt: skip
    return FineTuneJobStatus.model_validate({"phase": phase, "conditions": conditions})


@pytest.mark.parametrize(
    ("phase", "reason", "code"),
    [
        ("Succeeded", None, ExitCode.SUCCEEDED),
        ("Failed", "GatesFailed", ExitCode.GATES_FAILED),
        ("Failed", "DataError", ExitCode.DATA_ERROR),
        ("Failed", "Diverged", ExitCode.DIVERGED),
        ("Failed", "InvalidSpec", ExitCode.INVALID_SPEC),
        ("Failed", "PolicyViolation", ExitCode.INVALID_SPEC),
        ("Failed", "AdmissionDenied", ExitCode.INVALID_SPEC),
        ("Failed", "TrainerFailed", ExitCode.RUNTIME_ERROR),
        ("Failed", "BackoffLimitExceeded", ExitCode.RUNTIME_ERROR),
    ],
)
def test_a_runs_outcome_exits_as_kubetune_run_does(phase: str, reason: str, code: int) -> None:
    assert exit_code(_status(phase, reason)) == code


def test_submit_keeps_generate_name_for_the_api_server(tmp_path: Path) -> None:
    doc = minimal_job("reviews")
    doc["metadata"] = {"generateName": "reviews-"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    (body,) = bodies(path)
    assert body["metadata"] == {"generateName": "reviews-"}
    (from_dict,) = bodies(doc)
    assert from_dict["metadata"] == {"generateName": "reviews-"}


def test_submit_refuses_an_invalid_file_with_its_lines(tmp_path: Path) -> None:
    doc = minimal_job("reviews")
    doc["spec"]["hyperparameters"] = {"learning_rate": 0.1}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(Invalid) as caught:
        bodies(path)
    (problem,) = caught.value.problems
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "learning_rate" in t)
    assert problem.startswith(f"{path}:{line}: spec.hyperparameters.learning_rate")


def test_submit_checks_the_clusters_policy_when_given() -> None:
    from kubetune.admission import ClusterPolicy

    doc = minimal_job("reviews")
    doc["spec"]["resources"] = {"gpus": 4}
    assert bodies(doc)  # without the cluster's settings: the operator's to judge
    with pytest.raises(Invalid, match=r"spec.resources.gpus"):
        bodies(doc, ClusterPolicy(max_gpus_per_job=2))


def test_submit_of_a_file_without_a_job_says_so(tmp_path: Path) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ClientError, match="no FineTuneJob or FineTuneSchedule"):
        bodies(path)


def _api_error(status: int, body: dict[str, Any]) -> ApiException:
    exc = ApiException(status=status, reason="x")
    exc.body = json.dumps(body)
    return exc


def test_api_errors_read_as_one_line_with_the_fix() -> None:
    forbidden = _api_error(403, {"message": 'finetunejobs.kubetune.dev is forbidden: User "u" '
                                 'cannot create resource "finetunejobs"', "details": {}})  # fmt: skip
    text = str(translate(forbidden, "create", "finetunejobs", "ml", "https://k"))
    assert text.startswith("forbidden: finetunejobs.kubetune.dev is forbidden")
    assert "kubectl auth can-i create finetunejobs.kubetune.dev -n ml" in text
    no_crd = _api_error(404, {"message": "the server could not find the requested resource"})
    assert "CRDs are not installed" in str(translate(no_crd, "get", "finetunejobs", "ml", "k"))
    missing = _api_error(404, {"message": 'finetunejobs "x" not found', "details": {"name": "x"}})
    assert isinstance(translate(missing, "get", "finetunejobs", "ml", "k"), NotFound)
    down = urllib3.exceptions.MaxRetryError(None, "/", "refused")  # type: ignore[arg-type]
    assert "cannot reach the API server at https://k" in str(
        translate(down, "get", "finetunejobs", "ml", "https://k")
    )


def test_a_missing_kubeconfig_or_context_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    with pytest.raises(ClientError, match=r"no kubeconfig: .*none does not exist"):
        connect()
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "a",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "ml"}}],
    }))  # fmt: skip
    _, target = connect(str(config))
    assert (target.context, target.namespace) == ("a", "ml")
    with pytest.raises(
        ClientError, match=r"--context b: no such context in .*config \(there are: a\)"
    ):
        connect(str(config), "b")


# pull and rollback on a file:// output


def _publish(output: Path, run_id: str, files: dict[str, bytes], record: bool) -> None:
    run = output / "runs" / run_id
    if record:
        files = {**files, "promotion.json": PromotionRecord(
            run_id=run_id, job="j", namespace="ml", adapter_uri=f"{output.as_uri()}/runs/"
            f"{run_id}/adapter/").model_dump_json(by_alias=True, exclude_none=True).encode()}  # fmt: skip
    entries = []
    for path, data in files.items():
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_bytes(data)
        entries.append(
            {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    (run / "manifest.json").write_text(json.dumps({"runId": run_id, "files": entries}))


FILES = {"adapter/adapter_model.safetensors": b"weights", "report.md": b"# run", "loss.png": b"png",
         "metrics.json": b"{}", "result.json": b"{}", "eval_samples.jsonl": b""}  # fmt: skip


def test_pull_checks_every_file_against_the_manifest(tmp_path: Path) -> None:
    output = tmp_path / "out"
    _publish(output, "aaaa1111", FILES, record=False)
    run = f"{output.as_uri()}/runs/aaaa1111"
    pulled = client_artifacts._pull_run(run, "aaaa1111", tmp_path / "got")
    assert sorted(p for p, _ in pulled.files) == sorted(set(FILES) - {"eval_samples.jsonl"})
    assert (tmp_path / "got/adapter/adapter_model.safetensors").read_bytes() == b"weights"

    (output / "runs/aaaa1111/loss.png").write_bytes(b"changed")
    with pytest.raises(ChecksumMismatch, match=r"loss.png: sha256"):
        client_artifacts._pull_run(run, "aaaa1111", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(ClientError, match="exists and is not empty"):
        client_artifacts._pull_run(run, "aaaa1111", tmp_path / "got")


def test_pull_refuses_a_manifest_naming_a_file_outside_the_run(tmp_path: Path) -> None:
    output = tmp_path / "out"
    _publish(output, "aaaa1111", {"adapter/../../../escape": b"x"}, record=False)
    run = f"{output.as_uri()}/runs/aaaa1111"
    with pytest.raises(ClientError, match="outside the run"):
        client_artifacts._pull_run(run, "aaaa1111", tmp_path / "got" / "deep")
    assert not (tmp_path / "got").exists() or not any((tmp_path / "got").rglob("escape"))


def _user(name: str = "alice") -> Any:
    return SimpleNamespace(kube=SimpleNamespace(whoami=lambda: name))


def test_rollback_writes_the_previous_record_back_and_says_who(tmp_path: Path) -> None:
    output = tmp_path / "out"
    uri = output.as_uri()
    for run_id in ("aaaa1111", "bbbb2222"):
        _publish(output, run_id, FILES, record=True)
    promotion.promote(uri, PromotionRecord(run_id="aaaa1111"), lambda c: None)
    promotion.promote(uri, PromotionRecord(run_id="bbbb2222"), lambda c: None)

    record = client_artifacts._rollback(_user(), uri, None, "canary regressed")
    latest = promotion.read_champion(uri).record
    assert latest is not None and latest == record
    assert (latest.run_id, latest.previous_run_id) == ("aaaa1111", "bbbb2222")
    assert latest.adapter_uri == f"{uri}/runs/aaaa1111/adapter/"
    assert latest.rollback is not None
    assert (latest.rollback.by, latest.rollback.reason) == ("alice", "canary regressed")
    assert latest.rollback.from_run_id == "bbbb2222"
    with pytest.raises(ClientError, match="already the promoted run"):
        client_artifacts._rollback(_user(), uri, "aaaa1111", None)


def test_rollback_refuses_what_it_cannot_serve_again(tmp_path: Path) -> None:
    output = tmp_path / "out"
    uri = output.as_uri()
    with pytest.raises(NotFound, match="nothing is promoted"):
        client_artifacts._rollback(_user(), uri, None, None)
    _publish(output, "aaaa1111", FILES, record=False)  # never promoted: no record
    _publish(output, "bbbb2222", FILES, record=True)
    _publish(output, "cccc3333", FILES, record=True)
    promotion.promote(uri, PromotionRecord(run_id="bbbb2222"), lambda c: None)
    with pytest.raises(ClientError, match="no run before it: give --to RUN_ID"):
        client_artifacts._rollback(_user(), uri, None, None)
    with pytest.raises(ClientError, match=r"lists no promotion.json"):
        client_artifacts._rollback(_user(), uri, "aaaa1111", None)
    (output / "runs/cccc3333/promotion.json").write_text(
        '{"runId": "cccc3333", "adapterUri": "s3://evil/"}'
    )
    with pytest.raises(ChecksumMismatch, match="does not match the run's manifest"):
        client_artifacts._rollback(_user(), uri, "cccc3333", None)
    (output / "runs/cccc3333/report.md").unlink()
    with pytest.raises(NotFound, match=r"report.md is gone"):
        client_artifacts._rollback(_user(), uri, "cccc3333", None)
    assert promotion.read_champion(uri).record.run_id == "bbbb2222"  # type: ignore[union-attr]


def test_a_rollback_that_finds_latest_json_changed_says_who_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    uri = output.as_uri()
    for run_id in ("aaaa1111", "bbbb2222"):
        _publish(output, run_id, FILES, record=True)
    promotion.promote(uri, PromotionRecord(run_id="aaaa1111"), lambda c: None)
    promotion.promote(uri, PromotionRecord(run_id="bbbb2222"), lambda c: None)
    # A run promotes after the rollback read latest.json (while it asks who the user is).
    user = SimpleNamespace(kube=SimpleNamespace(whoami=lambda: promotion.promote(
        uri, PromotionRecord(run_id="dddd4444"), lambda c: None) and "alice"))  # fmt: skip
    with pytest.raises(Conflict, match="run dddd4444 is promoted now, not run bbbb2222"):
        client_artifacts._rollback(user, uri, None, None)
    assert promotion.read_champion(uri).record.run_id == "dddd4444"  # type: ignore[union-attr]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_a_rollback_announces_the_run_promoted_again_signed(receiver: Receiver) -> None:
    """The job's webhook gets the promotion event of the run now promoted, signed with the
    job's key (read as the user), under an id of its own."""
    from cloudevents.core.bindings.http import HTTPMessage, from_structured_event

    from kubetune.api import PROMOTED_EVENT_TYPE, FineTuneJob, Rollback

    doc = minimal_job("reviews")
    doc["spec"]["notify"] = {"webhook": {
        "url": receiver.url, "signingSecret": {"name": "hook", "key": "signing"}}}  # fmt: skip
    spec = FineTuneJob.model_validate(doc).spec
    read: list[tuple[str, str]] = []

    def secret(namespace: str, name: str) -> dict[str, str]:
        read.append((namespace, name))
        return {"signing": SECRET}

    user = SimpleNamespace(kube=SimpleNamespace(secret=secret))
    record = PromotionRecord(
        run_id="aaaa1111", job="reviews", namespace="ml", previous_run_id="bbbb2222",
        rollback=Rollback(by="alice", reason="canary", from_run_id="bbbb2222"),
    )  # fmt: skip
    note = client_artifacts._notify(user, "ml", spec, record, "s3://models/reviews")
    assert note == "delivered to the webhook (HTTP 200)" and read == [("ml", "hook")]
    (body,) = receiver.verified()  # the Standard Webhooks reference library checks it
    headers = {k.lower(): v for k, v in receiver.requests[0][0].items()}
    event = from_structured_event(HTTPMessage(headers=headers, body=body))
    assert event.get_type() == PROMOTED_EVENT_TYPE
    assert headers["webhook-id"].startswith("aaaa1111-rollback-")
    data = event.get_data()
    assert data["runId"] == "aaaa1111" and data["rollback"]["by"] == "alice"
    assert data["latestUri"] == "s3://models/reviews/latest.json"


def test_rollback_refuses_a_record_that_is_not_its_runs(tmp_path: Path) -> None:
    """The manifest lies in the same bucket: a record rewritten with its manifest still names
    only its own run's files, or it is refused."""
    output = tmp_path / "out"
    uri = output.as_uri()
    evil = PromotionRecord(run_id="eeee5555", adapter_uri="s3://elsewhere/model/")
    _publish(output, "eeee5555", {**FILES, "promotion.json": evil.model_dump_json().encode()},
             record=False)  # fmt: skip
    _publish(output, "bbbb2222", FILES, record=True)
    promotion.promote(uri, PromotionRecord(run_id="bbbb2222"), lambda c: None)
    with pytest.raises(ClientError, match="is not run eeee5555's record"):
        client_artifacts._rollback(_user(), uri, "eeee5555", None)


def test_a_second_rollback_needs_to_say_where(tmp_path: Path) -> None:
    output = tmp_path / "out"
    uri = output.as_uri()
    for run_id in ("aaaa1111", "bbbb2222"):
        _publish(output, run_id, FILES, record=True)
    promotion.promote(uri, PromotionRecord(run_id="aaaa1111"), lambda c: None)
    promotion.promote(uri, PromotionRecord(run_id="bbbb2222"), lambda c: None)
    client_artifacts._rollback(_user(), uri, None, None)
    # Its previousRunId is the run rolled back from: going "back" again would restore it.
    with pytest.raises(ClientError, match=r"is itself a rollback .* give --to RUN_ID"):
        client_artifacts._rollback(_user(), uri, None, None)


def test_a_secrets_keys_are_used_without_the_users_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore fills in from the environment what a config leaves out: while a Secret's keys
    are in use, the user's own are out of its reach (a Secret naming an endpoint would carry
    them there), and back afterwards."""
    from kubetune.api import FineTuneJob

    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-users-own")
    doc = minimal_job("reviews")
    doc["spec"]["output"]["credentialsSecret"] = "s3"
    spec = FineTuneJob.model_validate(doc).spec
    keys = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    user = SimpleNamespace(kube=SimpleNamespace(secret=lambda ns, name: keys))
    with client_artifacts.output_credentials(user, "ml", spec):
        assert "AWS_SESSION_TOKEN" not in os.environ
        from kubetune_trainer import storage

        assert storage.credentials(spec.output.uri + "/runs/x")["AWS_ACCESS_KEY_ID"] == "a"
    assert os.environ["AWS_SESSION_TOKEN"] == "the-users-own"


def test_describe_prints_no_terminal_control_sequence() -> None:
    """An Event's message is anyone's in the namespace: its escape sequences are not printed."""
    from kubetune.api import FineTuneJob
    from kubetune.client import Description
    from kubetune.client.show import describe

    job = FineTuneJob.model_validate(minimal_job("reviews")).model_copy(
        update={"status": FineTuneJobStatus.model_validate({"phase": "Running"})}
    )
    event = {"type": "Normal", "reason": "Started", "message": "ok\x1b]0;owned\x07\x1b[2J done"}
    page = describe(Description(job, [event], []))
    assert "\x1b" not in page and "\x07" not in page and "ok?]0;owned??[2J done" in page


def test_the_bar_draws_each_steps_own_loss(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.api import Progress
    from kubetune.console import ProgressBar

    bar = ProgressBar(mininterval=0)
    for step in (3, 4, 5):
        bar.step(Progress(step=step, total_steps=5, loss=step / 10, tokens_per_second=900.0))
    bar.stage("Evaluating")
    drawn = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bars = [line for line in drawn if "/5" in line]
    assert bars and not any("0/5" in line for line in bars), bars  # no empty first line
    for line in bars:
        step = int(line.split("/5")[0].split()[-1])
        assert f"loss={step / 10:.3f}" in line, bars
    assert "5/5" in bars[-1] and drawn[-1] == "==> Evaluating"


def test_submit_wait_ends_the_bar_where_training_did(capsys: pytest.CaptureFixture[str]) -> None:
    """A run that leaves Running with its last steps in the same status (the status is written
    at most every few seconds: the final steps often come with Evaluating) ends its bar there."""
    from kubetune.api import FineTuneJob
    from kubetune.client.show import follow

    def job(phase: str, step: int, loss: float) -> FineTuneJob:
        status = {"phase": phase, "runId": "0123abcd", "progress": {
            "step": step, "totalSteps": 30, "loss": loss, "tokensPerSecond": 900.0}}  # fmt: skip
        return FineTuneJob.model_validate({**minimal_job("reviews"), "status": status})

    seen = [job("Running", 10, 1.25), job("Running", 28, 0.5), job("Evaluating", 30, 0.25),
            job("Succeeded", 30, 0.25)]  # fmt: skip
    client = SimpleNamespace(watch=lambda name, namespace, timeout: iter(seen))
    follow(client, "reviews", None, 60)  # type: ignore[arg-type]
    drawn = capsys.readouterr().err.replace("\r", "\n").splitlines()
    bars = [line for line in drawn if "/30" in line]
    assert "30/30" in bars[-1] and "loss=0.250" in bars[-1], bars
    stages = [line for line in drawn if line.startswith("==>")]
    assert stages == ["==> Running", "==> Evaluating", "==> Succeeded"], stages
    assert drawn.index("==> Running") < drawn.index(bars[0])
    assert drawn.index(bars[-1]) < drawn.index("==> Evaluating")
