"""The contract between the operator and the trainer.

Operator -> trainer: a `TrainerConfig` (the resolved spec, the run id and the output prefix),
mounted from a ConfigMap. Trainer -> operator: a `TrainerResult`, written as compact JSON to the
pod's termination message (at most 4,096 bytes) and in full to `result.json` in storage. The
trainer's exit code says how it ended, so that a Job's podFailurePolicy can stop retrying
failures that a retry cannot fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from typing import Literal

from pydantic import Field

from kubetune.api.base import ApiModel
from kubetune.api.profile import ModelCacheSpec, Pricing
from kubetune.api.resource import API_VERSION, FineTuneJob
from kubetune.api.spec import (
    CLOUD_SCHEMES,
    CREDENTIAL_ENV,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_VIRTUAL_TOKENS,
    LORA_METHODS,
    VIRTUAL_TOKEN_METHODS,
    FineTuneJobSpec,
    LoraSpec,
    QuantizationSpec,
)
from kubetune.api.status import Artifacts, GateResult, MetricsStatus
from kubetune.api.types import RUN_ID_LENGTH

TERMINATION_MESSAGE_LIMIT = 4096


class ExitCode(IntEnum):
    """How the trainer process ended."""

    SUCCEEDED = 0
    RUNTIME_ERROR = 1  # anything a retry may fix: OOM, preemption, storage hiccup
    INVALID_SPEC = 2  # the config cannot work; a retry would fail the same way
    DATA_ERROR = 3  # the dataset is unreadable or empty; a retry would fail the same way
    GATES_FAILED = 4  # trained and evaluated, but a gate failed; nothing promoted
    DIVERGED = 5  # the training loss became NaN or infinite; the same settings diverge again
    PEER_LOST = 6  # another process of a distributed run died or stopped answering; retryable


@dataclass(frozen=True)
class ExitMeaning:
    """What an exit code means to the operator: the status reason, and whether a retry can help."""

    reason: str
    permanent: bool  # the Job fails at once (podFailurePolicy FailJob) instead of retrying


# The one table of exit codes: the Job's podFailurePolicy, the status reasons and the docs read it.
EXIT_CODES: dict[ExitCode, ExitMeaning] = {
    ExitCode.SUCCEEDED: ExitMeaning("Succeeded", permanent=False),
    ExitCode.RUNTIME_ERROR: ExitMeaning("TrainerFailed", permanent=False),
    ExitCode.INVALID_SPEC: ExitMeaning("InvalidSpec", permanent=True),
    ExitCode.DATA_ERROR: ExitMeaning("DataError", permanent=True),
    ExitCode.GATES_FAILED: ExitMeaning("GatesFailed", permanent=True),
    ExitCode.DIVERGED: ExitMeaning("Diverged", permanent=True),
    ExitCode.PEER_LOST: ExitMeaning("TrainerFailed", permanent=False),
}
PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(
    int(code) for code, meaning in EXIT_CODES.items() if meaning.permanent
)


def credential_routes(
    spec: FineTuneJobSpec, cache: ModelCacheSpec | None = None
) -> list[tuple[str, str]]:
    """(URI, environment prefix) for each storage URI of a run whose credentials the pod has
    from a Secret (spec.secrets() loads them under these prefixes): the source's own Secret,
    else the output's. A URI with neither uses the pod's identity (the default chain)."""
    fallback = CREDENTIAL_ENV["output"] if spec.output.credentials_secret else None
    routes: list[tuple[str, str]] = []

    def add(uri: str | None, own: str | None, source: str) -> None:
        prefix = CREDENTIAL_ENV[source] if own else fallback
        if uri and uri.startswith(CLOUD_SCHEMES) and prefix:
            routes.append((uri, prefix))

    add(spec.model.uri, spec.model.credentials_secret, "model")
    data = spec.dataset
    for uri in (data.uri, data.validation_uri, data.test_uri, spec.evaluation.regression_uri):
        add(uri, data.credentials_secret, "dataset")
    add(spec.output.uri, spec.output.credentials_secret, "output")
    if cache is not None and cache.uri:
        add(cache.uri, cache.credentials_secret, "cache")
    return routes


def spec_hash(job: FineTuneJob) -> str:
    """What defines a run: the spec without `suspend` (pausing a run does not make a new one) and
    `notify` (where promotions are announced is not what is trained).
    Unset optional fields are left out, so that a release adding one does not change the hash
    of every existing spec (which would start a new run of each finished job)."""
    text = job.spec.model_dump_json(by_alias=True, exclude={"suspend", "notify"}, exclude_none=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_run_id(uid: str, generation: int) -> str:
    """The run id of one generation of one FineTuneJob: stable across operator restarts."""
    return hashlib.sha256(f"{uid}/{generation}".encode()).hexdigest()[:RUN_ID_LENGTH]


def child_name(job_name: str, run_id: str) -> str:
    """The name of the Job and ConfigMap of a run (at most 63 characters by construction)."""
    return f"{job_name}-{run_id}"


def run_prefix(output_uri: str, run_id: str) -> str:
    """Where one run's checkpoints and artifacts go."""
    return f"{output_uri.rstrip('/')}/runs/{run_id}"


