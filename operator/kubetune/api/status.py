"""`FineTuneJob.status` and the parts of it the trainer produces: metrics, gates, artifacts.

Status types are written by the operator and read by people, `kubectl`, Argo CD and Flux. Optional
fields are `nullable` in the CRD so that the operator can clear them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import ConfigDict, Field

from kubetune.api.base import ApiModel
from kubetune.api.spec import Metric


class StatusModel(ApiModel):
    """Status types are read back from the API server, where timestamps are strings."""

    model_config = ConfigDict(strict=False)


Phase = Literal["Pending", "Queued", "Running", "Evaluating", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = get_args(Phase)
FINAL_PHASES: tuple[str, ...] = ("Succeeded", "Failed")  # a run in one of these never changes
Bound = Literal["min", "max", "minImprovement", "maxRegression"]


class Condition(StatusModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        description="type of the condition: Ready, Running, Complete, ...",
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="status is True, False or Unknown."
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="reason is a CamelCase word for the cause, e.g. InvalidSpec or GatesFailed.",
    )
    message: str = Field(
        default="", max_length=32768, description="message says what happened, for people."
    )
    last_transition_time: datetime = Field(
        description="lastTransitionTime is when status last changed."
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="observedGeneration is the spec generation the condition describes.",
    )


class Progress(StatusModel):
    """Training progress, read from the trainer's metrics while it runs."""

    step: int = Field(default=0, ge=0, description="step is the optimizer steps done.")
    total_steps: int | None = Field(
        default=None, ge=0, description="totalSteps is the steps the run will take."
    )
    percent: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="percent is step / totalSteps as a whole percentage.",
    )
    epoch: float | None = Field(
        default=None, ge=0, description="epoch is the fractional epoch reached."
    )
    loss: float | None = Field(default=None, description="loss is the latest training loss.")
    tokens_per_second: float | None = Field(
        default=None, ge=0, description="tokensPerSecond is the training throughput."
    )
    eta_seconds: int | None = Field(
        default=None, ge=0, description="etaSeconds estimates the time left."
    )
    tokens: int | None = Field(
        default=None,
        ge=0,
        description=(
            "tokens is the real (not padding) tokens trained so far, every process's; a resumed "
            "run counts from its checkpoint."
        ),
    )
    updated_at: datetime | None = Field(
        default=None, description="updatedAt is when this was read."
    )


class EvalMetrics(StatusModel):
    """Metric values of one model on the test set."""

    loss: float | None = Field(default=None, description="loss is the mean token cross-entropy.")
    perplexity: float | None = Field(default=None, ge=0, description="perplexity is exp(loss).")
    rouge_l: float | None = Field(
        default=None, ge=0, le=1, description="rougeL is the ROUGE-L F1 (0-1)."
    )
    bleu: float | None = Field(
        default=None, ge=0, le=100, description="bleu is the corpus BLEU (0-100)."
    )
    exact_match: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="exactMatch is the fraction of answers equal to the reference.",
    )


class RegressionMetrics(StatusModel):
    """Metrics on the regression set (evaluation.regressionUri): general behaviour that tuning
    must not make worse."""

    tuned: EvalMetrics | None = Field(default=None, description="tuned is the tuned model's.")
    base: EvalMetrics | None = Field(default=None, description="base is the base model's.")
    promoted: EvalMetrics | None = Field(
        default=None, description="promoted is the promoted run's (the champion's)."
    )


class MetricsStatus(StatusModel):
    """Evaluation results of the tuned model and, when compared, of the base model."""

    tuned: EvalMetrics | None = Field(
        default=None, description="tuned holds the tuned model's metrics."
    )
    base: EvalMetrics | None = Field(
        default=None, description="base holds the base model's metrics."
    )
    promoted: EvalMetrics | None = Field(
        default=None,
        description=(
            "promoted holds the promoted run's metrics on this run's test set (the champion, "
            "when a gate compares with it)."
        ),
    )
    promoted_run_id: str | None = Field(
        default=None, description="promotedRunId is the champion's run id."
    )
    regression: RegressionMetrics | None = Field(
        default=None,
        description=(
            "regression holds the metrics on evaluation.regressionUri (the forgetting check), "
            "when it is set."
        ),
    )


class GateResult(StatusModel):
    """The verdict of one gate."""

    metric: Metric = Field(description="metric is the gated metric.")
    bound: Bound = Field(description="bound is min, max, minImprovement or maxRegression.")
    threshold: float = Field(description="threshold is the bound's value from the spec.")
    value: float | None = Field(
        default=None,
        description=(
            "value is what was observed: the tuned value for min and max, the improvement over "
            "the reference for minImprovement and maxRegression (negative: worse); null when the "
            "metric could not be computed."
        ),
    )
    passed: bool = Field(description="passed is whether the gate held.")
    compared_with: str | None = Field(
        default=None,
        description=(
            "comparedWith is the reference of minImprovement and maxRegression: base, promoted "
            "<runId>, or base (nothing promoted yet)."
        ),
    )
    eval_set: Literal["regression"] | None = Field(
        default=None,
        description="evalSet is regression for a gate on the regression set (unset: test set).",
    )


