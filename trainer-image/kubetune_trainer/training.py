"""The train stage: the Hugging Face Trainer with checkpoints in object storage and resume.

Each checkpoint the Trainer saves is uploaded to `<run>/checkpoints/checkpoint-<step>/` with a
`COMPLETE` marker written last. On start, the newest complete checkpoint of the same run is
downloaded and training resumes from it (model, optimizer, scheduler, RNG and data position), so a
pod preempted at step 70 of 100 continues from its last checkpoint instead of step 0.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune_trainer import storage
from kubetune_trainer.errors import DivergedError
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
    history: list[dict[str, float]] = field(default_factory=list)


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
            reporter.step(
                StepInfo(
                    step=state.global_step,
                    total_steps=state.max_steps,
                    epoch=float(state.epoch or 0.0),
                    loss=self.loss,
                    learning_rate=self.lr,
                    tokens_per_second=(state.num_input_tokens_seen - self.tokens0) / elapsed,
                    eta_seconds=(state.max_steps - state.global_step) / rate if rate else None,
                )
            )

    class SaveAtEpochEnd(TrainerCallback):
        """Checkpoints every N steps and also at the end of each epoch."""

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if args.save_strategy == "steps":
                control.should_save = True

    class UploadCheckpoints(TrainerCallback):
        """Copies each saved checkpoint to storage; the marker goes last."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            name = f"checkpoint-{state.global_step}"
            local = Path(args.output_dir) / name
            if not local.is_dir():
                return
            target = storage.join(checkpoints_uri, name)
            storage.upload_dir(local, target)
            storage.write_bytes(storage.join(target, MARKER), b"")
            log.info("Uploaded checkpoint step=%d uri=%s", state.global_step, target)
            for old in complete_checkpoints(checkpoints_uri)[:-KEEP_CHECKPOINTS]:
                # The marker goes first, so a half-deleted checkpoint never looks complete.
                old_uri = storage.join(checkpoints_uri, f"checkpoint-{old}")
                storage.delete(storage.join(old_uri, MARKER))
                storage.delete_prefix(old_uri)

    return [Progress(), SaveAtEpochEnd(), UploadCheckpoints()]


def training_arguments(spec: FineTuneJobSpec, workdir: Path, has_validation: bool) -> Any:
    import torch
    from transformers import TrainingArguments

    hp = spec.hyperparameters
    micro = hp.micro_batch_size or hp.batch_size
    accumulation = max(1, hp.batch_size // micro)
    cuda = torch.cuda.is_available()
    dtype = spec.model.dtype
    bf16 = cuda and (dtype == "bfloat16" or (dtype == "auto" and torch.cuda.is_bf16_supported()))
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
        "seed": hp.seed,
        "data_seed": spec.dataset.seed,
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
        "train_sampling_strategy": "group_by_length",
        # Real tokens for tokens/s: a padded batch's attention mask counts them; a packed batch
        # has no padding and no mask, and "non_padding" would then skip every token equal to the
        # pad token, which is the end-of-sequence token of many models (SmolLM2, Llama 3).
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
    if hp.max_steps:
        kwargs["max_steps"] = hp.max_steps
    else:
        kwargs["num_train_epochs"] = hp.epochs
    if early and every_eval and every_save and every_save % every_eval:
        # The best model can only be restored from a step that was both evaluated and saved.
        kwargs["save_steps"] = every_eval
    return TrainingArguments(**kwargs)


def make_collator(tokenizer: Any, packing: bool) -> Any:
    """Padding-free packing (each micro-batch one sequence, positions restarting per example)
    or dynamic padding to the longest example of the batch."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8
    )


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
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    args = training_arguments(spec, workdir, bool(validation_rows))
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
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(train_rows),
        eval_dataset=dataset(validation_rows),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through the reporter instead
    resume = latest_checkpoint(checkpoints_uri)
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
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    finally:
        model.config.use_cache = use_cache
    seconds = time.monotonic() - started
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
        history=history,
    )
