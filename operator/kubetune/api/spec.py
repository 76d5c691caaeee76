"""`FineTuneJob.spec`: what to tune, on what data, how, how to judge it and where to put it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kubetune.api.base import ApiModel, Rule
from kubetune.api.compute import DistributedSpec, ResourcesSpec, Toleration
from kubetune.api.notify import NotifySpec
from kubetune.api.tracking import TrackingSpec
from kubetune.api.training import (
    ADAPTER_METHODS,
    DEFAULT_EPOCHS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_VIRTUAL_TOKENS,
    FSDP_METHODS,
    LORA_METHODS,
    MERGEABLE_METHODS,
    VIRTUAL_TOKEN_METHODS,
    HyperparametersSpec,
    LoraSpec,
    MethodSpec,
    MethodType,
    QuantizationSpec,
    cel_list,
)
from kubetune.api.types import DatasetUri, DnsLabel, DnsSubdomain, ModelUri, OutputUri

__all__ = [
    "ADAPTER_METHODS",
    "CLOUD_SCHEMES",
    "CREDENTIAL_ENV",
    "DEFAULT_EPOCHS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_VIRTUAL_TOKENS",
    "LORA_METHODS",
    "LOWER_IS_BETTER",
    "MERGEABLE_METHODS",
    "VIRTUAL_TOKEN_METHODS",
    "DatasetSpec",
    "DistributedSpec",
    "EvaluationSpec",
    "FineTuneJobSpec",
    "GateSpec",
    "HyperparametersSpec",
    "LoraSpec",
    "MethodSpec",
    "MethodType",
    "Metric",
    "ModelSpec",
    "OutputSpec",
    "QuantizationSpec",
    "ResourcesSpec",
    "Toleration",
    "TrackingSpec",
]

CLOUD_SCHEMES = ("s3://", "gs://", "az://")
# Where each storage source's credentials are in the trainer's environment: the Secret's keys
# under this prefix (envFrom's prefix). The trainer reads them for that source's URIs only.
CREDENTIAL_ENV = {
    "model": "KUBETUNE_MODEL_",
    "dataset": "KUBETUNE_DATASET_",
    "output": "KUBETUNE_OUTPUT_",
    "cache": "KUBETUNE_CACHE_",
}

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DatasetFormat = Literal["auto", "alpaca", "chat", "completion", "text"]
Metric = Literal["loss", "perplexity", "rougeL", "bleu", "exactMatch"]

# Metrics where a lower value is better; gate improvements are measured the other way round.
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss", "perplexity"})


class TokenSecret(ApiModel):
    """A key of a Secret in the job's own namespace holding a Hugging Face access token."""

    name: DnsSubdomain = Field(description="name of the Secret.")
    key: str = Field(
        default="HF_TOKEN",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="key of the token in the Secret.",
    )


class ModelSpec(ApiModel):
    """The base model to tune."""

    __rules__ = (
        Rule(
            cel="!has(self.credentialsSecret) || self.uri.matches('^(s3|gs|az)://')",
            check=lambda s: s.credentials_secret is None or s.uri.startswith(CLOUD_SCHEMES),
            message=(
                "credentialsSecret is for s3://, gs:// and az:// models; an hf:// model takes "
                "tokenSecret"
            ),
            field=".credentialsSecret",
        ),
    )

    uri: ModelUri = Field(
        description=(
            "uri is where the base model comes from: hf://ORG/NAME (Hugging Face Hub), "
            "s3://, gs:// or az:// (a prefix holding a saved model), file:///path (a local "
            "directory), or any of these pointing at a single .gguf file."
        )
    )
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="revision is the branch, tag or commit of an hf:// model; default: main.",
    )
    dtype: Dtype = Field(
        default="auto",
        description=(
            "dtype is the precision the base model's weights are loaded in. auto picks "
            "bfloat16 on GPUs that support it; on a CPU with AMX or AVX512-BF16 it picks "
            "bfloat16 for the adapter methods (lora, dora, ia3, prefix, prompt), whose trained "
            "weights stay float32 (all but dora train under bfloat16 autocast): measured 1.1x "
            "(lora) to 1.6x (prompt) faster than float32 (docs/benchmarks.md); float32 "
            "elsewhere and for full on a CPU. qlora computes in float32 on a CPU whatever this "
            "says. The run's log and report name the precision and why."
        ),
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "trustRemoteCode allows running modelling code shipped with the model. Leave off "
            "unless you trust the model's authors."
        ),
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret in the job's namespace with the storage credentials "
            "of an s3://, gs:// or az:// model (the keys of output.credentialsSecret); "
            "default: the output's Secret, else the pod's identity."
        ),
    )
    token_secret: TokenSecret | None = Field(
        default=None,
        description=(
            "tokenSecret is the Secret (in the job's namespace) with a Hugging Face token, for "
            "gated or private hf:// models and datasets (Llama, Gemma, Mistral): the trainer "
            "gets it as HF_TOKEN. The token's account must have accepted the model's licence."
        ),
    )


