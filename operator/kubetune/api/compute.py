"""`spec.resources` and `spec.distributed`: compute and placement of the trainer pods, and how
training spreads over their processes."""

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


MAX_NODES = 64
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
Strategy = Literal["auto", "ddp", "fsdp"]


class ResourcesSpec(ApiModel):
    """Compute for the trainer pods."""

    gpus: int | None = Field(
        default=None,
        ge=0,
        le=16,
        description=(
            "gpus is the number of GPUs of each trainer pod; default: the profile's, else 1."
        ),
    )
    nodes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NODES,
        description=(
            "nodes is the number of trainer pods (default 1), each with `gpus` GPUs. More than "
            "one runs an Indexed Job whose pods meet through a headless Service; the world size "
            "is nodes times the processes per pod."
        ),
    )
    gpu_resource_name: ResourceName | None = Field(
        default=None,
        description=(
            "gpuResourceName is the extended resource that counts GPUs; default: the "
            "profile's, else nvidia.com/gpu."
        ),
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

    def gpus_per_pod(self) -> int:
        """GPUs of each pod: the field, or 1 when unset (after a profile's default)."""
        return 1 if self.gpus is None else self.gpus

    def gpu_resource(self) -> str:
        """The extended resource the pods' GPUs are: the field, else nvidia.com/gpu."""
        return self.gpu_resource_name or DEFAULT_GPU_RESOURCE


class DistributedSpec(ApiModel):
    """How training spreads over the processes of the trainer pods."""

    strategy: Strategy = Field(
        default="auto",
        description=(
            "strategy is ddp (every process holds the whole model and trains on its own shard "
            "of each batch), fsdp (weights, gradients and optimizer state sharded over the "
            "processes; method full only) or auto: fsdp for full fine-tuning, ddp for "
            "adapters. It matters only when the world size is over 1."
        ),
    )
    nproc_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "nprocPerNode is the number of trainer processes per pod; default: one per GPU, one "
            "on a pod without GPUs. Set it only for CPU pods (gpus: 0), e.g. to test a "
            "distributed run."
        ),
    )
