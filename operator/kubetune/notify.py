"""The promotion notification: a CloudEvent (structured JSON mode) carrying what latest.json says,
and its Standard Webhooks signature. Pure: the operator (controller/notifications.py) sends it,
`kubetune run --print-notification` prints it; the time and the key are passed in.

CloudEvents: https://github.com/cloudevents/spec (v1.0.2), built and serialised by the CNCF's
`cloudevents` SDK. Standard Webhooks: https://www.standardwebhooks.com (webhook-id, webhook-
timestamp, webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent

from kubetune.api import (
    API_VERSION,
    PLURAL,
    FineTuneJob,
    FineTuneJobStatus,
    PromotedModel,
    PromotionRecord,
    PromotionStatus,
    TrainerResult,
    latest_uri,
)
from kubetune.api.notify import PROMOTED_EVENT_TYPE


@dataclass(frozen=True)
class Message:
    """An HTTP request's headers and body."""

    headers: dict[str, str]
    body: bytes

    def show(self) -> str:
        """The request as a reader checks it: headers, a blank line, the JSON indented."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return f"{head}\n\n{json.dumps(json.loads(self.body), indent=2)}"


def source(namespace: str, name: str) -> str:
    """The CloudEvent's source: the FineTuneJob's API path."""
    return f"/apis/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"


def record_of(job: FineTuneJob, status: FineTuneJobStatus, spec_hash: str) -> PromotionRecord:
    """latest.json as the promoted run wrote it, from the job's spec and final status."""
    spec, artifacts = job.spec, status.artifacts
    promotion = status.promotion
    return PromotionRecord(
        run_id=status.run_id or "",
        job=job.metadata.name,
        namespace=job.metadata.namespace,
        base_model=PromotedModel(uri=spec.model.uri, revision=spec.model.revision),
        method=spec.method.type,
        spec_hash=spec_hash,
        adapter_uri=artifacts.adapter_uri if artifacts else None,
        merged_uri=artifacts.merged_uri if artifacts else None,
        manifest_uri=artifacts.manifest_uri if artifacts else None,
        metrics=status.metrics.tuned if status.metrics else None,
        promoted_at=promotion.promoted_at if promotion else None,
        previous_run_id=promotion.previous_run_id if promotion else None,
    )


def result_status(job: FineTuneJob, result: TrainerResult) -> FineTuneJobStatus:
    """The status a promoted run's result gives its FineTuneJob, as far as the notification
    reads it (for `kubetune run --print-notification` and tests, which have no operator)."""
    return FineTuneJobStatus(
        run_id=result.run_id,
        metrics=result.metrics,
        gates=result.gates,
        artifacts=result.artifacts,
        promotion=PromotionStatus(
            latest_uri=latest_uri(job.spec.output.uri),
            promoted_at=result.promoted_at,
            previous_run_id=result.previous_run_id,
        ),
    )


def promotion_event(
    record: PromotionRecord, output_uri: str, status: FineTuneJobStatus | None = None
) -> Message:
    """The CloudEvent announcing record's promotion. Its id is the run id (unique per job, the
    same in every attempt); data is latest.json's record, with latest.json's URI and, from the
    status, the gates and the base and champion metrics."""
    data: dict[str, Any] = record.model_dump(by_alias=True, exclude_none=True, mode="json")
    data["latestUri"] = latest_uri(output_uri)
    if status is not None:
        if status.metrics is not None:
            data["evaluation"] = status.metrics.model_dump(
                by_alias=True, exclude_none=True, mode="json"
            )
        data["gates"] = [g.model_dump(by_alias=True, exclude_none=True) for g in status.gates]
    attributes: dict[str, Any] = {
        "id": record.run_id,
        "source": source(record.namespace or "default", record.job or "local"),
        "type": PROMOTED_EVENT_TYPE,
        "subject": record.run_id,
        "datacontenttype": "application/json",
    }
    if record.promoted_at is not None:
        attributes["time"] = record.promoted_at
    message = to_structured_event(CloudEvent(attributes=attributes, data=data))
    headers = {"Content-Type": message.headers["content-type"] + "; charset=utf-8"}
    return Message(headers, message.body)


def signing_key(value: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64, optionally prefixed whsec_ (decoded
    exactly as the Standard Webhooks libraries decode it, so a receiver uses the same string)."""
    text = value.strip().removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "==")
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the signing key is not base64 (e.g. whsec_<base64>)") from exc
    if not key:
        raise ValueError("the signing key is empty")
    return key


def signed(message: Message, key: bytes | None, event_id: str, now: datetime) -> Message:
    """message with the Standard Webhooks headers; signed when there is a key."""
    timestamp = str(int(now.timestamp()))
    headers = {**message.headers, "webhook-id": event_id, "webhook-timestamp": timestamp}
    if key is not None:
        mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + message.body, hashlib.sha256)
        headers["webhook-signature"] = "v1," + base64.b64encode(mac.digest()).decode()
    return Message(headers, message.body)