class DatasetSpec(ApiModel):
    """The training data and how it is split into train, validation and test sets."""

    __rules__ = (
        Rule(
            cel=(
                "!has(self.credentialsSecret) || self.uri.matches('^(s3|gs|az)://') || "
                "(has(self.validationUri) && self.validationUri.matches('^(s3|gs|az)://')) || "
                "(has(self.testUri) && self.testUri.matches('^(s3|gs|az)://'))"
            ),
            check=lambda s: (
                s.credentials_secret is None
                or any(
                    (u or "").startswith(CLOUD_SCHEMES)
                    for u in (s.uri, s.validation_uri, s.test_uri)
                )
            ),
            message=(
                "credentialsSecret is for data files at s3://, gs:// or az://; an "
                "hf://datasets/ dataset takes model.tokenSecret"
            ),
            field=".credentialsSecret",
        ),
        Rule(
            cel="self.validationSplit + self.testSplit < 1.0",
            check=lambda s: s.validation_split + s.test_split < 1.0,
            message="validationSplit + testSplit must be below 1 so that data is left to train on",
            field=".testSplit",
        ),
        Rule(
            cel="has(self.testUri) || self.testSplit > 0.0",
            check=lambda s: s.test_uri is not None or s.test_split > 0.0,
            message="evaluation needs a test set: set testUri or a testSplit above 0",
            field=".testSplit",
        ),
        Rule(
            cel=(
                "!(has(self.chatTemplate) || has(self.systemPrompt)) || "
                "self.format in ['auto', 'alpaca', 'chat']"
            ),
            check=lambda s: (
                (s.chat_template is None and s.system_prompt is None)
                or s.format in ("auto", "alpaca", "chat")
            ),
            message=(
                "chatTemplate and systemPrompt apply only to the alpaca and chat formats "
                "(completion prompts are used as written, text has none)"
            ),
            field=".chatTemplate",
        ),
    )

    uri: DatasetUri = Field(
        description=(
            "uri is the training data: a .jsonl, .json, .csv or .parquet file at s3://, gs://, "
            "az://, https:// or file:///, or hf://datasets/ORG/NAME[/path]. A URI ending in / "
            "(s3://, gs://, az://, file:///) names the newest such file under that prefix (the "
            "latest modification time; the greatest key on a tie), chosen when the run starts "
            "and kept for its resumes; the same holds for validationUri, testUri and "
            "evaluation.regressionUri."
        )
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret in the job's namespace with the storage credentials "
            "of the s3://, gs:// or az:// data files (uri, validationUri, testUri; the keys of "
            "output.credentialsSecret); default: the output's Secret, else the pod's identity."
        ),
    )
    max_file_bytes: int | None = Field(
        default=None,
        ge=1,
        description=(
            "maxFileBytes is the largest size in bytes of each data file (uri, validationUri, "
            "testUri, evaluation.regressionUri), checked before it is downloaded; default "
            "4 GiB."
        ),
    )
    format: DatasetFormat = Field(
        default="auto",
        description=(
            "format is how records are laid out: alpaca (instruction/input/output), chat "
            "(messages with role/content), completion (prompt/completion), text (plain text). "
            "auto detects it from the first records and reports what it chose."
        ),
    )
    validation_uri: DatasetUri | None = Field(
        default=None,
        description=(
            "validationUri is a separate validation file; when set, validationSplit is unused."
        ),
    )
    test_uri: DatasetUri | None = Field(
        default=None,
        description="testUri is a separate held-out test file; when set, testSplit is unused.",
    )
    validation_split: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "validationSplit is the fraction of the data held out to measure eval loss during "
            "training (0 disables it)."
        ),
    )
    test_split: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description=(
            "testSplit is the fraction of the data held out for the final evaluation and gates."
        ),
    )
    seed: int = Field(
        default=42, ge=0, description="seed makes the shuffle and the split reproducible."
    )
    max_seq_length: int = Field(
        default=1024,
        ge=16,
        le=131072,
        description=(
            "maxSeqLength is the most tokens in one training example; longer ones are dropped."
        ),
    )
    packing: bool = Field(
        default=False,
        description=(
            "packing trains padding-free: each micro-batch becomes one sequence, with "
            "positions restarting per example so that examples do not attend to each other. "
            "Not for prefix or prompt tuning."
        ),
    )
    dedupe: bool = Field(
        default=True, description="dedupe drops exact duplicate records before splitting."
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=16384,
        description=(
            "chatTemplate is how alpaca and chat records become prompts: tokenizer (the "
            "model's own chat template, or plain when it has none; the default), plain "
            "(### User: / ### Assistant: text, no special tokens), chatml, or an inline Jinja "
            "chat template (Hugging Face syntax). The exported tokenizer carries it."
        ),
    )
    system_prompt: str | None = Field(
        default=None,
        max_length=8192,
        description=(
            "systemPrompt is a system message put before each example's messages (records "
            "that have one keep theirs). It replaces any default system prompt the template "
            "adds (SmolLM2's does); an empty string gives an empty system turn."
        ),
    )


