"""The `FineTuneJob` resource: group kubetune.dev, version v1alpha1."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

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


# A run of several pods: its pods' hostnames <name>-<runId>-<index> (index < 64) are DNS labels.
MAX_DISTRIBUTED_NAME_LENGTH = MAX_NAME_LENGTH - 3
NAME_TOO_LONG = (
    f"must be at most {MAX_NAME_LENGTH} characters: a run's Job is named <name>-<runId> "
    "and Kubernetes limits that to 63"
)


# What the API server does with metadata.generateName (k8s.io/apiserver/pkg/storage/names,
# SimpleNameGenerator): the prefix, cut to 63 - 5 characters, plus 5 random characters from
# k8s.io/apimachinery/pkg/util/rand's alphabet (no vowels, no look-alikes).
GENERATED_SUFFIX_LENGTH = 5
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
MAX_GENERATE_NAME_LENGTH = MAX_NAME_LENGTH - GENERATED_SUFFIX_LENGTH


def generate_name(prefix: str) -> str:
    """A name from metadata.generateName, as the API server makes one on create."""
    base = prefix[: 63 - GENERATED_SUFFIX_LENGTH]
    return base + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(GENERATED_SUFFIX_LENGTH))


def _check_name_length(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{NAME_TOO_LONG} (this one has {len(name)})")
    return name


class ObjectMeta(ApiModel):
    """The standard object metadata: the fields kubetune reads, and the rest of
    metav1.ObjectMeta kept as they come. Any other field is unknown, as the API server's strict
    field validation says (metadata is always ObjectMeta, even where the CRD's schema is open)."""

    name: Annotated[DnsSubdomain, AfterValidator(_check_name_length)] = Field(
        description=(
            f"name of the FineTuneJob; at most {MAX_NAME_LENGTH} characters so that "
            "<name>-<runId> fits the 63-character limit of Job names and labels."
        ),
    )
    generate_name: str | None = Field(
        default=None,
        description=(
            "generateName asks the API server for a unique name with this prefix (it adds "
            f"{GENERATED_SUFFIX_LENGTH} characters), when name is not set; at most "
            f"{MAX_GENERATE_NAME_LENGTH} characters."
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
    # The rest of metav1.ObjectMeta, set by the API server or by other controllers.
    self_link: Any = Field(default=None, description="selfLink (deprecated).")
    resource_version: Any = Field(default=None, description="resourceVersion, set by the server.")
    creation_timestamp: Any = Field(
        default=None, description="creationTimestamp, set by the server."
    )
    deletion_timestamp: Any = Field(
        default=None, description="deletionTimestamp, set by the server."
    )
    deletion_grace_period_seconds: Any = Field(
        default=None, description="deletionGracePeriodSeconds, set by the server."
    )
    owner_references: Any = Field(default=None, description="ownerReferences of the object.")
    finalizers: Any = Field(default=None, description="finalizers of the object.")
    managed_fields: Any = Field(default=None, description="managedFields, set by the server.")

    @model_validator(mode="before")
    @classmethod
    def _name_from_generate_name(cls, data: Any) -> Any:
        """No name but a generateName: the name the API server would give it on create (what
        `kubectl create` sends; `kubectl apply` needs a name)."""
        if isinstance(data, dict) and not data.get("name"):
            prefix = data.get("generateName")
            if isinstance(prefix, str) and prefix:
                # A prefix too long is reported at generateName (below), not at the name.
                name = generate_name(prefix[:MAX_GENERATE_NAME_LENGTH])
                return {**data, "name": name}
        return data

    @field_validator("generate_name")
    @classmethod
    def _check_generate_name(cls, prefix: str | None) -> str | None:
        if prefix is not None and len(prefix) > MAX_GENERATE_NAME_LENGTH:
            raise ValueError(
                f"must be at most {MAX_GENERATE_NAME_LENGTH} characters: the API server adds "
                f"{GENERATED_SUFFIX_LENGTH} and a run's Job is named <name>-<runId> "
                f"(this one has {len(prefix)})"
            )
        return prefix


class FineTuneJob(ApiModel):
    """A fine-tuning run: a base model, data and a method in; an evaluated, gated model out."""

    __rules__ = (
        Rule(
            cel=f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
            check=lambda s: len(s.metadata.name) <= MAX_NAME_LENGTH,
            # No fieldPath: the API server resolves it against the schema, where metadata is opaque.
            message=f"metadata.name {NAME_TOO_LONG}",
            blame=".metadata.name",
        ),
        Rule(
            cel=(
                "!has(self.spec.resources.nodes) || self.spec.resources.nodes <= 1 || "
                f"(self.metadata.name.size() <= {MAX_DISTRIBUTED_NAME_LENGTH} && "
                "self.metadata.name.matches('^[a-z]'))"
            ),
            check=lambda s: (
                s.spec.nodes() <= 1
                or (
                    len(s.metadata.name) <= MAX_DISTRIBUTED_NAME_LENGTH
                    and s.metadata.name[:1].isalpha()
                )
            ),
            message=(
                f"metadata.name of a run with resources.nodes over 1 must start with a letter and "
                f"be at most {MAX_DISTRIBUTED_NAME_LENGTH} characters: its pods are named "
                "<name>-<runId>-<index> and its Service <name>-<runId> (DNS labels)"
            ),
            blame=".metadata.name",
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
