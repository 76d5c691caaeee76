"""Policy: what this cluster allows, beyond what the API itself accepts. Pure."""

from __future__ import annotations

from kubetune.api import FineTuneJob
from kubetune.controller.settings import OperatorSettings


def policy_problems(
    job: FineTuneJob, settings: OperatorSettings, profile_images: tuple[str, ...] = ()
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