class EvaluationSpec(ApiModel):
    """How the tuned model (and the base model) are evaluated on the test set."""

    metrics: list[Metric] = Field(
        default=["loss", "perplexity"],
        min_length=1,
        max_length=5,
        json_schema_extra={"uniqueItems": True},
        description=(
            "metrics to compute: loss and perplexity (teacher-forced), rougeL, bleu and "
            "exactMatch (on greedy generations)."
        ),
    )

    @field_validator("metrics")
    @classmethod
    def _no_duplicates(cls, metrics: list[str]) -> list[str]:
        duplicates = sorted({m for m in metrics if metrics.count(m) > 1})
        if duplicates:
            raise ValueError(f"lists {', '.join(duplicates)} more than once; list each metric once")
        return metrics

    max_samples: int = Field(
        default=200, ge=1, le=100_000, description="maxSamples caps the test examples evaluated."
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="maxNewTokens caps each generated answer."
    )
    compare_with_base: bool = Field(
        default=True,
        description=(
            "compareWithBase also evaluates the untuned base model, for minImprovement gates and "
            "the report."
        ),
    )
    regression_uri: DatasetUri | None = Field(
        default=None,
        description=(
            "regressionUri is a second evaluation set of general behaviour the tuned model must "
            "not forget (a .jsonl, .json, .csv or .parquet file, any format the dataset may "
            "have, read with the dataset's credentials). The tuned model, the base model and "
            "(when a gate compares with it) the promoted run are evaluated on it too, up to "
            "maxSamples examples; gates with evalSet: regression bound how much worse the tuned "
            "model may get on it."
        ),
    )


