"""What a run's pods get beyond its FineTuneJob's spec, as admission resolved it from the
run's FineTuneProfile; the operator's builders (controller/build.py) turn it into manifests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api import ModelCacheSpec, Pricing, ProfileRef

# The profile a run was resolved against, name, generation and spec, as a key of the ConfigMap's
# data (which outlives the Job, so that the run keeps it whatever happens to the profile). The
# ConfigMap's data is trusted only when its hash is the one the operator wrote in
# status.configHash (data_hash).
PROFILE_FILE = "profile.json"


@dataclass(frozen=True)
class RunTemplate:
    """What a run's pods get beyond its FineTuneJob's spec: its profile's service-level parts
    (admission/profiles.py resolves them). The default is a run with no profile."""

    spec_hash: str | None = None  # of the job's own spec, which names the run; default: job's
    profile: ProfileRef | None = None
    profile_spec: str | None = None  # the profile's spec as JSON, pinned on the ConfigMap
    affinity: dict[str, Any] | None = None
    image_pull_secrets: tuple[str, ...] = ()
    env: tuple[dict[str, Any], ...] = ()
    volumes: tuple[dict[str, Any], ...] = ()
    volume_mounts: tuple[dict[str, Any], ...] = ()
    model_cache: ModelCacheSpec | None = None
    pricing: Pricing | None = None
    pod_labels: tuple[tuple[str, str], ...] = ()
    pod_annotations: tuple[tuple[str, str], ...] = ()


NO_PROFILE = RunTemplate()
