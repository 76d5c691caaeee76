"""The export and promote stages: artifacts under `<output>/runs/<runId>/`, `manifest.json` last,
and `<output>/latest.json` only when every gate passed.

A reader trusts a run only when its manifest exists and the checksums match; a run that died
half-way through its upload therefore never looks complete, and nothing is promoted before it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.api import (
    ADAPTER_METHODS,
    Artifacts,
    EvalMetrics,
    FineTuneJobSpec,
    GateResult,
    PromotedModel,
    PromotionRecord,
    RegressionMetrics,
    TrainerConfig,
    TrainerResult,
)
from kubetune_trainer import promotion, storage
from kubetune_trainer.data import Example, Leakage, Splits
from kubetune_trainer.gates import describe
from kubetune_trainer.modeling import hf_repo, resolve_dtype
from kubetune_trainer.training import TrainOutcome

log = logging.getLogger("kubetune_trainer")


@dataclass
class Evaluation:
    tuned: EvalMetrics
    base: EvalMetrics | None
    tuned_outputs: list[str]
    base_outputs: list[str]
    examples: list[Example]
    promoted: EvalMetrics | None = None  # the champion's, when a gate compares with it
    promoted_outputs: list[str] = field(default_factory=list)
    promoted_run_id: str | None = None
    regression: RegressionMetrics | None = None  # on evaluation.regressionUri, when set
    regression_examples: int = 0


def artifact_uris(config: TrainerConfig, spec: FineTuneJobSpec, merged: bool) -> Artifacts:
    run = config.output_prefix
    return Artifacts(
        adapter_uri=None
        if spec.method.type not in ADAPTER_METHODS
        else storage.join(run, "adapter") + "/",
        merged_uri=storage.join(run, "merged") + "/" if merged else None,
        manifest_uri=storage.join(run, "manifest.json"),
        report_uri=storage.join(run, "report.md"),
        result_uri=storage.join(run, "result.json"),
    )


def save_models(
    model: Any, tokenizer: Any, spec: FineTuneJobSpec, staging: Path, merge: bool, base_loader: Any
) -> bool:
    """Writes adapter/ (PEFT format) and, for full or merged exports, merged/. True if merged."""
    if spec.method.type not in ADAPTER_METHODS:
        model.save_pretrained(staging / "merged")
        tokenizer.save_pretrained(staging / "merged")
        return True
    model.save_pretrained(staging / "adapter")
    tokenizer.save_pretrained(staging / "adapter")
    if not merge:
        return False
    from peft import PeftModel

    # Merge into a freshly loaded full-precision base: merging into 4-bit weights would round.
    base = base_loader()
    merged = PeftModel.from_pretrained(base, staging / "adapter").merge_and_unload()
    merged.save_pretrained(staging / "merged")
    tokenizer.save_pretrained(staging / "merged")
    return True


def write_eval_samples(path: Path, evaluation: Evaluation, metrics: list[str]) -> None:
    """One line per test example: the prompt, the reference, both models' answers, and each
    answer's own scores (exactMatch 0/1, rougeL F1) for finding what the model gets wrong."""
    from kubetune_trainer.evaluation import sample_scores

    with path.open("w", encoding="utf-8") as f:
        for i, ex in enumerate(evaluation.examples):
            base = evaluation.base_outputs[i] if i < len(evaluation.base_outputs) else None
            tuned = evaluation.tuned_outputs[i] if i < len(evaluation.tuned_outputs) else None
            outputs = evaluation.promoted_outputs
            promoted = outputs[i] if i < len(outputs) else None
            row = {
                "prompt": ex.prompt,
                "reference": ex.completion,
                "base": base,
                "tuned": tuned,
                **({"promoted": promoted} if promoted is not None else {}),
                "scores": {
                    name: sample_scores(answer, ex.completion, metrics)
                    for name, answer in (("base", base), ("promoted", promoted), ("tuned", tuned))
                    if answer is not None
                },
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """An exponential moving average, bias-corrected (as TensorBoard's smoothing)."""
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def plot_losses(path: Path, history: list[dict[str, float]], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, label="train loss", linewidth=1, alpha=0.35, color="C0")
        ax.plot(steps, _smooth(list(losses)), label="train loss (smoothed)", color="C0")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", label="eval loss", color="C1")
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def base_model_id(uri: str) -> str:
    """The base model as the spec named it, in the form the Hub and PEFT understand: an hf://
    URI becomes its repository id (`org/name`); any other URI stays as written. Never a path
    of the pod's cache, which means nothing elsewhere."""
    return hf_repo(uri)[0] if uri.startswith("hf://") else uri


def make_adapter_portable(adapter: Path, spec: FineTuneJobSpec, card: str) -> None:
    """adapter_config.json names the spec's base model (PEFT writes the local path it loaded
    from), and the folder's README.md is the run's model card, not PEFT's empty template."""
    config_path = adapter / "adapter_config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_id(spec.model.uri)
        if spec.model.revision:
            config["revision"] = spec.model.revision
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter / "README.md").write_text(card.replace("](loss.png)", "](../loss.png)"))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _data_lines(report: dict[str, Any], data_format: str, sha256: str, uri: str) -> list[str]:
    read = report.get("read", 0)
    dropped = [
        f"{report[k]} {label}"
        for k, label in (
            ("empty", "empty"),
            ("duplicates", "duplicate"),
            ("tooLong", "longer than maxSeqLength (not trained on)"),
        )
        if report.get(k)
    ]
    return [
        f"- source: `{uri}` ({data_format} format), sha256 `{sha256 or 'unknown'}`",
        f"- {read} records read" + (f"; dropped: {', '.join(dropped)}" if dropped else ""),
        f"- split: {report.get('train', 0)} train, {report.get('validation', 0)} validation, "
        f"{report.get('test', 0)} test",
    ]