class GateSpec(ApiModel):
    """A promotion gate: a bound on one evaluated metric. Exactly one bound is set."""

    __rules__ = (
        Rule(
            cel=(
                "(has(self.min) ? 1 : 0) + (has(self.max) ? 1 : 0)"
                " + (has(self.minImprovement) ? 1 : 0) + (has(self.maxRegression) ? 1 : 0) == 1"
            ),
            check=lambda s: [s.min, s.max, s.min_improvement, s.max_regression].count(None) == 3,
            message="a gate sets exactly one of min, max, minImprovement or maxRegression",
        ),
        Rule(
            cel=("!has(self.compareWith) || has(self.minImprovement) || has(self.maxRegression)"),
            check=lambda s: (
                s.compare_with is None
                or s.min_improvement is not None
                or s.max_regression is not None
            ),
            message=(
                "compareWith applies to minImprovement and maxRegression (min and max bound the "
                "tuned value itself)"
            ),
            field=".compareWith",
        ),
    )

    metric: Metric = Field(description="metric is the evaluated metric the gate tests.")
    min: float | None = Field(
        default=None, description="min passes when the tuned value is at least this."
    )
    max: float | None = Field(
        default=None, description="max passes when the tuned value is at most this."
    )
    min_improvement: float | None = Field(
        default=None,
        description=(
            "minImprovement passes when the tuned model beats the reference (compareWith) by at "
            "least this much: tuned minus reference for rougeL, bleu and exactMatch; reference "
            "minus tuned for loss and perplexity, where lower is better."
        ),
    )
    max_regression: float | None = Field(
        default=None,
        ge=0,
        description=(
            "maxRegression passes when the tuned model is worse than the reference "
            "(compareWith) by at most this much (0: not worse), measured as minImprovement is."
        ),
    )
    compare_with: Literal["base", "promoted"] | None = Field(
        default=None,
        description=(
            "compareWith is the reference of minImprovement and maxRegression: base (the "
            "untuned base model, the default) or promoted (the run <output.uri>/latest.json "
            "names, evaluated on this run's test set: the champion). With nothing promoted yet, "
            "a promoted gate compares with the base model, or passes when the base is not "
            "evaluated (compareWithBase: false)."
        ),
    )

    eval_set: Literal["test", "regression"] | None = Field(
        default=None,
        description=(
            "evalSet is the evaluation set the gate reads: test (the held-out test set, the "
            "default) or regression (evaluation.regressionUri, the forgetting check: e.g. "
            "maxRegression 0.05 on loss against the base or the promoted run)."
        ),
    )

    def reference(self) -> Literal["base", "promoted"] | None:
        """What the gate compares with: base, promoted, or None for min and max."""
        if self.min_improvement is None and self.max_regression is None:
            return None
        return self.compare_with or "base"


class OutputSpec(ApiModel):
    """Where checkpoints and artifacts are written."""

    uri: OutputUri = Field(
        description=(
            "uri is the output prefix: s3://, gs://, az:// or file:///. Runs go under "
            "<uri>/runs/<runId>/ and <uri>/latest.json names the last run that passed its gates."
        )
    )
    merge_adapter: bool = Field(
        default=False,
        description=(
            "mergeAdapter also exports the base model with the adapter merged in (not for prefix "
            "or prompt)."
        ),
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret in the job's own namespace with the storage "
            "credentials of the output: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL, AWS_REGION, or the GOOGLE_/AZURE_STORAGE_ equivalents. The model "
            "and the data use it too unless they name their own. Unset: the pod's identity "
            "(the cloud's default credential chain)."
        ),
    )


# The world size in CEL: pods times processes per pod (nprocPerNode, else one per GPU, else one).
_CEL_WORLD = (
    "(has(self.resources.nodes) ? self.resources.nodes : 1) * "
    "(has(self.distributed) && has(self.distributed.nprocPerNode) ? "
    "self.distributed.nprocPerNode : "
    "(has(self.resources.gpus) && self.resources.gpus > 0 ? self.resources.gpus : 1))"
)
_CEL_MICRO = "(has(self.hyperparameters.microBatchSize) ? self.hyperparameters.microBatchSize : 1)"


def _batch_fits_world(spec: FineTuneJobSpec) -> bool:
    micro = spec.hyperparameters.micro_batch_size or 1
    return spec.hyperparameters.batch_size % (micro * spec.world_size()) == 0


def _batch_detail(spec: FineTuneJobSpec) -> str:
    hp = spec.hyperparameters
    given = "batch_size" in hp.model_fields_set
    batch = f"batchSize {hp.batch_size}" + ("" if given else " (the default)")
    micro = (
        f"microBatchSize {hp.micro_batch_size}"
        if hp.micro_batch_size
        else "microBatchSize unset (each process takes batchSize / world size)"
    )
    return f"here: {batch}, {micro}, world size {spec.world_size()}"


def _gates_use_evaluated_metrics(spec: FineTuneJobSpec) -> bool:
    return all(g.metric in spec.evaluation.metrics for g in spec.gates)


