"""`spec.method` and `spec.hyperparameters`: how the model is tuned."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.api.base import ApiModel, Rule

MethodType = Literal["lora", "qlora", "dora", "ia3", "prefix", "prompt", "full"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
LrScheduler = Literal[
    "linear", "cosine", "cosineWithRestarts", "polynomial", "constant", "constantWithWarmup"
]

# The method families, in one place (the trainer, the CRD's CEL rules and the docs read them).
LORA_METHODS: tuple[str, ...] = ("lora", "qlora", "dora")
VIRTUAL_TOKEN_METHODS: tuple[str, ...] = ("prefix", "prompt")  # learned tokens, no weights changed
# Methods that train a PEFT adapter (everything but full fine-tuning).
ADAPTER_METHODS: tuple[str, ...] = (*LORA_METHODS, "ia3", *VIRTUAL_TOKEN_METHODS)
# Adapters that can be merged into the base weights (virtual tokens cannot).
MERGEABLE_METHODS: tuple[str, ...] = tuple(
    m for m in ADAPTER_METHODS if m not in VIRTUAL_TOKEN_METHODS
)

# Methods trained with FSDP when asked: full fine-tuning, where the weights, gradients and optimizer
# state are what does not fit one device. Adapters train with DDP (every rank holds the frozen
# base model, 4-bit for qlora, as Axolotl does); FSDP of a LoRA base model is not built yet.
FSDP_METHODS: tuple[str, ...] = ("full",)


def cel_list(values: tuple[str, ...]) -> str:
    """A tuple of strings as a CEL list literal, for rules built from the families above."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# Learning rates a practitioner starts from, per method (LoRA/QLoRA papers, PEFT examples).
DEFAULT_LEARNING_RATE: dict[str, float] = {
    "lora": 2e-4,
    "qlora": 2e-4,
    "dora": 2e-4,
    "ia3": 3e-3,
    "prefix": 1e-2,
    "prompt": 3e-2,
    "full": 2e-5,
}
DEFAULT_EPOCHS = 3
DEFAULT_VIRTUAL_TOKENS = 20


class LoraSpec(ApiModel):
    """Low-rank adapter settings for lora, qlora and dora."""

    r: int = Field(default=16, ge=1, le=1024, description="r is the rank of the update matrices.")
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="alpha scales the update (the effective scale is alpha / r).",
    )
    dropout: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="dropout is the dropout probability on the adapter input.",
    )
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "targetModules are the names of the modules to adapt (e.g. q_proj, v_proj); "
            "omitted: every linear layer except the output head."
        ),
    )


class QuantizationSpec(ApiModel):
    """How qlora quantizes the frozen base model (bitsandbytes)."""

    bits: Literal[4, 8] = Field(default=4, description="bits is the weight precision: 4 or 8.")
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4",
        description="quantType is the 4-bit data type; nf4 suits normally distributed weights.",
    )
    double_quant: bool = Field(
        default=True,
        description=(
            "doubleQuant also quantizes the quantization constants (saves ~0.4 bits/weight)."
        ),
    )
    compute_dtype: ComputeDtype = Field(
        default="bfloat16", description="computeDtype is the precision matrix products run in."
    )