class Artifacts(StatusModel):
    """Where the run's outputs are."""

    adapter_uri: str | None = Field(
        default=None, description="adapterUri is the adapter (PEFT format) prefix."
    )
    merged_uri: str | None = Field(
        default=None, description="mergedUri is the merged model prefix, when exported."
    )
    manifest_uri: str | None = Field(
        default=None,
        description="manifestUri is manifest.json: size and sha256 of every file, written last.",
    )
    report_uri: str | None = Field(
        default=None, description="reportUri is the model card report.md."
    )
    result_uri: str | None = Field(
        default=None, description="resultUri is result.json, the full result."
    )


class PodPhase(StatusModel):
    """One trainer pod of a distributed run: its index (node rank), its newest pod, its phase."""

    index: int = Field(ge=0, description="index is the pod's completion index, its node rank.")
    name: str = Field(description="name is the newest pod of this index.")
    phase: str = Field(description="phase is the pod's phase: Pending, Running, Succeeded, ...")


class DistributedStatus(StatusModel):
    """The shape of a distributed run."""

    nodes: int = Field(ge=1, description="nodes is the number of trainer pods.")
    world_size: int = Field(ge=1, description="worldSize is the number of trainer processes.")
    strategy: Literal["ddp", "fsdp"] = Field(description="strategy is ddp or fsdp, resolved.")
    pods: list[PodPhase] = Field(
        default_factory=list, max_length=64, description="pods are the trainer pods, by index."
    )


class ProfileRef(StatusModel):
    """The FineTuneProfile a run was resolved against, at the generation it had then."""

    name: str = Field(description="name of the FineTuneProfile.")
    generation: int = Field(
        ge=0,
        description=(
            "generation of the profile the run started with: a later change of the profile "
            "applies to later runs, never to this one."
        ),
    )


class NotificationStatus(StatusModel):
    """The promotion's webhook delivery (spec.notify.webhook)."""

    id: str = Field(
        description="id is the CloudEvent's id, the same in every attempt (receivers drop repeats)."
    )
    state: Literal["Pending", "Delivered", "Failed"] = Field(
        description=(
            "state is Pending (to be sent, or retried at nextAttemptTime), Delivered (the "
            "receiver answered 2xx) or Failed (every attempt failed; see message)."
        )
    )
    attempts: int = Field(default=0, ge=0, description="attempts counts the POSTs made.")
    last_attempt_time: datetime | None = Field(
        default=None, description="lastAttemptTime is when the last POST was made."
    )
    next_attempt_time: datetime | None = Field(
        default=None, description="nextAttemptTime is when a Pending delivery is tried again."
    )
    message: str | None = Field(
        default=None, description="message says why the last attempt failed, when it did."
    )


class PromotionStatus(StatusModel):
    """The run's promotion: latest.json names it."""

    latest_uri: str = Field(description="latestUri is the latest.json that names this run.")
    promoted_at: datetime | None = Field(
        default=None, description="promotedAt is when latest.json was written."
    )
    previous_run_id: str | None = Field(
        default=None,
        description="previousRunId is the run latest.json named before (the one to roll back to).",
    )
    notification: NotificationStatus | None = Field(
        default=None, description="notification is the webhook delivery, when spec.notify sets one."
    )


MAX_USAGE_PODS = 64  # pods listed in status.usage.pods; older finished ones are summed up


class PodUsage(StatusModel):
    """One trainer pod of the run and what it held while its trainer container ran."""

    name: str = Field(description="name of the pod.")
    gpus: int = Field(default=0, ge=0, description="gpus is the GPUs the pod's trainer holds.")
    cpu: float = Field(default=0, ge=0, description="cpu is the trainer's CPU request, in cores.")
    started_at: datetime = Field(description="startedAt is when the trainer container started.")
    finished_at: datetime | None = Field(
        default=None,
        description=(
            "finishedAt is when it ended (its terminated state, or when the pod was seen "
            "deleted); unset while it runs."
        ),
    )


class EarlierUsage(StatusModel):
    """The oldest finished pods, summed once usage.pods could not list them all."""

    pods: int = Field(ge=0, description="pods is how many.")
    gpu_seconds: float = Field(ge=0, description="gpuSeconds is their GPU-seconds.")
    cpu_seconds: float = Field(ge=0, description="cpuSeconds is their CPU-seconds.")
    last_started_at: datetime = Field(
        description=(
            "lastStartedAt and lastPod name the newest pod summed here: a pod that is not in "
            "usage.pods and sorts at or before it (by start, then name) is already counted."
        )
    )
    last_pod: str = Field(description="lastPod is that pod's name.")