def _method_lines(spec: FineTuneJobSpec) -> list[str]:
    method = spec.method
    lines = [f"- method: {method.type}"]
    if method.lora is not None and method.type in ("lora", "qlora", "dora"):
        lora = method.lora
        targets = ", ".join(lora.target_modules) if lora.target_modules else "the model's default"
        lines.append(
            f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout:g}, "
            f"target modules: {targets}"
        )
    if method.quantization is not None and method.type == "qlora":
        q = method.quantization
        lines.append(
            f"- quantization: {q.bits}-bit {q.quant_type}, double quantization "
            f"{'on' if q.double_quant else 'off'}, compute dtype {q.compute_dtype}"
        )
    if method.virtual_tokens and method.type in ("prefix", "prompt"):
        lines.append(f"- virtual tokens: {method.virtual_tokens}")
    dtype, why = resolve_dtype(spec)
    lines.append(f"- base model dtype: {dtype}" + (f" ({why})" if why else ""))
    return lines


def _environment() -> tuple[list[str], str]:
    """Framework versions and the hardware the run trained on."""
    import importlib.metadata
    import os
    import platform

    versions = []
    for name in ("kubetune", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    versions.insert(0, f"Python {platform.python_version()}")
    hardware = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            hardware = ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))
    except ImportError:
        pass
    return versions, hardware


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _gpus_here() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _usage_lines(config: TrainerConfig, outcome: TrainOutcome) -> list[str]:
    """What this attempt used, from the trainer's side (the FineTuneJob's status.usage counts
    every pod of every attempt, as the operator saw them)."""
    spec = config.spec
    lines = []
    if outcome.tokens:
        lines.append(f"- tokens trained: {outcome.tokens:,} (real tokens, every process's)")
    elapsed = time.monotonic() - outcome.started if outcome.started is not None else None
    times = f"- time: training {_duration(outcome.seconds)}"
    if elapsed is not None:
        times += (
            f"; this attempt until this report (data, model, baseline, training, evaluation) "
            f"{_duration(elapsed)}"
        )
    lines.append(times)
    if outcome.resumed_from_step:
        lines.append(
            f"- resumed from step {outcome.resumed_from_step}: the earlier attempts' time is not "
            "counted here (the FineTuneJob's status.usage counts every attempt)"
        )
    gpus = _gpus_here() * spec.nodes()
    pricing = config.pricing
    if gpus and elapsed is not None:
        gpu_seconds = gpus * elapsed
        line = f"- GPUs: {gpus}, {gpu_seconds / 3600:.3f} GPU-hours in this attempt"
        if pricing is not None and pricing.gpu_hour is not None:
            line += (
                f"; estimated cost {pricing.cost(gpu_seconds, 0):.2f} {pricing.currency} at "
                f"{pricing.gpu_hour} {pricing.currency} per GPU-hour (the profile's pricing)"
            )
        lines.append(line)
    else:
        used = resource.getrusage(resource.RUSAGE_SELF)
        lines.append(
            f"- no GPU: CPU time of this process {_duration(used.ru_utime + used.ru_stime)}"
        )
    return lines