class FineTuneJobSpec(ApiModel):
    """The desired fine-tuning run. A changed spec starts a new run."""

    __rules__ = (
        Rule(
            cel="self.gates.all(g, g.metric in self.evaluation.metrics)",
            check=_gates_use_evaluated_metrics,
            message="every gate's metric must be listed in evaluation.metrics",
            field=".gates",
        ),
        Rule(
            cel=(
                "self.evaluation.compareWithBase || self.gates.all(g, "
                "!(has(g.minImprovement) || has(g.maxRegression)) || "
                "(has(g.compareWith) && g.compareWith == 'promoted'))"
            ),
            check=lambda s: (
                s.evaluation.compare_with_base
                or all(g.reference() in (None, "promoted") for g in s.gates)
            ),
            message=(
                "minImprovement and maxRegression gates that compare with the base need "
                "evaluation.compareWithBase: true"
            ),
            field=".gates",
        ),
        Rule(
            cel=(
                "has(self.evaluation.regressionUri) || self.gates.all(g, !has(g.evalSet) || "
                "g.evalSet != 'regression')"
            ),
            check=lambda s: (
                s.evaluation.regression_uri is not None
                or all(g.eval_set != "regression" for g in s.gates)
            ),
            message="a gate with evalSet: regression needs evaluation.regressionUri",
            field=".gates",
        ),
        Rule(
            cel=(
                "!(self.output.mergeAdapter && "
                f"self.method.type in {cel_list(VIRTUAL_TOKEN_METHODS)})"
            ),
            check=lambda s: not (s.output.merge_adapter and s.method.type in VIRTUAL_TOKEN_METHODS),
            message=(
                "prefix and prompt tuning cannot be merged into the base model; set mergeAdapter:"
                " false"
            ),
            field=".output.mergeAdapter",
        ),
        Rule(
            cel=f"!(self.dataset.packing && self.method.type in {cel_list(VIRTUAL_TOKEN_METHODS)})",
            check=lambda s: not (s.dataset.packing and s.method.type in VIRTUAL_TOKEN_METHODS),
            message=(
                "packing cannot be used with prefix or prompt tuning (their virtual tokens need "
                "one example per sequence); set dataset.packing: false"
            ),
            field=".dataset.packing",
        ),
        Rule(
            cel=(
                "!has(self.hyperparameters.earlyStoppingPatience) || "
                "has(self.dataset.validationUri) || self.dataset.validationSplit > 0.0"
            ),
            check=lambda s: (
                s.hyperparameters.early_stopping_patience is None
                or s.dataset.validation_uri is not None
                or s.dataset.validation_split > 0.0
            ),
            message=(
                "earlyStoppingPatience needs validation data: set dataset.validationUri or "
                "validationSplit"
            ),
            field=".hyperparameters.earlyStoppingPatience",
        ),
        Rule(
            cel=(
                "!has(self.distributed) || !has(self.distributed.nprocPerNode) || "
                "(has(self.resources.gpus) ? self.resources.gpus : 1) == 0 || "
                "self.distributed.nprocPerNode == "
                "(has(self.resources.gpus) ? self.resources.gpus : 1)"
            ),
            check=lambda s: (
                s.distributed is None
                or s.distributed.nproc_per_node is None
                or s.resources.gpus_per_pod() == 0
                or s.distributed.nproc_per_node == s.resources.gpus_per_pod()
            ),
            message=(
                "a pod with GPUs runs one process per GPU: omit distributed.nprocPerNode or set "
                "it to resources.gpus"
            ),
            field=".distributed.nprocPerNode",
        ),
        Rule(
            cel=(
                "!has(self.distributed) || self.distributed.strategy != 'fsdp' || "
                f"self.method.type in {cel_list(FSDP_METHODS)}"
            ),
            check=lambda s: (
                s.distributed is None
                or s.distributed.strategy != "fsdp"
                or s.method.type in FSDP_METHODS
            ),
            message=(
                f"fsdp is for method {' or '.join(FSDP_METHODS)}: adapters train with ddp, "
                "every process holding the frozen base model; set distributed.strategy: ddp "
                "or auto"
            ),
            field=".distributed.strategy",
        ),
        Rule(
            cel=f"self.hyperparameters.batchSize % ({_CEL_MICRO} * {_CEL_WORLD}) == 0",
            check=_batch_fits_world,
            message=(
                "batchSize is global: it must be a multiple of microBatchSize times the world "
                "size (resources.nodes times the processes per pod: resources.gpus, or "
                "distributed.nprocPerNode)"
            ),
            field=".hyperparameters.batchSize",
            detail=_batch_detail,
        ),
    )

    model: ModelSpec = Field(description="model is the base model to tune.")
    dataset: DatasetSpec = Field(description="dataset is the training data and its splits.")
    method: MethodSpec = Field(description="method is the fine-tuning method.")
    hyperparameters: HyperparametersSpec = Field(
        default_factory=HyperparametersSpec, description="hyperparameters of training."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="evaluation is how the tuned model is measured."
    )
    gates: list[GateSpec] = Field(
        default_factory=list,
        max_length=16,
        description="gates must all pass for the run's artifacts to be promoted (latest.json).",
    )
    output: OutputSpec = Field(description="output is where checkpoints and artifacts go.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="resources of the trainer pod."
    )
    distributed: DistributedSpec | None = Field(
        default=None,
        description=(
            "distributed says how training spreads over several processes (resources.nodes "
            "pods, one process per GPU); omitted: strategy auto."
        ),
    )
    tracking: TrackingSpec | None = Field(
        default=None,
        description=(
            "tracking sends the run's parameters, curves, results and artifact URIs to MLflow "
            "or Weights & Biases."
        ),
    )
    notify: NotifySpec | None = Field(
        default=None,
        description=(
            "notify announces a promotion of this job's runs (a webhook); changing it starts "
            "no new run."
        ),
    )
    profile: DnsLabel | None = Field(
        default=None,
        description=(
            "profile is the FineTuneProfile (cluster-scoped, written by the platform team) "
            "this job runs under: its defaults fill what the job leaves unset, its limits bound "
            "what the job sets. Omitted: the default profile offered to the namespace, if any."
        ),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description=(
            "image overrides the trainer image; the operator allows only images its policy "
            "(and the profile's allowedImages) lists."
        ),
    )
    service_account_name: DnsSubdomain | None = Field(
        default=None,
        description=(
            "serviceAccountName runs the trainer pods as this ServiceAccount of the job's "
            "namespace (e.g. one bound to a cloud role); only one that the profile's "
            "allowedServiceAccounts lists. Default: the profile's, else none (no token)."
        ),
    )
    queue_name: DnsLabel | None = Field(
        default=None,
        description=(
            "queueName is the Kueue LocalQueue to submit to; the run waits (Queued) until admitted."
        ),
    )
    suspend: bool = Field(
        default=False,
        description="suspend pauses the run (its pod is removed) until set back to false.",
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="backoffLimit is how many pod failures are retried."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="activeDeadlineSeconds fails the run when it runs longer."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="ttlSecondsAfterFinished deletes the finished trainer Job after this delay.",
    )

    def nodes(self) -> int:
        """The number of trainer pods."""
        return self.resources.nodes or 1

    def procs_per_node(self) -> int:
        """Trainer processes per pod: nprocPerNode, else one per GPU, else one."""
        if self.distributed and self.distributed.nproc_per_node:
            return self.distributed.nproc_per_node
        return max(1, self.resources.gpus_per_pod())

    def world_size(self) -> int:
        return self.nodes() * self.procs_per_node()

    def strategy(self, world_size: int | None = None) -> Literal["ddp", "fsdp"] | None:
        """ddp or fsdp for a distributed run (auto resolved), None for a single process."""
        if (world_size or self.world_size()) <= 1:
            return None
        chosen = self.distributed.strategy if self.distributed else "auto"
        if chosen == "auto":
            return "fsdp" if self.method.type == "full" else "ddp"
        return chosen

    def secrets(self) -> list[tuple[str, str, str | None]]:
        """The Secrets the trainer pod loads into its environment: (name, the field that names
        it, the prefix of its keys there). A tracker's keys come as they are; each storage
        source's under its own prefix (CREDENTIAL_ENV), so that the model, the data and the
        output can each have their own credentials."""
        named: list[tuple[str | None, str, str | None]] = []
        if self.tracking and self.tracking.mlflow:
            named.append((self.tracking.mlflow.credentials_secret, ".tracking.mlflow", None))
        if self.tracking and self.tracking.wandb:
            named.append((self.tracking.wandb.credentials_secret, ".tracking.wandb", None))
        named += [
            (self.model.credentials_secret, ".model", CREDENTIAL_ENV["model"]),
            (self.dataset.credentials_secret, ".dataset", CREDENTIAL_ENV["dataset"]),
            (self.output.credentials_secret, ".output", CREDENTIAL_ENV["output"]),
        ]
        return [
            (name, f"spec{path}.credentialsSecret", prefix) for name, path, prefix in named if name
        ]