class MethodSpec(ApiModel):
    """The fine-tuning method and its settings."""

    __rules__ = (
        Rule(
            cel=f"!has(self.lora) || self.type in {cel_list(LORA_METHODS)}",
            check=lambda s: s.lora is None or s.type in LORA_METHODS,
            message="lora settings apply only to type lora, qlora or dora",
            field=".lora",
        ),
        Rule(
            cel="!has(self.quantization) || self.type == 'qlora'",
            check=lambda s: s.quantization is None or s.type == "qlora",
            message="quantization applies only to type qlora",
            field=".quantization",
        ),
        Rule(
            cel=f"!has(self.virtualTokens) || self.type in {cel_list(VIRTUAL_TOKEN_METHODS)}",
            check=lambda s: s.virtual_tokens is None or s.type in VIRTUAL_TOKEN_METHODS,
            message="virtualTokens applies only to type prefix or prompt",
            field=".virtualTokens",
        ),
        Rule(
            cel="!has(self.promptInit) || self.type == 'prompt'",
            check=lambda s: s.prompt_init is None or s.type == "prompt",
            message="promptInit applies only to type prompt",
            field=".promptInit",
        ),
    )

    type: MethodType = Field(
        description=(
            "type is the method: lora, qlora (LoRA on a 4/8-bit base), dora, ia3, prefix "
            "(prefix tuning), prompt (prompt tuning) or full (every weight)."
        )
    )
    lora: LoraSpec | None = Field(
        default=None, description="lora holds the adapter settings for lora, qlora and dora."
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="quantization holds the base-model quantization for qlora."
    )
    virtual_tokens: int | None = Field(
        default=None,
        ge=1,
        le=512,
        description=(
            f"virtualTokens is the number of learned tokens for prefix and prompt (default "
            f"{DEFAULT_VIRTUAL_TOKENS})."
        ),
    )
    prompt_init: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description=(
            "promptInit is text whose tokens initialise the prompt; omitted: random initialisation."
        ),
    )


# Fields of which a manifest sets at most one: `kubetune run --set` setting one clears the others
# (an override states the user's intent; the rule below rejects a manifest that sets both).
MUTUALLY_EXCLUSIVE: tuple[tuple[str, ...], ...] = (
    ("spec.hyperparameters.epochs", "spec.hyperparameters.maxSteps"),
)


class HyperparametersSpec(ApiModel):
    """Training hyperparameters. Omitted values take per-method defaults."""

    __rules__ = (
        Rule(
            cel="!(has(self.epochs) && has(self.maxSteps))",
            check=lambda s: not (s.epochs is not None and s.max_steps is not None),
            message="set epochs or maxSteps, not both",
            field=".maxSteps",
        ),
        Rule(
            cel="!has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0",
            check=lambda s: s.micro_batch_size is None or s.batch_size % s.micro_batch_size == 0,
            message="batchSize must be a multiple of microBatchSize (gradient accumulation steps)",
            field=".microBatchSize",
        ),
    )

    epochs: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            f"epochs is the number of passes over the training set (default {DEFAULT_EPOCHS}); "
            f"excludes maxSteps."
        ),
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="maxSteps is the number of optimizer steps; excludes epochs.",
    )
    learning_rate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "learningRate is the peak learning rate; default per method: lora/qlora/dora 2e-4, "
            "ia3 3e-3, prefix 1e-2, prompt 3e-2, full 2e-5."
        ),
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        le=65536,
        description="batchSize is the number of examples per optimizer step (global).",
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description=(
            "microBatchSize is the number of examples per forward pass of each process; "
            "batchSize / (microBatchSize x world size) steps are accumulated. Default: each "
            "process's share, batchSize / world size (no accumulation)."
        ),
    )
    warmup_ratio: float = Field(
        default=0.03,
        ge=0.0,
        le=0.5,
        description="warmupRatio is the fraction of steps spent warming up.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, le=1.0, description="weightDecay is the AdamW weight decay."
    )
    lr_scheduler: LrScheduler = Field(
        default="cosine", description="lrScheduler is the learning-rate schedule after warm-up."
    )
    max_grad_norm: float = Field(
        default=1.0, gt=0.0, le=1000.0, description="maxGradNorm clips the gradient norm."
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description=(
            "gradientCheckpointing trades compute for memory; omitted: on for qlora and full, "
            "off otherwise."
        ),
    )
    early_stopping_patience: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description=(
            "earlyStoppingPatience stops training after this many evaluations without a lower "
            "eval loss; needs validation data."
        ),
    )
    eval_every_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "evalEverySteps measures eval loss every N steps; omitted: at the end of each epoch."
        ),
    )
    checkpoint_every_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "checkpointEverySteps saves a resumable checkpoint to the output every N steps; "
            "omitted: at the end of each epoch."
        ),
    )
    seed: int = Field(
        default=42, ge=0, description="seed makes initialisation and data order reproducible."
    )