def _front_matter(config: TrainerConfig, evaluation: Evaluation) -> str:
    """Hugging Face model-card metadata (huggingface.co/docs/hub/model-cards)."""
    import yaml

    spec = config.spec
    tuned = evaluation.tuned.model_dump(by_alias=True)
    metric_types = {"exactMatch": "exact_match", "rougeL": "rouge", "bleu": "bleu"}
    metrics = [
        {"type": metric_types.get(m, m), "name": f"{m} (tuned)", "value": round(tuned[m], 6)}
        for m in spec.evaluation.metrics
        if tuned.get(m) is not None
    ]
    test = spec.dataset.test_uri or spec.dataset.uri  # where the scores' examples came from
    meta: dict[str, Any] = {
        "base_model": base_model_id(spec.model.uri),
        "library_name": "peft" if spec.method.type in ADAPTER_METHODS else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["kubetune", spec.method.type, "fine-tuned"],
        "datasets": list(dict.fromkeys((spec.dataset.uri, test))),
        "model-index": [
            {
                "name": config.job_name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {
                            "name": "test set" if spec.dataset.test_uri else "test split",
                            "type": test,
                        },
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _gate_line(g: GateResult, evaluation: Evaluation) -> str:
    line = f"- {'PASS' if g.passed else 'FAIL'} {describe(g)}"
    against = (g.compared_with or "").split(" ")[0]
    measured: Any = evaluation
    if g.eval_set == "regression":
        measured = evaluation.regression or RegressionMetrics()
    reference = measured.promoted if against == "promoted" else measured.base
    if g.bound in ("minImprovement", "maxRegression") and reference is not None:
        before = reference.model_dump(by_alias=True).get(g.metric)
        tuned = (measured.tuned or EvalMetrics()).model_dump(by_alias=True).get(g.metric)
        name = "the promoted run" if against == "promoted" else "the base"
        how = "improvement over" if g.bound == "minImprovement" else "change against"
        line += f" — {how} {name} ({_fmt(before)} → {_fmt(tuned)})"
    return line


def _champion_column(evaluation: Evaluation) -> str:
    """The heading of the promoted run's column: its run id, when known."""
    run = evaluation.promoted_run_id
    return f"promoted ({run})" if run else "promoted"


def _regression_lines(uri: str | None, metrics: list[str], evaluation: Evaluation) -> list[str]:
    """The regression set's section of the model card: base, promoted and tuned side by side."""
    measured = evaluation.regression
    if uri is None or measured is None:
        return []
    champion = _champion_column(evaluation)
    columns = [("base", measured.base), (champion, measured.promoted), ("tuned", measured.tuned)]
    shown = [(name, m.model_dump(by_alias=True)) for name, m in columns if m is not None]
    return [
        "## Evaluation (regression set)",
        "",
        f"General behaviour that tuning must not make worse: {evaluation.regression_examples} "
        f"examples of `{uri}`, evaluated the same way.",
        "",
        "| metric | " + " | ".join(name for name, _ in shown) + " |",
        "|---|" + "---|" * len(shown),
        *(f"| {m} | " + " | ".join(_fmt(v.get(m)) for _, v in shown) + " |" for m in metrics),
        "",
    ]


def model_card(
    config: TrainerConfig,
    evaluation: Evaluation,
    gates: list[GateResult],
    outcome: TrainOutcome,
    splits: Splits,
    leak: Leakage,
    superseded: str = "",
) -> str:
    """report.md, and the adapter's README.md: a model card in the Hub's conventions.
    superseded: why a run whose gates passed was not promoted (a better run was, meanwhile)."""
    spec = config.spec
    hp = spec.hyperparameters
    tuned = evaluation.tuned.model_dump(by_alias=True)
    base = evaluation.base.model_dump(by_alias=True) if evaluation.base else {}
    champion = evaluation.promoted.model_dump(by_alias=True) if evaluation.promoted else None
    rows = [
        f"| {m} | {_fmt(base.get(m))} | "
        + (f"{_fmt(champion.get(m))} | " if champion is not None else "")
        + f"{_fmt(tuned.get(m))} |"
        for m in spec.evaluation.metrics
    ]
    passed = all(g.passed for g in gates) and not superseded
    versions, hardware = _environment()
    warning = leak.warning()
    leak_lines = [
        f"- {leak.answers_in_train} of {leak.test} test answers also occur in the training "
        f"split ({leak.answer_share:.0%}); {leak.prompts_in_train} test prompts do; "
        f"{leak.pairs_in_train} test examples are in it whole",
        *([f"- **Warning**: {warning}"] if warning else []),
    ]
    lines = [
        _front_matter(config, evaluation),
        f"# {config.job_name} — run {config.run_id}",
        "",
        f"**{spec.method.type}** fine-tune of **{base_model_id(spec.model.uri)}** on "
        f"`{spec.dataset.uri}`, trained and evaluated by kubetune "
        f"({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}). "
        f"Verdict: **{'promoted' if passed else 'not promoted'}**"
        + (f" ({superseded})" if superseded else "")
        + ".",
        "",
        "## Method",
        "",
        *_method_lines(spec),
        "",
        "## Hyperparameters",
        "",
        f"- steps: {outcome.steps}, epochs: {outcome.epochs:.2f}, "
        f"training time: {_duration(outcome.seconds)}"
        + (f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""),
        f"- learning rate {hp.learning_rate:g} ({hp.lr_scheduler}, warmup ratio "
        f"{hp.warmup_ratio:g}), batch size {hp.batch_size} (micro-batch {hp.micro_batch_size}), "
        f"weight decay {hp.weight_decay:g}, max grad norm {hp.max_grad_norm:g}, seed {hp.seed}",
        f"- max sequence length {spec.dataset.max_seq_length} tokens"
        + (", packed" if spec.dataset.packing else ""),
        "",
        "![loss](loss.png)",
        "",
        "## Data",
        "",
        *_data_lines(splits.report, splits.format, splits.sha256, spec.dataset.uri),
        f"- {splits.prompts.describe()}",
        "",
        "### Overlap between the test and training splits",
        "",
        *leak_lines,
        "",
        f"## Evaluation (test {'set' if spec.dataset.test_uri else 'split'})",
        "",
        f"On {len(evaluation.examples)} test examples, greedy decoding of at most "
        f"{spec.evaluation.max_new_tokens} new tokens; per-example outputs in "
        "`eval_samples.jsonl`.",
        "",
        (
            f"| metric | base | {_champion_column(evaluation)} | tuned |"
            if champion is not None
            else "| metric | base | tuned |"
        ),
        "|---|---|---|---|" if champion is not None else "|---|---|---|",
        *rows,
        "",
        *_regression_lines(spec.evaluation.regression_uri, spec.evaluation.metrics, evaluation),
        "## Gates",
        "",
        *([_gate_line(g, evaluation) for g in gates] or ["- (no gates)"]),
        "",
        "## Environment",
        "",
        f"- {', '.join(versions)}",
        f"- hardware: {hardware}",
        "",
        "## Usage",
        "",
        *_usage_lines(config, outcome),
        "",
        "## Limitations",
        "",
        (
            f"- The scores come from {len(evaluation.examples)} examples of the test set "
            f"`{spec.dataset.test_uri}`"
            if spec.dataset.test_uri
            else f"- The scores come from {len(evaluation.examples)} held-out examples of the "
            "same dataset"
        )
        + "; they say little about other tasks or data.",
        "- Fine-tuning inherits the base model's biases and limits; review outputs before use.",
        *([f"- {warning}"] if warning else []),
        "",
        "## Use",
        "",
    ]
    if spec.method.type not in ADAPTER_METHODS:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("merged/")',
            "```",
        ]
    else:
        lines += [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "# adapter_config.json names the base model; it is fetched as the spec named it",
            'model = AutoPeftModelForCausalLM.from_pretrained("adapter/")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_run_files(
    staging: Path,
    config: TrainerConfig,
    evaluation: Evaluation,
    gates: list[GateResult],
    outcome: TrainOutcome,
    splits: Splits,
    leak: Leakage,
    result: TrainerResult,
    superseded: str = "",
) -> None:
    """Everything of the run but the models: eval samples, loss plot, model card (also the
    adapter's README.md, whose config then names the spec's base model), metrics and the full
    result (what the operator reads when the pod that carried the result is gone)."""
    write_eval_samples(staging / "eval_samples.jsonl", evaluation, config.spec.evaluation.metrics)
    plot_losses(staging / "loss.png", outcome.history, f"{config.job_name} — run {config.run_id}")
    card = model_card(config, evaluation, gates, outcome, splits, leak, superseded)
    (staging / "report.md").write_text(card)
    if (staging / "adapter").is_dir():
        make_adapter_portable(staging / "adapter", config.spec, card)
    data_report: dict[str, Any] = dict(splits.report)
    data_report["sha256"] = splits.sha256
    data_report["leakage"] = {
        "test": leak.test,
        "answersInTrain": leak.answers_in_train,
        "promptsInTrain": leak.prompts_in_train,
        "pairsInTrain": leak.pairs_in_train,
    }
    base = evaluation.base
    (staging / "metrics.json").write_text(
        json.dumps(
            {
                "tuned": evaluation.tuned.model_dump(mode="json"),
                "base": base.model_dump(mode="json") if base else None,
                "promoted": (
                    {
                        "runId": evaluation.promoted_run_id,
                        **evaluation.promoted.model_dump(mode="json"),
                    }
                    if evaluation.promoted
                    else None
                ),
                "regression": (
                    evaluation.regression.model_dump(mode="json") if evaluation.regression else None
                ),
                "history": outcome.history,
                "data": data_report,
            },
            indent=2,
        )
    )
    (staging / "result.json").write_text(result.model_dump_json(indent=2, exclude_none=True))


def latest_record(config: TrainerConfig, result: TrainerResult) -> PromotionRecord:
    """latest.json: which run is promoted, what a server needs to load it, how it scored."""
    spec = config.spec
    artifacts = result.artifacts or Artifacts()
    tuned = result.metrics.tuned if result.metrics and result.metrics.tuned else EvalMetrics()
    return PromotionRecord(
        run_id=config.run_id,
        job=config.job_name,
        namespace=config.namespace,
        base_model=PromotedModel(uri=spec.model.uri, revision=spec.model.revision),
        method=spec.method.type,
        spec_hash=config.spec_hash,
        adapter_uri=artifacts.adapter_uri,
        merged_uri=artifacts.merged_uri,
        manifest_uri=artifacts.manifest_uri,
        metrics=tuned,
        promoted_at=datetime.now(UTC).replace(microsecond=0),
    )


def publish(
    staging: Path,
    config: TrainerConfig,
    record: PromotionRecord | None,
    decide: promotion.Decide,
    only: tuple[str, ...] = (),
) -> promotion.Outcome | None:
    """Uploads staging to the run prefix (only these files, when given: the rest is there),
    then manifest.json (of every file), then, with a record, promotes it (latest.json, written
    conditionally: promotion.py). Returns the promotion's outcome, None when not promoting."""
    run = config.output_prefix
    entries = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel, data = path.relative_to(staging).as_posix(), path.read_bytes()
        if not only or rel in only:
            storage.write_bytes(storage.join(run, rel), data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "runId": config.run_id,
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": entries,
    }
    storage.write_bytes(storage.join(run, "manifest.json"), json.dumps(manifest, indent=2).encode())
    log.info("Published files=%d uri=%s", len(only) or len(entries), run)
    if record is None:
        return None
    return promotion.promote(config.spec.output.uri, record, decide)
