"""Operator settings: one object, read from KUBETUNE_* environment variables at start-up."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, IPvAnyNetwork, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubetune.admission.policy import ClusterPolicy

# The private ranges: every managed cluster's service, pod and node addresses are in them (the
# chart's notify.deniedCidrs; a platform team may name its cluster's own ranges instead).
PRIVATE_CIDRS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
# A host name in notify.allowedHosts: a DNS name, or *.<name> for every name under it.
AllowedHost = Annotated[
    str,
    Field(pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"),
]


class OperatorSettings(BaseSettings, ClusterPolicy):
    """What a platform team configures (the Helm chart sets these as environment variables):
    what may run (ClusterPolicy: trainer images, GPUs per job, file:// outputs, whether a
    profile is required) and how the operator runs."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore")

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty watches all."
    )
    default_cpu: str | None = Field(default=None, description="CPU for jobs that set none.")
    default_memory: str | None = Field(default=None, description="Memory for jobs that set none.")
    trainer_image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Secrets (in each job's namespace) for pulling the trainer image.",
    )
    trainer_metrics_port: int = Field(
        default=9090, ge=1, le=65535, description="Trainer metrics port."
    )
    progress_poll_seconds: float = Field(
        default=15.0, gt=0, description="How often running trainers' metrics are read."
    )
    progress_scrapes_per_second: float = Field(
        default=20.0,
        gt=0,
        description="The most trainer metrics reads per second, all jobs together (with N "
        "running jobs each is read about every max(progressPollSeconds, N / this) seconds).",
    )
    progress_scrape_concurrency: int = Field(
        default=16, ge=1, description="The most trainer metrics reads at a time."
    )
    workers: int = Field(default=4, ge=1, description="Reconciles that run at a time.")
    resync_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Each FineTuneJob that is not final is reconciled at least this often "
        "(from the cache; no API reads) even when nothing about it changed.",
    )
    retry_rate: float = Field(
        default=10.0, gt=0, description="Retries per second, all FineTuneJobs together."
    )
    retry_burst: int = Field(default=100, ge=1, description="Retries allowed in a burst.")
    list_page_size: int = Field(
        default=500, ge=1, description="Objects per page when the caches list (limit)."
    )
    leader_election: bool = Field(
        default=False,
        description="Run only while holding a coordination.k8s.io Lease (the chart turns it "
        "on and runs two replicas).",
    )
    leader_election_namespace: str = Field(
        default="", description="The Lease's namespace; empty: the pod's own (POD_NAMESPACE)."
    )
    lease_name: str = Field(default="kubetune-operator", description="The Lease's name.")
    lease_duration_seconds: int = Field(
        default=15, ge=2, description="How long a standby waits before taking over."
    )
    renew_deadline_seconds: int = Field(
        default=10, ge=1, description="How long the leader tries to renew before it quits."
    )
    retry_period_seconds: int = Field(
        default=2, ge=1, description="How often the Lease is renewed or tried."
    )
    notify_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How long one POST to a promotion webhook may take, all of it (connect, "
        "TLS, the answer), before the attempt counts as failed.",
    )
    notify_denied_cidrs: list[IPvAnyNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(c) for c in PRIVATE_CIDRS],
        description="Address ranges a promotion webhook may not reach (the cluster's service, "
        "pod and node ranges); loopback, link-local (the metadata service), unspecified, "
        "multicast and reserved addresses are refused whatever this says.",
    )
    notify_allowed_cidrs: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Address ranges a promotion webhook may reach even when they are denied "
        "(loopback and link-local included: name them narrowly).",
    )
    notify_allowed_hosts: list[AllowedHost] = Field(
        default_factory=list,
        description="Host names (or *.<suffix>) a promotion webhook may reach even when they "
        "resolve into notify_denied_cidrs (never to loopback, link-local, unspecified, multicast "
        "or reserved addresses).",
    )
    notify_max_attempts: int = Field(
        default=12, ge=1, description="POSTs of a promotion notification before it is Failed."
    )
    notify_backoff_seconds: float = Field(
        default=10.0, gt=0, description="The wait after a failed POST; doubles after each."
    )
    notify_backoff_max_seconds: float = Field(
        default=600.0, gt=0, description="The longest wait between two POSTs."
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

    @model_validator(mode="after")
    def _leader_times(self) -> OperatorSettings:
        # client-go's NewLeaderElector checks: the leader must give up before its Lease can
        # expire, and must get more than one try within its renew deadline (leader.py).
        retry, renew, lease = (
            self.retry_period_seconds,
            self.renew_deadline_seconds,
            self.lease_duration_seconds,
        )
        if not retry < renew < lease:
            raise ValueError(
                "leader election needs retry_period_seconds < renew_deadline_seconds < "
                f"lease_duration_seconds (now {retry}, {renew}, {lease})"
            )
        return self
