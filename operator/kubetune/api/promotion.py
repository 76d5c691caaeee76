"""`<output.uri>/latest.json`: the promoted run of an output, for whoever serves it.

It names everything a server needs to load the promoted model without guessing (the base model
and revision, the method, the adapter and merged URIs), how the run scored, when it was
promoted, and the run it replaced (for a rollback). The trainer writes it (trainer/promotion.py,
conditionally); gates that compare with the promoted run read it; the operator reads it to
announce a promotion.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from kubetune.api.base import ApiModel
from kubetune.api.status import EvalMetrics
from kubetune.api.training import MethodType


class PromotedModel(ApiModel):
    """The base model the promoted run tuned."""

    model_config = ConfigDict(strict=False)

    uri: str = Field(description="uri is the base model as the spec named it (hf://ORG/NAME, ...).")
    revision: str | None = Field(
        default=None, description="revision is the hf:// branch, tag or commit, when set."
    )


class Rollback(ApiModel):
    """Who made an earlier run the promoted one again, and why (`kubetune rollback`)."""

    model_config = ConfigDict(strict=False)

    by: str = Field(description="by is the Kubernetes user who rolled back (SelfSubjectReview).")
    reason: str | None = Field(default=None, description="reason is what they gave (--reason).")
    from_run_id: str = Field(description="fromRunId is the run that was promoted until then.")


class PromotionRecord(ApiModel):
    """latest.json. Records written before this schema (runId, job, URIs, metrics) still read."""

    model_config = ConfigDict(strict=False)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(
        default="kubetune.dev/v1alpha1", alias="apiVersion", description="apiVersion."
    )
    kind: Literal["Promotion"] = Field(default="Promotion", description="kind is Promotion.")
    run_id: str = Field(description="runId is the promoted run.")
    job: str | None = Field(default=None, description="job is the FineTuneJob's name.")
    namespace: str | None = Field(default=None, description="namespace of the FineTuneJob.")
    base_model: PromotedModel | None = Field(
        default=None, description="baseModel is what the adapter applies to."
    )
    method: MethodType | None = Field(default=None, description="method is how it was tuned.")
    spec_hash: str | None = Field(
        default=None, description="specHash identifies the spec the run was made from."
    )
    adapter_uri: str | None = Field(default=None, description="adapterUri is the PEFT adapter.")
    merged_uri: str | None = Field(
        default=None, description="mergedUri is the full model, when exported."
    )
    manifest_uri: str | None = Field(
        default=None, description="manifestUri lists the run's files with their sha256."
    )
    metrics: EvalMetrics | None = Field(
        default=None, description="metrics are the promoted model's on its test set."
    )
    promoted_at: datetime | None = Field(default=None, description="promotedAt is when.")
    previous_run_id: str | None = Field(
        default=None,
        description="previousRunId is the run this one replaced (the one to roll back to).",
    )
    rollback: Rollback | None = Field(
        default=None,
        description=(
            "rollback is set when this run was made the promoted one again by a rollback "
            "(promotedAt is then when)."
        ),
    )


LATEST = "latest.json"
# <output.uri>/runs/<runId>/promotion.json: the record latest.json got when the run was
# promoted, listed in its manifest; `kubetune rollback` writes it back.
RUN_RECORD = "promotion.json"


def latest_uri(output_uri: str) -> str:
    """<output.uri>/latest.json."""
    return f"{output_uri.rstrip('/')}/{LATEST}"
