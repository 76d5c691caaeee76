"""The train stage: the Hugging Face Trainer with checkpoints in object storage and resume.

Each checkpoint the Trainer saves is uploaded to `<run>/checkpoints/checkpoint-<step>/` with a
`COMPLETE` marker written last. On start, the newest complete checkpoint of the same run is
downloaded and training resumes from it (model, optimizer, scheduler, RNG and data position), so a
pod preempted at step 70 of 100 continues from its last checkpoint instead of step 0.

Distributed (DDP or FSDP over every process of the run): batchSize stays the global batch
(micro-batch x accumulation x world size) and the Trainer gives each rank its shard of every
batch. Each rank uploads the checkpoint files it wrote itself (its RNG state); rank 0 uploads the
rest and writes the marker once all have. Rank 0 picks the checkpoint to resume from and every
rank resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune_trainer import distributed, storage
from kubetune_trainer.errors import DivergedError
from kubetune_trainer.modeling import CPU_BF16_METHODS, resolve_dtype
from kubetune_trainer.telemetry import Reporter, StepInfo

log = logging.getLogger("kubetune_trainer")

MARKER = "COMPLETE"
KEEP_CHECKPOINTS = 2
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)/")

SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "cosineWithRestarts": "cosine_with_restarts",
    "polynomial": "polynomial",
    "constant": "constant",
    "constantWithWarmup": "constant_with_warmup",
}


@dataclass
class TrainOutcome:
    steps: int
    epochs: float
    seconds: float
    resumed_from_step: int | None
    tokens: int | None = None  # real tokens trained, every rank's, from the run's start
    tokens_per_second: float | None = None  # this attempt's real tokens per training second
    started: float | None = None  # time.monotonic() when this attempt's trainer started
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None  # FSDP: the trained model gathered whole on rank 0 (None elsewhere)


def complete_checkpoints(checkpoints_uri: str) -> list[int]:
    """Steps of the checkpoints whose upload finished (their marker exists), oldest first."""
    return sorted(
        int(m.group(1))
        for key in storage.list_keys(checkpoints_uri)
        if key.endswith(f"/{MARKER}") and (m := _CHECKPOINT.match(key))
    )


def latest_checkpoint(checkpoints_uri: str) -> int | None:
    steps = complete_checkpoints(checkpoints_uri)
    return steps[-1] if steps else None


def _callbacks(reporter: Reporter, checkpoints_uri: str) -> list[Any]:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Turns the Trainer's log events into reporter events (one per step) with throughput."""

        def __init__(self) -> None:
            self.loss: float | None = None
            self.lr: float | None = None
            self.t0 = time.monotonic()
            self.tokens0 = 0
            self.step0 = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.tokens0, self.step0 = (
                time.monotonic(),
                state.num_input_tokens_seen,
                state.global_step,
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "eval_loss" in logs:
                reporter.eval_loss(state.global_step, float(logs["eval_loss"]))
            if "loss" not in logs:
                return
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise DivergedError(
                    f"training diverged at step {state.global_step}: the loss is {loss}; "
                    f"lower spec.hyperparameters.learningRate ({args.learning_rate:g}) or "
                    "raise warmupRatio"
                )
            self.loss = loss
            if "learning_rate" in logs:
                self.lr = float(logs["learning_rate"])
            # Every step logs its loss (logging_steps=1), after on_step_end: a step is reported
            # from here, with its own loss, and before its checkpoint is saved.
            self.report(state)

        def report(self, state: Any) -> None:
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            done = state.global_step - self.step0
            rate = done / elapsed if done else None
            # Every rank logs each step together (the loss is their mean): the peak memory of
            # each, for the per-rank gauges (one rank in a run of one process).
            memory = distributed.gather(distributed.memory())
            tokens_per_second = (state.num_input_tokens_seen - self.tokens0) / elapsed
            log.info(
                "Step %d/%d loss=%.4f lr=%.3g tokens/s=%.0f",
                state.global_step,
                state.max_steps,
                self.loss if self.loss is not None else float("nan"),
                self.lr if self.lr is not None else float("nan"),
                tokens_per_second,
            )
            reporter.step(
                StepInfo(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    loss=self.loss,
                    learning_rate=self.lr,
                    tokens_per_second=tokens_per_second,
                    tokens=int(state.num_input_tokens_seen),
                    eta_seconds=(state.max_steps - state.global_step) / rate if rate else None,
                    rank_memory=memory,
                )
            )

    class SaveAtEpochEnd(TrainerCallback):
        """Checkpoints every N steps and also at the end of each epoch."""

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.save_strategy == "steps":
                control.should_save = True

    class UploadCheckpoints(TrainerCallback):
        """Copies each saved checkpoint to storage; the marker goes last. Every rank saved into
        its own directory (rank 0 the model, optimizer and state; each rank its RNG state), so
        every rank uploads what it has, and rank 0 marks the checkpoint complete after all."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            target = storage.join(checkpoints_uri, name)
            if local.is_dir():
                storage.upload_dir(local, target)
            distributed.barrier()
            if not distributed.current().main or not local.is_dir():
                return
            storage.write_bytes(storage.join(target, MARKER), b"")
            log.info("Uploaded checkpoint step=%d uri=%s", state.global_step, target)
            for old in complete_checkpoints(checkpoints_uri)[:-KEEP_CHECKPOINTS]:
                # The marker goes first, so a half-deleted checkpoint never looks complete.
                old_uri = storage.join(checkpoints_uri, f"checkpoint-{old}")
                storage.delete(storage.join(old_uri, MARKER))
                storage.delete_prefix(old_uri)

    return [Progress(), SaveAtEpochEnd(), UploadCheckpoints()]


def _attempt_rate(progress: Any, tokens: int, seconds: float) -> float | None:
    """Real tokens per second of this attempt's training (from the Progress callback's start:
    after a resume, the tokens seen before it are not this attempt's)."""
    done = tokens - progress.tokens0
    return done / seconds if done > 0 and seconds > 0 else None


def training_arguments(
    spec: FineTuneJobSpec, workdir: Path, has_validation: bool, world_size: int = 1
) -> Any:
    """The Trainer's arguments. world_size: the processes sharing each batch; the batch stays
    global (micro-batch x accumulation x world size)."""
    import torch
    from transformers import TrainingArguments

    hp = spec.hyperparameters
    # Unset: each process's share of the global batch (validation made it whole), not the
    # whole batch per process, which would multiply the batch by the world size.
    micro = hp.micro_batch_size or max(1, hp.batch_size // world_size)
    accumulation = max(1, hp.batch_size // (micro * world_size))
    strategy = spec.strategy(world_size)
    cuda = torch.cuda.is_available()
    # Mixed precision (autocast) in the base's precision: on a GPU, and on a CPU for the adapter
    # methods over a bfloat16 base (modeling.resolve_dtype), whose trained weights PEFT keeps in
    # float32: their matmuls then run in bfloat16 too, the float32 weights as master copies.
    # Not DoRA on a CPU: under autocast its weight norm would be taken of a bfloat16 sum, where
    # evaluation takes it in float32. Full fine-tuning named bfloat16 on a CPU trains its
    # bfloat16 weights as they are.
    dtype = resolve_dtype(spec)[0]
    autocast_on_cpu = spec.method.type in CPU_BF16_METHODS - {"dora"}
    bf16 = dtype == "bfloat16" and (cuda or autocast_on_cpu)
    every_eval = hp.eval_every_steps
    every_save = hp.checkpoint_every_steps
    early = hp.early_stopping_patience is not None and has_validation
    kwargs: dict[str, Any] = {
        "output_dir": str(workdir),
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": hp.learning_rate,
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "lr_scheduler_type": SCHEDULERS[hp.lr_scheduler],
        # A float below 1 is a fraction of the total steps (transformers 5 dropped warmup_ratio).
        "warmup_steps": float(hp.warmup_ratio),
        # hyperparameters.seed orders the batches too (as its docs say); dataset.seed only
        # shuffles and splits the data.
        "seed": hp.seed,
        "logging_steps": 1,
        "logging_strategy": "steps",
        # Log a NaN/inf loss as it is (the default replaces it with a mean), so divergence stops
        # the run with a clear verdict instead of training on garbage.
        "logging_nan_inf_filter": False,
        "eval_strategy": ("steps" if every_eval else "epoch") if has_validation else "no",
        "eval_steps": every_eval,
        "save_strategy": "steps" if every_save else "epoch",
        "save_steps": every_save,
        "save_total_limit": 2,
        "load_best_model_at_end": early,
        "metric_for_best_model": "eval_loss" if early else None,
        "greater_is_better": False if early else None,
        # Real tokens for tokens/s: a padded batch's attention mask counts them; a packed batch
        # has no padding and no mask, and "non_padding" would then skip every token equal to the
        # pad token, which is the end-of-sequence token of many models (SmolLM2, Llama 3).
        # Random batch order (the Trainer's own sampler); length buckets when random order would
        # pad too much come from _trainer_class.
        "train_sampling_strategy": "random",
        "include_num_input_tokens_seen": "all" if spec.dataset.packing else "non_padding",
        "remove_unused_columns": False,
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": bf16,
        "fp16": cuda and dtype == "float16",
        "activation_checkpointing": bool(hp.gradient_checkpointing) and spec.method.type == "full",
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "dataloader_num_workers": 0,
        "optim": "adamw_torch",
    }
    if strategy == "ddp":
        # Every parameter of these models is used in each forward pass: no search for unused
        # ones (it costs a graph traversal per step and breaks activation checkpointing).
        kwargs["ddp_find_unused_parameters"] = False
    elif strategy == "fsdp":
        # Parameters, gradients and optimizer state sharded over the ranks, one unit per decoder
        # layer; checkpoints and the final model gathered whole on rank 0 (FULL_STATE_DICT), so
        # that a checkpoint resumes at any world size and rank 0 can evaluate and export.
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = {
            "use_orig_params": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": kwargs["activation_checkpointing"],
        }
        kwargs["activation_checkpointing"] = False  # FSDP checkpoints activations itself
    if hp.max_steps:
        kwargs["max_steps"] = hp.max_steps
    else:
        kwargs["num_train_epochs"] = hp.epochs
    if early and every_eval and every_save and every_save % every_eval:
        # The best model can only be restored from a step that was both evaluated and saved.
        kwargs["save_steps"] = every_eval
    return TrainingArguments(**kwargs)


# Batch order. Batches in random order are as diverse as the data, which is what learning needs
# early on (sorting a run's batches by length cut SmolLM2's exactMatch after 10 steps from 0.79 to
# 0.45: docs/benchmarks.md); but each batch is padded to its longest example. Random order is
# kept while it wastes at most this share of the real tokens on padding; above it, batches of
# similar length are drawn from windows of a few batches, the smallest window that meets it, and
# still shuffled.
PADDING_BUDGET = 0.10
WINDOWS = (1, 2, 4, 8, 16, 32, 64)
ESTIMATE_SAMPLE = 20_000  # examples whose lengths estimate the padding of an order


def bucketed_order(
    lengths: list[int], batch_size: int, window: int, generator: Any = None
) -> list[int]:
    """Batches of similar length in random order: the examples shuffled, cut into windows of
    `window` batches, each window sorted by length and cut into batches, then the batches
    shuffled (a short last batch goes last, so that every other batch stays whole). A window of
    1 is plain random order; a window of the whole dataset sorts it by length."""
    import torch

    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    if window == 1:
        return shuffled
    span = window * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(shuffled), span):
        chunk = sorted(shuffled[start : start + span], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    short = [b for b in batches if len(b) < batch_size]
    whole = [b for b in batches if len(b) == batch_size]
    order = torch.randperm(len(whole), generator=generator).tolist()
    return [i for b in [*(whole[k] for k in order), *short] for i in b]


def padding_waste(lengths: list[int], batch_size: int, window: int, multiple: int) -> float:
    """Padded tokens per real token when batches come in bucketed_order (the mean of 4 draws)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if len(lengths) > ESTIMATE_SAMPLE:
        picked = torch.randperm(len(lengths), generator=generator)[:ESTIMATE_SAMPLE].tolist()
        lengths = [lengths[i] for i in picked]
    padded = 0
    for _ in range(4):
        order = bucketed_order(lengths, batch_size, window, generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            padded += -(-max(lengths[i] for i in batch) // multiple) * multiple * len(batch)
    return padded / (4 * sum(lengths)) - 1


def choose_window(lengths: list[int], batch_size: int, multiple: int) -> tuple[int, float]:
    """The smallest window whose padding stays within PADDING_BUDGET, and that padding."""
    for window in WINDOWS:
        waste = padding_waste(lengths, batch_size, window, multiple)
        if waste <= PADDING_BUDGET or window * batch_size >= len(lengths):
            return window, waste
    return WINDOWS[-1], waste


# Methods whose virtual tokens shift the positions between the inputs and the output layer
# (PEFT prepends them inside its forward): the output layer sees every position for them.
SHIFTED_POSITIONS = ("prefix", "prompt")


class AnswerOnlyUnsupported(Exception):
    """The model's forward does not apply its output layer in a way answer_only_loss can use."""


def answer_only_supported(model: Any) -> bool:
    """Models whose loss is more than the tokens' cross entropy (a mixture of experts' router
    loss, added when the forward gets labels) keep transformers' own loss."""
    config = getattr(model, "config", None)
    return not getattr(config, "output_router_logits", False)


def answer_positions(labels: Any) -> tuple[Any, Any]:
    """(keep, targets): keep[b, t] says position t of row b predicts an answer token (the
    label of t + 1 is not -100, as the causal LM loss shifts them), and targets are those
    tokens, in keep's row-major order."""
    import torch

    following = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = following != -100
    return keep, following[following != -100]


def answer_only_loss(
    model: Any, head: Any, inputs: dict[str, Any], num_items_in_batch: Any, sums_over_batch: bool
) -> Any:
    """The causal LM loss with the output layer applied only where it predicts an answer
    token: the prompt's positions (most of the tokens) skip the widest matmul of the model and
    its softmax. The same loss as transformers' ForCausalLMLoss: the sum of the cross entropy
    over those tokens (logits in float32) over num_items_in_batch when the model takes it
    (sums_over_batch), else their mean. model: what to call (a DDP wrapper syncs gradients);
    head: its output layer (the unwrapped model's get_output_embeddings())."""
    import torch

    labels = inputs["labels"]
    keep, targets = answer_positions(labels)

    calls = []

    def gather(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        calls.append(1)
        return (args[0][keep], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        handle.remove()
    logits = outputs.logits
    if len(calls) != 1 or logits.dim() != 2 or logits.shape[0] != targets.numel():
        # A model that does not call its output layer once on the hidden states: no guess.
        raise AnswerOnlyUnsupported(f"output layer called {len(calls)} time(s)")
    logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if sums_over_batch and num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return loss / max(int(targets.numel()), 1)


def _trainer_class(window: int, answer_only: bool = False) -> Any:
    """The Hugging Face Trainer, with bucketed_order's batches when the window is over 1 and
    answer_only_loss in training when answer_only."""
    import torch
    from transformers import Trainer

    class Order(torch.utils.data.Sampler):
        """The order of one epoch, drawn from the run's seed and the epoch (the Trainer calls
        set_epoch): the same on every rank of a distributed run, and again after a resume."""

        def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
            self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return len(self.lengths)

        def __iter__(self) -> Any:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return iter(bucketed_order(self.lengths, self.batch_size, window, generator))

    class KubetuneTrainer(Trainer):
        _answer_only = answer_only

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if window == 1:  # random order: the Trainer's own sampler
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            # In micro-batches: the ranks take turns at them, so a step sees the same examples
            # whatever the world size (at the same microBatchSize).
            return Order(dataset["length"], self.args.train_batch_size, self.args.seed)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            unwrapped = self.accelerator.unwrap_model(model)
            if (
                not self._answer_only  # switched off, or off after a model it did not suit
                or return_outputs  # evaluation: the Trainer's own, every position
                or not model.training
                or "labels" not in inputs
                or not answer_only_supported(unwrapped)
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            sums = bool(self.model_accepts_loss_kwargs)
            try:
                loss = answer_only_loss(
                    model, unwrapped.get_output_embeddings(), inputs, num_items_in_batch, sums
                )
            except AnswerOnlyUnsupported as exc:
                log.warning("Output layer=every position (%s)", exc)
                self._answer_only = False
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # As Trainer.compute_loss: a loss summed over the step's tokens of every rank.
            if self.args.average_tokens_across_devices and sums and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

    return KubetuneTrainer


def pad_multiple() -> int:
    """Lengths a padded batch is rounded up to: multiples of 8 suit GPU tensor cores; on a CPU
    they are only more padding."""
    import torch

    return 8 if torch.cuda.is_available() else 1


def make_collator(tokenizer: Any, packing: bool) -> Any:
    """Padding-free packing (each micro-batch one sequence, positions restarting per example)
    or dynamic padding to the longest example of the batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    multiple = pad_multiple()
    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=-100,
        pad_to_multiple_of=multiple if multiple > 1 else None,
    )


@contextlib.contextmanager
def _no_adapter_input_casts(model: Any, active: bool) -> Iterator[int]:
    """Switches off PEFT's cast of each LoRA layer's input to its weights' dtype (the layers'
    cast_input_dtype_enabled, which peft.helpers.disable_input_dtype_casting sets too, but that
    fails on layers without the attribute, IA3's in peft 0.21); yields how many layers. Not a
    DoRA layer's (a lora_variant): it takes its weight norm in its input's dtype."""
    layers = [
        m
        for m in model.modules()
        if active
        and getattr(m, "cast_input_dtype_enabled", None) is True
        and not getattr(m, "lora_variant", None)
    ]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def train(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, list[int]]],
    validation_rows: list[dict[str, list[int]]],
    spec: FineTuneJobSpec,
    workdir: Path,
    checkpoints_uri: str,
    reporter: Reporter,
) -> TrainOutcome:
    from datasets import Dataset
    from transformers import EarlyStoppingCallback, PrinterCallback

    world = distributed.current().world_size
    args = training_arguments(spec, workdir, bool(validation_rows), world)
    callbacks = _callbacks(reporter, checkpoints_uri)
    if args.load_best_model_at_end:
        callbacks.append(
            EarlyStoppingCallback(
                early_stopping_patience=spec.hyperparameters.early_stopping_patience
            )
        )

    def dataset(rows: list[dict[str, list[int]]]) -> Any:
        return (
            Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rows])
            if rows
            else None
        )

    collator = make_collator(tokenizer, spec.dataset.packing)
    micro = args.per_device_train_batch_size
    lengths = [len(r["input_ids"]) for r in train_rows]
    if spec.dataset.packing:
        window, waste = 1, 0.0  # a packed batch has no padding
    else:
        window, waste = choose_window(lengths, micro, pad_multiple())
    log.info(
        "Batch order=%s padding=%.1f%%",
        "random" if window == 1 else f"length-buckets window={window}",
        100 * waste,
    )
    answer_only = spec.method.type not in SHIFTED_POSITIONS
    log.info("Output layer=%s", "answer positions only" if answer_only else "every position")
    trainer = _trainer_class(window, answer_only)(
        model=model,
        args=args,
        train_dataset=dataset(train_rows),
        eval_dataset=dataset(validation_rows),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the reporter instead
    # Rank 0 chooses, so that every rank resumes from the same checkpoint.
    resume = distributed.broadcast(latest_checkpoint(checkpoints_uri))
    resume_dir = None
    if resume is not None:
        resume_dir = workdir / f"checkpoint-{resume}"
        if resume_dir.exists():
            shutil.rmtree(resume_dir)
        storage.download(storage.join(checkpoints_uri, f"checkpoint-{resume}"), resume_dir)
        log.info(
            "Resuming step=%d from=%s",
            resume,
            storage.join(checkpoints_uri, f"checkpoint-{resume}"),
        )
    started = time.monotonic()
    use_cache = model.config.use_cache
    # Without a KV cache the attention mask follows the position ids, so packed examples do not
    # attend to each other; a cache is no use in training anyway.
    model.config.use_cache = False
    # Under autocast an adapter layer takes the base's half-precision input as it is: PEFT's cast
    # of it to the adapter weights' float32, which autocast undoes at once, costs two copies of
    # every adapter layer's input and output, forward and backward.
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(args.mixed_precision)
    try:
        with _no_adapter_input_casts(model, active=autocast is not None) as uncast:
            if autocast:
                log.info("Autocast=%s (input casts off in %d adapter layers)", autocast, uncast)
            else:
                log.info("Autocast=off")
            result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        model.config.use_cache = use_cache
        # The evaluation runs in the precision the model was loaded in, as the base model's and
        # the champion's do: the Trainer's autocast comes off the model's forward (exactly the
        # forward it wrapped: accelerate's own unwrap walks past the model's decorators).
        prepared = trainer.accelerator.unwrap_model(trainer.model)
        if prepared.__dict__.pop("_original_forward", None) is not None:
            prepared.__dict__.pop("forward", None)
    seconds = time.monotonic() - started
    gathered = None
    if spec.strategy(world) == "fsdp":
        # The sharded model gathered whole (every rank takes part), saved and loaded on rank 0
        # for the evaluation and the export.
        final = workdir / "fsdp-final"
        trainer.save_model(str(final))
        if distributed.current().main:
            from transformers import AutoModelForCausalLM

            gathered = AutoModelForCausalLM.from_pretrained(str(final), dtype=model.dtype)
        distributed.barrier()
    state = trainer.state
    history = [
        {k: float(v) for k, v in entry.items() if isinstance(v, int | float) and math.isfinite(v)}
        for entry in state.log_history
    ]
    del result
    return TrainOutcome(
        steps=state.global_step,
        epochs=float(state.epoch or 0.0),
        seconds=seconds,
        resumed_from_step=resume,
        tokens=int(state.num_input_tokens_seen) or None,
        tokens_per_second=_attempt_rate(callbacks[0], int(state.num_input_tokens_seen), seconds),
        history=history,
        model=gathered,
    )
