"""`FineTuneJob.spec.tracking`: experiment trackers that receive a run's parameters, training
curves, evaluation results, gate verdicts and artifact URIs (MLflow, Weights & Biases).

Tracking is optional and never decides anything: a tracker that cannot be reached is dropped with
a warning on the run, and training goes on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import ApiModel
from kubetune.api.types import DnsSubdomain, TrackingUri

__all__ = ["MlflowSpec", "TrackingSpec", "WandbSpec"]


class MlflowSpec(ApiModel):
    """An MLflow tracking server."""

    tracking_uri: TrackingUri = Field(
        description="trackingUri is the MLflow tracking server, e.g. http://mlflow.mlflow:5000."
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description=(
            "experiment is the MLflow experiment the run goes in (created if missing); default: "
            "<namespace>/<name> of the FineTuneJob."
        ),
    )
    run_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=250,
        description="runName is the MLflow run's name; default: <name>-<runId>.",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="tags are added to the MLflow run.",
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret in the job's own namespace whose keys become the "
            "trainer's environment: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD."
        ),
    )
    log_files: bool = Field(
        default=True,
        description=(
            "logFiles uploads the run's report.md, loss.png, metrics.json and result.json to the "
            "MLflow run's artifact store (through the server when it proxies artifacts, the "
            "default of `mlflow server`). The models stay in output.uri; their URIs are tags."
        ),
    )


class WandbSpec(ApiModel):
    """A Weights & Biases project."""

    project: str = Field(
        min_length=1, max_length=128, description="project is the W&B project the run goes in."
    )
    entity: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="entity is the W&B team or user; default: the API key's default entity.",
    )
    mode: Literal["online", "offline"] = Field(
        default="online",
        description=(
            "mode online sends the run to W&B as it trains; offline writes it into the run's "
            "folder (<output>/runs/<runId>/wandb/), to upload later with `wandb sync`."
        ),
    )
    base_url: TrackingUri | None = Field(
        default=None,
        description="baseUrl is a self-hosted W&B server; default: https://api.wandb.ai.",
    )
    run_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="runName is the W&B run's display name; default: <name>-<runId>.",
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        max_length=32,
        description="tags are added to the W&B run.",
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret in the job's own namespace whose keys become the "
            "trainer's environment: WANDB_API_KEY (not needed offline)."
        ),
    )


class TrackingSpec(ApiModel):
    """Experiment trackers for the run; each is optional."""

    mlflow: MlflowSpec | None = Field(default=None, description="mlflow is an MLflow server.")
    wandb: WandbSpec | None = Field(default=None, description="wandb is a W&B project.")
