"""spec.notify: who hears of a promotion. The operator POSTs a CloudEvent to a webhook when a run
is promoted (latest.json names it), signed as Standard Webhooks sign (an HMAC-SHA256 with a key
from a Secret), retried with backoff until the receiver answers 2xx; status.promotion.notification
says how it went. The status side lives in status.py; the event itself in kubetune/notify.py."""

from __future__ import annotations

from pydantic import Field

from kubetune.api.base import ApiModel, Rule
from kubetune.api.types import DnsSubdomain, WebhookUrl

# Where a promotion is announced, as a CloudEvent's type (reverse-DNS, as the spec asks).
PROMOTED_EVENT_TYPE = "dev.kubetune.finetunejob.promoted.v1"


class SecretKey(ApiModel):
    """A key of a Secret in the job's own namespace."""

    name: DnsSubdomain = Field(description="name of the Secret.")
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="key in the Secret's data.",
    )


class WebhookSpec(ApiModel):
    """An HTTP receiver of promotions. Exactly one of url and urlSecret is set."""

    __rules__ = (
        Rule(
            cel="has(self.url) != has(self.urlSecret)",
            check=lambda s: (s.url is None) != (s.url_secret is None),
            message="a webhook sets exactly one of url or urlSecret",
        ),
    )

    url: WebhookUrl | None = Field(
        default=None,
        description=(
            "url is where the operator POSTs the notification (http:// or https://, e.g. "
            "http://deployer.ml-serving:8080/hooks/kubetune)."
        ),
    )
    url_secret: SecretKey | None = Field(
        default=None,
        description=(
            "urlSecret is a Secret key holding the URL, for a URL that carries a token of its own."
        ),
    )
    signing_secret: SecretKey | None = Field(
        default=None,
        description=(
            "signingSecret is a Secret key holding the signing key: each request carries "
            "webhook-id, webhook-timestamp and webhook-signature (v1,<base64 HMAC-SHA256 of "
            "'<id>.<timestamp>.<body>'>) as Standard Webhooks defines them. The key is "
            "base64, with or without a whsec_ prefix, as the Standard Webhooks libraries take "
            "it (e.g. whsec_$(openssl rand -base64 32)). Unset: requests are not signed."
        ),
    )


class NotifySpec(ApiModel):
    """Where promotions are announced. Changing it does not start a new run."""

    webhook: WebhookSpec | None = Field(
        default=None,
        description=(
            "webhook receives a CloudEvent (structured JSON, type "
            f"{PROMOTED_EVENT_TYPE}) when a run of this job is promoted: the run id, the "
            "base model, the method, the metrics and the artifact URIs, as latest.json names "
            "them. Delivery is retried with backoff until a 2xx; the event's id stays the same "
            "across attempts, so a receiver can drop a repeat."
        ),
    )
