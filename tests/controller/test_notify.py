"""The promotion notification: a CloudEvent POSTed to a real HTTP receiver on 127.0.0.1, checked
with the CloudEvents SDK and the Standard Webhooks reference library; delivered exactly once,
retried with backoff after a 500, given up after the last attempt, and shown on the status.
The receiver is opened through notify.allowedCidrs (the default policy refuses loopback); the
policy itself, the leaks and the answer's limits are in test_webhook_policy.py."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from typing import Any

import pytest
import standardwebhooks
from cloudevents.core.bindings.http import HTTPMessage, from_structured_event

from kubetune.api import (
    PROMOTED_EVENT_TYPE,
    Artifacts,
    EvalMetrics,
    ExitCode,
    FineTuneJob,
    MetricsStatus,
    NotificationStatus,
    TrainerResult,
)
from kubetune.controller import notifications
from kubetune.controller.build import spec_hash
from kubetune.controller.errors import Misconfigured, Retry
from kubetune.controller.finetunejob_controller import reconcile
from kubetune.controller.settings import OperatorSettings
from kubetune.notify import signing_key
from tests.controller.test_reconcile import SETTINGS, FakeKube, ftj

# The real time: the Standard Webhooks library refuses a timestamp more than 5 minutes away.
NOW = datetime.now(UTC).replace(microsecond=0)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
PROMOTED_AT = datetime(2026, 11, 22, 12, 59, 30, tzinfo=UTC)
# The test receivers listen on 127.0.0.1, which the default policy refuses: opened here.
OPEN = SETTINGS.model_copy(update={"notify_allowed_cidrs": [ip_network("127.0.0.1/32")]})


class Receiver:
    """An HTTP server that records every POST and answers the scripted statuses (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.reply = b"busy"  # the body of a non-2xx answer
        self.location: str | None = None  # a redirect's Location
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                if receiver.location and 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.end_headers()
                self.wfile.write(receiver.reply if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.netloc = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.netloc}/hooks/kubetune"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def verified(self) -> list[dict[str, Any]]:
        """Each request's CloudEvent data, after its signature checks out."""
        hook = standardwebhooks.Webhook(SECRET)
        out = []
        for headers, body in self.requests:
            hook.verify(body, headers)  # raises WebhookVerificationError when it does not
            out.append(body)
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def promoted_job(webhook_spec: dict[str, Any], kube_type: type[FakeKube] = FakeKube) -> FakeKube:
    """A job whose run finished promoted, its Job complete, the signing key in a Secret."""
    kube = kube_type(
        ftj(
            output={"uri": "s3://models/sql", "credentialsSecret": "s3"},
            notify={"webhook": webhook_spec},
        )
    )
    kube.secrets["s3"] = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    kube.secrets["hook"] = {"key": SECRET}
    reconcile(kube, SETTINGS, "ml", "sql-lora", now=NOW)
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    kube.objects["Job", name]["status"] = {
        "conditions": [
            {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-22T13:00:00Z"}
        ]
    }
    return kube


def result_of(kube: FakeKube) -> TrainerResult:
    run_id = kube.ftj["status"]["runId"]
    return TrainerResult(
        run_id=run_id,
        outcome="Succeeded",
        exit_code=ExitCode.SUCCEEDED,
        message="trained 40 steps; 1 gate(s) passed; promoted",
        metrics=MetricsStatus(
            tuned=EvalMetrics(exact_match=0.9, loss=0.4), base=EvalMetrics(exact_match=0.2)
        ),
        artifacts=Artifacts(
            adapter_uri=f"s3://models/sql/runs/{run_id}/adapter/",
            manifest_uri=f"s3://models/sql/runs/{run_id}/manifest.json",
        ),
        promoted=True,
        promoted_at=PROMOTED_AT,
        previous_run_id="r-older",
    )


def finish(kube: FakeKube, at: datetime, settings: OperatorSettings = OPEN) -> Retry | None:
    """One reconcile at `at`, its pod gone (result.json read); the Retry it asks for, if any."""
    stored = result_of(kube)
    try:
        reconcile(kube, settings, "ml", "sql-lora", now=at, read_result=lambda *_: stored)
    except Retry as exc:
        return exc
    return None


def notification(kube: FakeKube) -> dict[str, Any]:
    return kube.ftj["status"]["promotion"]["notification"]


def test_a_promotion_is_announced_once_signed_and_as_a_cloudevent(receiver: Receiver) -> None:
    kube = promoted_job({"url": receiver.url, "signingSecret": {"name": "hook", "key": "key"}})
    assert finish(kube, NOW) is None
    status = kube.ftj["status"]
    run_id = status["runId"]
    assert status["phase"] == "Succeeded"
    assert status["promotion"]["latestUri"] == "s3://models/sql/latest.json"
    assert status["promotion"]["previousRunId"] == "r-older"
    assert notification(kube)["state"] == "Delivered" and notification(kube)["attempts"] == 1
    events = [w[1:] for w in kube.writes if w[0] == "event"]
    assert ("Normal", "Promoted") in events and ("Normal", "Notified") in events

    (body,) = receiver.verified()  # exactly one POST, and its signature is right
    headers = receiver.requests[0][0]
    assert headers["Content-Type"].startswith("application/cloudevents+json")
    assert headers["webhook-id"] == run_id
    event = from_structured_event(
        HTTPMessage(headers={"content-type": headers["Content-Type"]}, body=body)
    )
    attributes = event.get_attributes()
    assert attributes["type"] == PROMOTED_EVENT_TYPE and attributes["id"] == run_id
    assert attributes["source"] == "/apis/kubetune.dev/v1alpha1/namespaces/ml/finetunejobs/sql-lora"
    assert attributes["time"] == PROMOTED_AT
    data = event.get_data()
    job = FineTuneJob.model_validate(kube.ftj)
    assert data["runId"] == run_id and data["previousRunId"] == "r-older"
    assert data["adapterUri"] == f"s3://models/sql/runs/{run_id}/adapter/"
    assert data["latestUri"] == "s3://models/sql/latest.json"
    assert data["baseModel"] == {"uri": job.spec.model.uri}
    assert data["method"] == job.spec.method.type and data["specHash"] == spec_hash(job)
    assert data["metrics"] == {"exactMatch": 0.9, "loss": 0.4}
    assert data["evaluation"]["base"] == {"exactMatch": 0.2}
    # Nothing more, whatever happens next: the run is finished and announced.
    assert finish(kube, NOW + timedelta(minutes=5)) is None
    kube.objects.clear()  # the TTL controller deletes the Job
    assert finish(kube, NOW + timedelta(minutes=10)) is None
    assert len(receiver.requests) == 1


def test_a_500_is_retried_after_the_backoff_then_delivered(receiver: Receiver) -> None:
    receiver.answers = [500]
    kube = promoted_job({"url": receiver.url, "signingSecret": {"name": "hook", "key": "key"}})
    retry = finish(kube, NOW)
    assert retry is not None and retry.delay == SETTINGS.notify_backoff_seconds
    note = notification(kube)
    assert note["state"] == "Pending" and note["attempts"] == 1
    assert note["message"] == f"the receiver at {receiver.netloc} answered 500"  # not its body
    assert note["nextAttemptTime"] == (NOW + timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Too early: no POST, come back when it is due.
    retry = finish(kube, NOW + timedelta(seconds=4))
    assert retry is not None and retry.delay == 6.0 and len(receiver.requests) == 1
    assert finish(kube, NOW + timedelta(seconds=10)) is None
    note = notification(kube)
    assert note["state"] == "Delivered" and note["attempts"] == 2 and note.get("message") is None
    bodies = receiver.verified()
    assert len(bodies) == 2 and bodies[0] == bodies[1]  # the same event, signed afresh
    assert [h["webhook-id"] for h, _ in receiver.requests] == [note["id"]] * 2
    assert [h["webhook-timestamp"] for h, _ in receiver.requests] == [
        str(int(NOW.timestamp())), str(int((NOW + timedelta(seconds=10)).timestamp()))
    ]  # fmt: skip


def test_delivery_gives_up_after_the_last_attempt(receiver: Receiver) -> None:
    receiver.answers = [503, 503, 503]
    settings = OPEN.model_copy(update={"notify_max_attempts": 2})
    kube = promoted_job({"url": receiver.url})
    assert finish(kube, NOW, settings) is not None
    assert finish(kube, NOW + timedelta(seconds=10), settings) is None
    note = notification(kube)
    assert note["state"] == "Failed" and note["attempts"] == 2
    assert note["message"] == (
        f"the receiver at {receiver.netloc} answered 503 (gave up after 2 attempts)"
    )
    assert ("Warning", "NotificationFailed") in [w[1:] for w in kube.writes if w[0] == "event"]
    assert finish(kube, NOW + timedelta(hours=1), settings) is None
    assert len(receiver.requests) == 2
    assert "webhook-signature" not in receiver.requests[0][0]  # no signingSecret: unsigned
    assert kube.ftj["status"]["phase"] == "Succeeded"  # the promotion stands


def test_the_url_from_a_secret_and_a_missing_secret_is_a_failed_attempt(
    receiver: Receiver,
) -> None:
    kube = promoted_job(
        {
            "urlSecret": {"name": "receiver", "key": "url"},
            "signingSecret": {"name": "hook", "key": "key"},
        }
    )
    retry = finish(kube, NOW)
    assert retry is not None and receiver.requests == []
    assert notification(kube)["message"] == (
        "Secret 'receiver' not found in namespace ml (spec.notify.webhook.urlSecret)"
    )
    kube.secrets["receiver"] = {"url": receiver.url + "\n"}
    assert finish(kube, NOW + timedelta(seconds=10)) is None
    assert len(receiver.verified()) == 1 and notification(kube)["state"] == "Delivered"


def test_no_webhook_no_notification_and_a_gates_failed_run_announces_nothing(
    receiver: Receiver,
) -> None:
    kube = promoted_job({"url": receiver.url})
    kube.ftj["spec"].pop("notify")
    assert finish(kube, NOW) is None
    assert "notification" not in kube.ftj["status"]["promotion"]

    failed = promoted_job({"url": receiver.url})
    stored = result_of(failed).model_copy(
        update={"outcome": "GatesFailed", "exit_code": ExitCode.GATES_FAILED, "promoted": False}
    )
    reconcile(failed, SETTINGS, "ml", "sql-lora", now=NOW, read_result=lambda *_: stored)
    assert "promotion" not in failed.ftj["status"] and receiver.requests == []


def test_notify_is_not_part_of_the_run() -> None:
    plain = FineTuneJob.model_validate(ftj())
    notified = FineTuneJob.model_validate(ftj(notify={"webhook": {"url": "http://a.b/c"}}))
    assert spec_hash(plain) == spec_hash(notified)


def test_the_backoff_doubles_to_its_cap() -> None:
    settings = OperatorSettings(notify_backoff_seconds=10, notify_backoff_max_seconds=60)
    assert [notifications.backoff(n, settings) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    note = NotificationStatus(id="r", state="Pending")
    after = notifications.after_attempt(note, "down", NOW, settings)
    assert after.next_attempt_time == NOW + timedelta(seconds=10) and after.attempts == 1


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (SECRET, b"0123456789abcdef0123456789abcdef"),
        (SECRET.removeprefix("whsec_"), b"0123456789abcdef0123456789abcdef"),
    ],
)
def test_signing_keys_read_as_the_standard_webhooks_libraries_read_them(
    value: str, key: bytes
) -> None:
    assert signing_key(value) == key


def test_an_empty_signing_key_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        signing_key("whsec_")


def test_a_secret_the_operator_may_not_read_is_a_failed_attempt(receiver: Receiver) -> None:
    """With the chart's readStorageSecrets: false the signing key cannot be read: the attempt
    fails and says why on the status, rather than the reconcile failing over and over."""
    kube = promoted_job({"url": receiver.url, "signingSecret": {"name": "hook", "key": "key"}})
    stored = result_of(kube)
    reads = kube.secret_data

    def forbidden(namespace: str, name: str) -> dict[str, str] | None:
        if name == "hook":
            raise Misconfigured('secrets "hook" is forbidden', "Forbidden")
        return reads(namespace, name)

    kube.secret_data = forbidden  # type: ignore[method-assign]
    with pytest.raises(Retry) as retry:
        reconcile(kube, OPEN, "ml", "sql-lora", now=NOW, read_result=lambda *_: stored)
    assert not isinstance(retry.value, Misconfigured) and receiver.requests == []
    note = notification(kube)
    assert note["state"] == "Pending" and note["attempts"] == 1
    assert note["message"] == (
        "Secret 'hook' cannot be read (spec.notify.webhook.signingSecret): "
        'secrets "hook" is forbidden'
    )
