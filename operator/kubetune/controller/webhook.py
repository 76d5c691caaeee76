"""Announcing a promotion to spec.notify.webhook: the POST (I/O) and its retry schedule (pure).

The run's final status carries `promotion.notification` (state Pending) from the moment the run
is promoted (decide.py). Every reconcile of the job then comes here: a Pending notification that
is due is built from the job's spec and status (kubetune/notify.py: a CloudEvent, signed as
Standard Webhooks sign), POSTed, and its new state written back to the status; one still Pending
asks the work queue to come back at nextAttemptTime. Delivery is at least once: a receiver that
answered 2xx but whose answer was lost (or an operator that died before writing the status) gets
the event again with the same id.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Protocol

import urllib3

from kubetune.api import FineTuneJob, FineTuneJobStatus, NotificationStatus, WebhookSpec
from kubetune.controller.errors import Misconfigured, Retry
from kubetune.controller.settings import OperatorSettings
from kubetune.notify import Message, promotion_event, record_of, signed, signing_key

log = logging.getLogger("kubetune.operator")

_HTTP = urllib3.PoolManager(num_pools=4, maxsize=4)


def post(url: str, message: Message, timeout: float) -> str | None:
    """POST message to url; None when the receiver answered 2xx, else why not, in one line."""
    try:
        response = _HTTP.request(
            "POST",
            url,
            body=message.body,
            headers=message.headers,
            timeout=urllib3.Timeout(total=timeout),
            retries=False,
            redirect=False,
        )
    except urllib3.exceptions.HTTPError as exc:
        return f"POST failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    if 200 <= response.status < 300:
        return None
    body = response.data[:200].decode("utf-8", "replace").strip()
    return f"the receiver answered {response.status}" + (f": {body}" if body else "")


def backoff(attempts: int, settings: OperatorSettings) -> float:
    """Seconds before attempt attempts+1: the base, doubling per failure, capped."""
    base = settings.notify_backoff_seconds * 2 ** max(0, attempts - 1)
    return float(min(settings.notify_backoff_max_seconds, base))


def after_attempt(
    note: NotificationStatus, error: str | None, now: datetime, settings: OperatorSettings
) -> NotificationStatus:
    """The notification's state after one more attempt that failed with error (None: delivered)."""
    attempts = note.attempts + 1
    if error is None:
        return note.model_copy(
            update={
                "state": "Delivered",
                "attempts": attempts,
                "last_attempt_time": now,
                "next_attempt_time": None,
                "message": None,
            }
        )
    if attempts >= settings.notify_max_attempts:
        return note.model_copy(
            update={
                "state": "Failed",
                "attempts": attempts,
                "last_attempt_time": now,
                "next_attempt_time": None,
                "message": f"{error} (gave up after {attempts} attempts)",
            }
        )
    delay = timedelta(seconds=backoff(attempts, settings))
    return note.model_copy(
        update={
            "attempts": attempts,
            "last_attempt_time": now,
            "next_attempt_time": (now + delay).replace(microsecond=0),
            "message": error,
        }
    )


class SecretReader(Protocol):
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...


class NotReady(Exception):
    """What the notification needs is missing (a Secret, a key): an attempt that failed."""


def _secret_value(kube: SecretReader, namespace: str, name: str, key: str, field: str) -> str:
    try:
        data = kube.secret_data(namespace, name)
    except Misconfigured as exc:  # e.g. the chart's readStorageSecrets: false (403)
        raise NotReady(f"Secret {name!r} cannot be read ({field}): {exc}") from exc
    if data is None:
        raise NotReady(f"Secret {name!r} not found in namespace {namespace} ({field})")
    if key not in data:
        raise NotReady(f"Secret {name!r} has no key {key!r} ({field})")
    return data[key]


def request(
    kube: SecretReader,
    webhook: WebhookSpec,
    job: FineTuneJob,
    status: FineTuneJobStatus,
    spec_hash: str,
    note: NotificationStatus,
    now: datetime,
) -> tuple[str, Message]:
    """The URL and the signed request for this attempt (raises NotReady)."""
    namespace = job.metadata.namespace or ""
    field = "spec.notify.webhook"
    if webhook.url_secret is not None:
        ref = webhook.url_secret
        url = _secret_value(kube, namespace, ref.name, ref.key, f"{field}.urlSecret").strip()
    else:
        url = webhook.url or ""
    key = None
    if webhook.signing_secret is not None:
        ref = webhook.signing_secret
        value = _secret_value(kube, namespace, ref.name, ref.key, f"{field}.signingSecret")
        try:
            key = signing_key(value)
        except ValueError as exc:
            raise NotReady(f"{field}.signingSecret: {exc}") from exc
    message = promotion_event(record_of(job, status, spec_hash), job.spec.output.uri, status)
    return url, signed(message, key, note.id, now)


def due_in(note: NotificationStatus, now: datetime) -> float:
    """Seconds until the next attempt of a Pending notification (0: now)."""
    if note.next_attempt_time is None:
        return 0.0
    return max(0.0, (note.next_attempt_time - now).total_seconds())


def retry_later(note: NotificationStatus, now: datetime) -> Retry:
    return Retry(
        f"notification {note.id}: attempt {note.attempts + 1} at {note.next_attempt_time}"
        + (f" (last: {note.message})" if note.message else ""),
        max(1.0, due_in(note, now)),
    )
