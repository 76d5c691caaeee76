"""`spec.resources`: compute and placement of the trainer pod."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.base import ApiModel
from kubetune.api.types import DnsSubdomain, Quantity, ResourceName


class Toleration(ApiModel):
    """A Kubernetes toleration for the trainer pod."""

    key: str | None = Field(
        default=None, max_length=316, description="key is the taint key; empty matches all keys."
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal",
        description="operator is Equal (key and value match) or Exists (key matches).",
    )
    value: str | None = Field(
        default=None, max_length=63, description="value is the taint value for Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="effect is the taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="tolerationSeconds bounds how long a NoExecute taint is tolerated.",
    )


class ResourcesSpec(ApiModel):
    """Compute for the trainer pod."""

    gpus: int = Field(
        default=1, ge=0, le=16, description="gpus is the number of GPUs for the trainer pod."
    )
    gpu_resource_name: ResourceName = Field(
        default="nvidia.com/gpu",
        description="gpuResourceName is the extended resource that counts GPUs.",
    )
    cpu: Quantity | None = Field(
        default=None,
        description=(
            "cpu is the CPU request (e.g. 8, 500m); no CPU limit is set, it would only throttle."
        ),
    )
    memory: Quantity | None = Field(
        default=None, description="memory is the memory request and limit (e.g. 32Gi)."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="nodeSelector places the pod on matching nodes.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="tolerations let the pod run on tainted (e.g. GPU) nodes.",
    )
    priority_class_name: DnsSubdomain | None = Field(
        default=None, description="priorityClassName is the PriorityClass of the trainer pod."
    )
