"""Training options that change how the Trainer runs: packing, early stopping, epoch checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import ExitCode, FineTuneJob, FineTuneJobSpec, resolve_spec
from kubetune_trainer.training import (
    complete_checkpoints,
    make_collator,
    train,
    training_arguments,
)
from tests.conftest import valid_job
from tests.trainer.conftest import Recorder, job_manifest, run_job


def test_packed_examples_do_not_attend_to_each_other(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False  # as during training
    first, second = [5, 9, 13, 20, 7], [30, 31, 32]
    batch = make_collator(AutoTokenizer.from_pretrained(tiny_model), packing=True)(
        [{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}]
    )
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0].tolist() == [-100, 9, 13, 20, 7, -100, 31, 32]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (first, second)]
    assert torch.allclose(packed[:5], alone[0], atol=1e-5)
    assert torch.allclose(packed[5:], alone[1], atol=1e-5)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_tokens_seen_are_the_real_tokens(tiny_model: Path, tmp_path: Path, packing: bool) -> None:
    """Throughput counts every token of every example and no padding, also when the pad token is
    the end-of-sequence token (as SmolLM2's is) and a packed batch has no attention mask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in ([5 + (i * 7 + j) % 40 for j in range(3 + i % 5)] + [eos] for i in range(12))
    ]
    doc = job_manifest(
        tiny_model,
        tmp_path / "unused.jsonl",
        (tmp_path / "out").as_uri(),
        "full",
        dataset__packing=packing,
        hyperparameters={"epochs": 1, "batchSize": 4, "learningRate": 1e-6},
    )
    spec = resolve_spec(FineTuneJob.model_validate(doc).spec)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    recorder = Recorder()
    outcome = train(
        model, tokenizer, rows, [], spec, tmp_path / "work", (tmp_path / "ckpt").as_uri(), recorder
    )
    assert outcome.steps == 3
    seen = [h["num_input_tokens_seen"] for h in outcome.history if "num_input_tokens_seen" in h]
    assert seen[-1] == sum(len(r["input_ids"]) for r in rows)  # 12 EOS tokens included


def test_lora_with_packing_learns_the_task(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    doc = job_manifest(
        tiny_model, task_file, (tmp_path / "out").as_uri(), "lora", dataset__packing=True
    )
    result, _ = run_job(doc, tmp_path / "work")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    assert result.metrics.tuned.loss < result.metrics.base.loss - 1.0
    assert result.metrics.tuned.exact_match > 0.5


def test_early_stopping_stops_when_eval_loss_stops_improving(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    # A learning rate of ~0 leaves eval loss flat, so patience 1 stops at the second evaluation.
    doc = job_manifest(
        tiny_model,
        task_file,
        (tmp_path / "out").as_uri(),
        "lora",
        hyperparameters__learningRate=1e-12,
        hyperparameters__evalEverySteps=5,
        hyperparameters__checkpointEverySteps=5,
        hyperparameters__earlyStoppingPatience=1,
    )
    result, recorder = run_job(doc, tmp_path / "work")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    assert result.steps == 10
    assert len(recorder.eval_losses) == 2


def test_checkpoints_every_n_steps_and_at_each_epoch_end(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(
        tiny_model,
        task_file,
        out.as_uri(),
        "lora",
        hyperparameters={"epochs": 2, "batchSize": 64, "checkpointEverySteps": 4},
    )
    result, _ = run_job(doc, tmp_path / "work")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    per_epoch = result.steps // 2
    assert per_epoch % 4, "the epoch must not end on a multiple of checkpointEverySteps"
    saved = {step for step in range(4, result.steps + 1, 4)} | {per_epoch, result.steps}
    # Only the two newest are kept; the last one exists only because epochs end with a save.
    assert complete_checkpoints(f"{out.as_uri()}/runs/0123abcd/checkpoints") == sorted(saved)[-2:]
    assert result.steps % 4


@pytest.mark.parametrize(
    ("micro", "world", "per_process", "accumulation"),
    [(None, 1, 8, 1), (None, 2, 4, 1), (None, 4, 2, 1), (2, 2, 2, 2), (1, 4, 1, 2)],
)
def test_the_batch_stays_global_across_processes(
    tmp_path: Path, micro: int | None, world: int, per_process: int, accumulation: int
) -> None:
    """batchSize is the examples of one optimizer step over every process: an unset
    microBatchSize is each process's share, never the whole batch per process."""
    doc = valid_job()["spec"]
    doc["hyperparameters"] = {"batchSize": 8, **({"microBatchSize": micro} if micro else {})}
    args = training_arguments(FineTuneJobSpec.model_validate(doc), tmp_path, False, world)
    assert args.per_device_train_batch_size == per_process
    assert args.gradient_accumulation_steps == accumulation
    assert per_process * accumulation * world == 8
