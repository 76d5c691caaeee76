"""The export and promote stages: artifacts under `<output>/runs/<runId>/`, `manifest.json` last,
and `<output>/latest.json` only when every gate passed.

A reader trusts a run only when its manifest exists and the checksums match; a run that died
half-way through its upload therefore never looks complete, and nothing is promoted before it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune.api import (
    ADAPTER_METHODS,
    Artifacts,
    EvalMetrics,
    FineTuneJobSpec,
    GateResult,
    TrainerConfig,
    TrainerResult,
)
from kubetune_trainer import storage
from kubetune_trainer.data import Example
from kubetune_trainer.gates import describe
from kubetune_trainer.training import TrainOutcome

log = logging.getLogger("kubetune_trainer")


@dataclass
class Evaluation:
    tuned: EvalMetrics
    base: EvalMetrics | None
    tuned_outputs: list[str]
    base_outputs: list[str]
    examples: list[Example]


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


def write_eval_samples(path: Path, evaluation: Evaluation) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, ex in enumerate(evaluation.examples):
            row = {
                "prompt": ex.prompt,
                "reference": ex.completion,
                "base": evaluation.base_outputs[i] if i < len(evaluation.base_outputs) else None,
                "tuned": evaluation.tuned_outputs[i] if i < len(evaluation.tuned_outputs) else None,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def plot_losses(path: Path, history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row(name: str, base: float | None, tuned: float | None) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    return f"| {name} | {fmt(base)} | {fmt(tuned)} |"


def model_card(
    config: TrainerConfig,
    evaluation: Evaluation,
    gates: list[GateResult],
    outcome: TrainOutcome,
    data_report: dict[str, int],
    data_format: str,
) -> str:
    spec = config.spec
    hp = spec.hyperparameters
    tuned = evaluation.tuned.model_dump(by_alias=True)
    base = evaluation.base.model_dump(by_alias=True) if evaluation.base else {}
    rows = [_row(m, base.get(m), tuned.get(m)) for m in spec.evaluation.metrics]
    gate_lines = [f"- {'PASS' if g.passed else 'FAIL'} {describe(g)}" for g in gates] or [
        "- (no gates)"
    ]
    passed = all(g.passed for g in gates)
    lines = [
        f"# {config.job_name} — run {config.run_id}",
        "",
        f"Fine-tuned **{spec.model.uri}** with **{spec.method.type}** on `{spec.dataset.uri}` "
        f"({data_format} format).",
        "",
        "## Data",
        "",
        ", ".join(f"{k}: {v}" for k, v in sorted(data_report.items())),
        "",
        "## Training",
        "",
        f"- steps: {outcome.steps}, epochs: {outcome.epochs:.2f}, "
        f"wall time: {outcome.seconds:.0f} s"
        + (f", resumed from step {outcome.resumed_from_step}" if outcome.resumed_from_step else ""),
        f"- learning rate {hp.learning_rate:g} ({hp.lr_scheduler}), batch size {hp.batch_size} "
        f"(micro-batch {hp.micro_batch_size}), weight decay {hp.weight_decay:g}, seed {hp.seed}",
        "",
        "![loss](loss.png)",
        "",
        "## Evaluation (test set)",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        *rows,
        "",
        "## Gates",
        "",
        *gate_lines,
        "",
        f"Verdict: {'promoted' if passed else 'not promoted'}.",
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
    data_report: dict[str, Any],
    data_format: str,
    result: TrainerResult,
) -> None:
    """Everything of the run but the models: eval samples, loss plot, model card, metrics and the
    full result (what the operator reads when the pod that carried the result is gone)."""
    write_eval_samples(staging / "eval_samples.jsonl", evaluation)
    plot_losses(staging / "loss.png", outcome.history)
    (staging / "report.md").write_text(
        model_card(config, evaluation, gates, outcome, data_report, data_format)
    )
    base = evaluation.base
    (staging / "metrics.json").write_text(
        json.dumps(
            {
                "tuned": evaluation.tuned.model_dump(mode="json"),
                "base": base.model_dump(mode="json") if base else None,
                "history": outcome.history,
                "data": data_report,
            },
            indent=2,
        )
    )
    (staging / "result.json").write_text(result.model_dump_json(indent=2, exclude_none=True))


def latest_record(config: TrainerConfig, result: TrainerResult) -> dict[str, Any]:
    """latest.json: which run is promoted, where its files are and how it scored."""
    artifacts = result.artifacts or Artifacts()
    tuned = result.metrics.tuned if result.metrics and result.metrics.tuned else EvalMetrics()
    return {
        "runId": config.run_id,
        "job": config.job_name,
        "manifestUri": artifacts.manifest_uri,
        "adapterUri": artifacts.adapter_uri,
        "mergedUri": artifacts.merged_uri,
        "metrics": tuned.model_dump(mode="json", exclude_none=True),
    }


def publish(staging: Path, config: TrainerConfig, promote: bool, latest: dict[str, Any]) -> None:
    """Uploads staging to the run prefix, then manifest.json, then (if promoted) latest.json."""
    run = config.output_prefix
    uploaded = storage.upload_dir(staging, run)
    manifest = {
        "runId": config.run_id,
        "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": [{"path": u.path, "size": u.size, "sha256": u.sha256} for u in uploaded],
    }
    storage.write_bytes(storage.join(run, "manifest.json"), json.dumps(manifest, indent=2).encode())
    log.info("Published files=%d uri=%s", len(uploaded), run)
    if promote:
        latest_uri = storage.join(config.spec.output.uri, "latest.json")
        storage.write_bytes(latest_uri, json.dumps(latest, indent=2).encode())
        log.info("Promoted run=%s uri=%s", config.run_id, latest_uri)
