"""Policy: what this cluster allows, beyond what the API itself accepts. Pure."""

from __future__ import annotations

from kubetune.api import FineTuneJob
from kubetune.controller.settings import OperatorSettings


def policy_problems(job: FineTuneJob, settings: OperatorSettings) -> list[str]:
    """One 'field: problem and fix' line for each policy the job breaks."""
    spec = job.spec
    problems = []
    if (
        spec.image is not None
        and spec.image != settings.trainer_image
        and spec.image not in settings.allowed_images
    ):
        allowed = ", ".join([settings.trainer_image, *settings.allowed_images])
        problems.append(f"spec.image: {spec.image!r} is not allowed here; allowed: {allowed}")
    if spec.resources.gpus > settings.max_gpus_per_job:
        problems.append(
            f"spec.resources.gpus: {spec.resources.gpus} is more than this cluster allows per job "
            f"({settings.max_gpus_per_job})"
        )
    if spec.output.uri.startswith("file://") and not settings.allow_file_output:
        problems.append(
            "spec.output.uri: file:// would write inside the trainer pod and be lost; "
            "use s3://, gs:// or az://"
        )
    return problems