class Usage(StatusModel):
    """What the run used, for chargeback: every pod of every attempt, preemptions and retries
    included."""

    gpu_seconds: float = Field(
        default=0,
        ge=0,
        description=(
            "gpuSeconds sums, over every trainer pod of the run, its GPUs times the time its "
            "trainer container ran (scheduling and image pulls are not counted)."
        ),
    )
    cpu_seconds: float = Field(
        default=0,
        ge=0,
        description="cpuSeconds sums each trainer pod's CPU request (cores) times its run time.",
    )
    tokens: int | None = Field(
        default=None,
        ge=0,
        description="tokens is the real (not padding) tokens trained, every process's.",
    )
    wall_seconds: float | None = Field(
        default=None,
        ge=0,
        description=(
            "wallSeconds is the time from the first trainer start to the run's end (or asOf)."
        ),
    )
    estimated_cost: float | None = Field(
        default=None,
        ge=0,
        description=(
            "estimatedCost is gpuSeconds and cpuSeconds priced at the profile's pricing, when it "
            "sets one (the price of the profile generation the run started with)."
        ),
    )
    currency: str | None = Field(
        default=None, description="currency of estimatedCost, as the profile's pricing names it."
    )
    as_of: datetime | None = Field(
        default=None,
        description=(
            "asOf is when the running pods were last counted: at each status update (each "
            "progress reading while training). Final once the run has ended and its pods with it."
        ),
    )
    pods: list[PodUsage] = Field(
        default_factory=list,
        max_length=MAX_USAGE_PODS,
        description="pods are the run's trainer pods that ran, oldest first.",
    )
    earlier: EarlierUsage | None = Field(
        default=None,
        description=f"earlier sums finished pods beyond the {MAX_USAGE_PODS} that pods lists.",
    )


class FineTuneJobStatus(StatusModel):
    """The observed state of the run, written by the operator."""

    phase: Phase | None = Field(
        default=None,
        description=(
            "phase summarises the conditions: Pending, Queued, Running, Evaluating, Succeeded, "
            "Failed or Suspended."
        ),
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="conditions are the standard conditions; Ready is what GitOps tools read.",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="observedGeneration is the spec generation last acted on."
    )
    run_id: str | None = Field(
        default=None,
        description="runId names the current run; artifacts go under <output.uri>/runs/<runId>/.",
    )
    attempts: int = Field(
        default=0,
        ge=0,
        description=(
            "attempts counts the starts of this run's trainer: pods started, or for a distributed "
            "run the group's starts (the most pods any one index has had)."
        ),
    )
    job_name: str | None = Field(
        default=None, description="jobName is the batch/v1 Job running the trainer."
    )
    profile: ProfileRef | None = Field(
        default=None, description="profile is the FineTuneProfile the run was resolved against."
    )
    config_hash: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "configHash is the sha256 of the run's ConfigMap (the trainer's config and the "
            "pinned profile) as the operator wrote it. A ConfigMap with other contents is not "
            "the run's: the operator replaces it (tenants can write ConfigMaps, not status)."
        ),
    )
    start_time: datetime | None = Field(
        default=None, description="startTime is when training started."
    )
    completion_time: datetime | None = Field(
        default=None, description="completionTime is when the run finished."
    )
    progress: Progress | None = Field(default=None, description="progress of training.")
    distributed: DistributedStatus | None = Field(
        default=None,
        description="distributed shows the pods and processes of a run with more than one.",
    )
    metrics: MetricsStatus | None = Field(
        default=None, description="metrics from the final evaluation."
    )
    gates: list[GateResult] = Field(
        default_factory=list, max_length=16, description="gates are the verdict of each gate."
    )
    gates_summary: str | None = Field(
        default=None,
        description="gatesSummary is a one-word verdict for kubectl: e.g. 2/2 passed, 1/2 passed.",
    )
    artifacts: Artifacts | None = Field(
        default=None, description="artifacts are the URIs of the outputs."
    )
    promotion: PromotionStatus | None = Field(
        default=None,
        description="promotion is set when the run was promoted: latest.json names it.",
    )
    usage: Usage | None = Field(
        default=None,
        description=(
            "usage is what the run used: GPU- and CPU-seconds of every pod of every attempt, "
            "tokens trained, wall time, and an estimated cost when the profile prices it."
        ),
    )
    message: str | None = Field(default=None, description="message explains the current phase.")


def gates_summary(gates: list[GateResult]) -> str | None:
    """status.gatesSummary: e.g. "2/2 passed"; None when the run has no gates."""
    if not gates:
        return None
    return f"{sum(g.passed for g in gates)}/{len(gates)} passed"
