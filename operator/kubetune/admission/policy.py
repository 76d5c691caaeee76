"""Policy: what this cluster allows, beyond what the API itself accepts. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api import FineTuneJob


@dataclass(frozen=True)
class Refusal:
    """Why a run may not start: a reason (PolicyViolation, ProfileNotFound, ProfileUnreadable)
    and a message of 'field: problem and fix' lines joined by '; '."""

    reason: str
    message: str


class ClusterPolicy(BaseModel):
    """The operator's settings that decide what may run (the chart's trainer.* values; the
    operator's OperatorSettings extends it with how it runs)."""

    model_config = ConfigDict(extra="ignore")

    trainer_image: str = Field(
        # The release's own image, as the chart's default (the tag follows the version).
        default=f"ghcr.io/kubetune/trainer:{version('kubetune')}",
        description="The default trainer image.",
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Images a FineTuneJob may name in spec.image (exact match); empty allows none.",
    )
    max_gpus_per_job: int = Field(default=8, ge=0, description="The most GPUs one job may ask for.")
    require_profile: bool = Field(
        default=False,
        description="Run FineTuneJobs only under a FineTuneProfile (named, or a default one).",
    )
    allow_file_output: bool = Field(
        default=False,
        description="Allow file:// outputs (only useful with a shared volume; off by default).",
    )


def policy_problems(
    job: FineTuneJob, settings: ClusterPolicy, profile_images: tuple[str, ...] = ()
) -> list[str]:
    """One 'field: problem and fix' line for each policy the job breaks. profile_images: the
    images its FineTuneProfile allows besides the operator's."""
    spec = job.spec
    problems = []
    allowed_images = [settings.trainer_image, *settings.allowed_images, *profile_images]
    if spec.image is not None and spec.image not in allowed_images:
        allowed = ", ".join(dict.fromkeys(allowed_images))
        problems.append(f"spec.image: {spec.image!r} is not allowed here; allowed: {allowed}")
    per_pod = spec.resources.gpus_per_pod()
    gpus = per_pod * spec.nodes()
    if gpus > settings.max_gpus_per_job and spec.nodes() == 1:
        problems.append(
            f"spec.resources.gpus: {gpus} is more than this cluster allows per job "
            f"({settings.max_gpus_per_job})"
        )
    elif gpus > settings.max_gpus_per_job:
        problems.append(
            f"spec.resources: {spec.nodes()} pods x {per_pod} GPUs = {gpus} GPUs is "
            f"more than this cluster allows per job ({settings.max_gpus_per_job}); lower "
            "resources.nodes or resources.gpus"
        )
    if spec.output.uri.startswith("file://") and not settings.allow_file_output:
        problems.append(
            "spec.output.uri: file:// would write inside the trainer pod and be lost; "
            "use s3://, gs:// or az://"
        )
    return problems
