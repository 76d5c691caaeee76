"""The `FineTuneJob` resource: group kubetune.dev, version v1alpha1."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field

from kubetune.api.base import ApiModel, Rule
from kubetune.api.spec import FineTuneJobSpec
from kubetune.api.status import FineTuneJobStatus
from kubetune.api.types import MAX_NAME_LENGTH, DnsSubdomain

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("kubetune",)


NAME_TOO_LONG = (
    f"must be at most {MAX_NAME_LENGTH} characters: a run's Job is named <name>-<runId> "
    "and Kubernetes limits that to 63"
)


def _check_name_length(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{NAME_TOO_LONG} (this one has {len(name)})")
    return name


class ObjectMeta(ApiModel):
    """The metadata kubetune reads; everything else the API server sets is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[DnsSubdomain, AfterValidator(_check_name_length)] = Field(
        description=(
            f"name of the FineTuneJob; at most {MAX_NAME_LENGTH} characters so that "
            "<name>-<runId> fits the 63-character limit of Job names and labels."
        ),
    )
    namespace: str | None = Field(default=None, description="namespace of the FineTuneJob.")
    uid: str | None = Field(default=None, description="uid set by the API server.")
    generation: int | None = Field(
        default=None, description="generation of the spec, set by the API server."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="labels of the FineTuneJob.")
    annotations: dict[str, str] = Field(
        default_factory=dict, description="annotations of the FineTuneJob."
    )


class FineTuneJob(ApiModel):
    """A fine-tuning run: a base model, data and a method in; an evaluated, gated model out."""

    __rules__ = (
        Rule(
            cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            check=lambda s: len(s.metadata.name) <= MAX_NAME_LENGTH,
            # No fieldPath: the API server resolves it against the schema, where metadata is opaque.
            message=f"metadata.name {NAME_TOO_LONG}",
        ),
    )

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(
        alias="apiVersion", description="apiVersion is kubetune.dev/v1alpha1."
    )
    kind: Literal["FineTuneJob"] = Field(description="kind is FineTuneJob.")
    metadata: ObjectMeta = Field(description="metadata is the standard object metadata.")
    spec: FineTuneJobSpec = Field(description="spec is the desired run.")
    status: FineTuneJobStatus | None = Field(
        default=None, description="status is the observed run."
    )