def resolve_spec(spec: FineTuneJobSpec, world_size: int = 1) -> FineTuneJobSpec:
    """Fill the per-method defaults so the trainer gets a config with no open choices.
    world_size: the processes that share each step's batch (the default micro-batch is the
    batch divided among them)."""
    method = spec.method
    hp = spec.hyperparameters
    method_updates: dict[str, object] = {}
    if method.type in LORA_METHODS and method.lora is None:
        method_updates["lora"] = LoraSpec()
    if method.type == "qlora" and method.quantization is None:
        method_updates["quantization"] = QuantizationSpec()
    if method.type in VIRTUAL_TOKEN_METHODS and method.virtual_tokens is None:
        method_updates["virtual_tokens"] = DEFAULT_VIRTUAL_TOKENS
    hp_updates: dict[str, object] = {}
    if hp.epochs is None and hp.max_steps is None:
        hp_updates["epochs"] = DEFAULT_EPOCHS
    if hp.learning_rate is None:
        hp_updates["learning_rate"] = DEFAULT_LEARNING_RATE[method.type]
    if hp.micro_batch_size is None:
        hp_updates["micro_batch_size"] = max(1, hp.batch_size // world_size)
    if hp.gradient_checkpointing is None:
        hp_updates["gradient_checkpointing"] = method.type in ("qlora", "full")
    return spec.model_copy(
        update={
            "method": method.model_copy(update=method_updates),
            "hyperparameters": hp.model_copy(update=hp_updates),
        }
    )


class TrainerConfig(ApiModel):
    """What the operator hands the trainer: one run of one FineTuneJob, fully resolved."""

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(
        default=API_VERSION, alias="apiVersion", description="apiVersion is kubetune.dev/v1alpha1."
    )
    kind: Literal["TrainerConfig"] = Field(
        default="TrainerConfig", description="kind is TrainerConfig."
    )
    job_name: str = Field(description="jobName is the FineTuneJob's name.")
    namespace: str | None = Field(
        default=None, description="namespace is the FineTuneJob's namespace."
    )
    run_id: str = Field(
        pattern=rf"^[0-9a-f]{{{RUN_ID_LENGTH}}}$", description="runId names this run."
    )
    output_prefix: str = Field(description="outputPrefix is <output.uri>/runs/<runId>.")
    spec: FineTuneJobSpec = Field(description="spec is the resolved FineTuneJob spec.")
    metrics_port: int = Field(
        default=9090,
        ge=0,
        le=65535,
        description="metricsPort serves Prometheus metrics; 0 turns them off.",
    )
    termination_message_path: str | None = Field(
        default=None, description="terminationMessagePath receives the compact result when set."
    )
    world_size: int | None = Field(
        default=None,
        ge=2,
        description=(
            "worldSize is the number of trainer processes of a distributed run (pods times "
            "processes per pod); omitted for one process. The trainer checks it against the "
            "processes it was launched with."
        ),
    )

    spec_hash: str | None = Field(
        default=None,
        description=(
            "specHash identifies the FineTuneJob's own spec (what names the run); latest.json "
            "records it."
        ),
    )
    model_cache: ModelCacheSpec | None = Field(
        default=None,
        description=(
            "modelCache is the profile's shared model cache: the base model is staged there once "
            "and loaded from there by later runs."
        ),
    )
    pricing: Pricing | None = Field(
        default=None,
        description=(
            "pricing is the profile's, for the estimated cost in report.md (this pod's; "
            "status.usage has every attempt's)."
        ),
    )

    @classmethod
    def for_job(
        cls, job: FineTuneJob, run_id: str, world_size: int | None = None, **fields: object
    ) -> TrainerConfig:
        """world_size: the processes the run is launched with; default the spec's."""
        world = world_size or job.spec.world_size()
        return cls(
            job_name=job.metadata.name,
            namespace=job.metadata.namespace,
            run_id=run_id,
            output_prefix=run_prefix(job.spec.output.uri, run_id),
            spec=resolve_spec(job.spec, world),
            world_size=world if world > 1 else None,
            **fields,
        )


Outcome = Literal["Succeeded", "GatesFailed", "Failed"]


class TrainerResult(ApiModel):
    """What the trainer reports back when it ends."""

    run_id: str = Field(description="runId is the run this result belongs to.")
    outcome: Outcome = Field(description="outcome is Succeeded, GatesFailed or Failed.")
    exit_code: ExitCode = Field(description="exitCode is the trainer's exit code.")
    message: str = Field(default="", description="message says what happened, in one line.")
    steps: int | None = Field(default=None, ge=0, description="steps is the optimizer steps done.")
    epochs: float | None = Field(
        default=None, ge=0, description="epochs is the fractional epochs done."
    )
    train_seconds: float | None = Field(
        default=None, ge=0, description="trainSeconds is training wall time."
    )
    tokens: int | None = Field(
        default=None,
        ge=0,
        description=(
            "tokens is the real (not padding) tokens trained, every process's, counted from "
            "the start of the run across resumes."
        ),
    )
    resumed_from_step: int | None = Field(
        default=None,
        ge=0,
        description="resumedFromStep is the checkpoint step training resumed from.",
    )
    tokens_per_second: float | None = Field(
        default=None,
        ge=0,
        description=(
            "tokensPerSecond is the real tokens trained per second of training wall time, in "
            "this attempt (every process's)."
        ),
    )
    metrics: MetricsStatus | None = Field(
        default=None, description="metrics of the final evaluation."
    )
    gates: list[GateResult] = Field(default_factory=list, description="gates are the verdicts.")
    artifacts: Artifacts | None = Field(default=None, description="artifacts are the output URIs.")
    promoted: bool = Field(
        default=False, description="promoted is whether latest.json now names this run."
    )
    promoted_at: datetime | None = Field(
        default=None, description="promotedAt is when latest.json was written, when promoted."
    )
    previous_run_id: str | None = Field(
        default=None,
        description="previousRunId is the run latest.json named before this one, when promoted.",
    )
    truncated: bool = Field(
        default=False,
        description=(
            "truncated is set when fields were dropped to fit the termination message; see "
            "result.json."
        ),
    )
    warnings: list[str] = Field(
        default_factory=list,
        description=(
            "warnings are what a user should know about the run's numbers (e.g. test answers "
            "that also occur in the training data)."
        ),
    )
    rank: int | None = Field(
        default=None,
        ge=0,
        description="rank is the process of a distributed run whose failure this result reports.",
    )

    def to_termination_message(self, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
        """Compact JSON that fits the kubelet's termination message, shedding detail if needed."""
        candidate = self
        for shed in (
            {},
            {"message": self.message[:512]},
            {"warnings": [w[:200] for w in self.warnings[:2]]},
            {"artifacts": Artifacts(manifest_uri=(self.artifacts or Artifacts()).manifest_uri)},
            {"message": self.message[:128]},
        ):
            if shed:
                candidate = candidate.model_copy(update={**shed, "truncated": True})
            text = _compact(candidate)
            if len(text.encode()) <= limit:
                return text
        raise ValueError(f"result does not fit a {limit}-byte termination message")


def _compact(model: ApiModel) -> str:
    return json.dumps(model.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
