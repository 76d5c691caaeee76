"""Operator settings: one object, read from KUBETUNE_* environment variables at start-up."""

from __future__ import annotations

from importlib.metadata import version

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """What a platform team configures (the Helm chart sets these as environment variables)."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches all."
    )
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
    default_cpu: str | None = Field(default=None, description="CPU for jobs that set none.")
    default_memory: str | None = Field(default=None, description="Memory for jobs that set none.")
    allow_file_output: bool = Field(
        default=False,
        description="Allow file:// outputs (only useful with a shared volume; off by default).",
    )
    trainer_metrics_port: int = Field(
        default=9090, ge=1, le=65535, description="Trainer metrics port."
    )
    progress_poll_seconds: float = Field(
        default=15.0, gt=0, description="How often running trainers' metrics are read."
    )
    metrics_port: int = Field(
        default=8080, ge=0, le=65535, description="Operator metrics port; 0 turns it off."
    )
    health_port: int = Field(
        default=8081, ge=0, le=65535, description="Liveness port (/healthz); 0 turns it off."
    )
    bind_address: str = Field(
        default="0.0.0.0", description="Address the operator's HTTP endpoints listen on."
    )
