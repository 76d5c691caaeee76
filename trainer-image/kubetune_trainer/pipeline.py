"""The trainer's pipeline: one explicit sequence of named stages for one run.

model (locate, tokenizer) -> data (the tokenizer renders prompts) -> baseline (the base model
evaluated before training) -> train -> evaluate -> gates -> export -> promote. Every failure ends
as a TrainerResult with an exit code.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from kubetune.api import EvalMetrics, ExitCode, MetricsStatus, TrainerConfig, TrainerResult
from kubetune_trainer import data, modeling, storage
from kubetune_trainer.errors import DataError, SpecError, TrainerError
from kubetune_trainer.evaluation import GENERATION_METRICS, EvalOutput, evaluate
from kubetune_trainer.export import (
    Evaluation,
    artifact_uris,
    model_card,
    plot_losses,
    publish,
    save_models,
    write_eval_samples,
)
from kubetune_trainer.gates import check_gates, describe
from kubetune_trainer.telemetry import Reporter
from kubetune_trainer.training import train

log = logging.getLogger("kubetune_trainer")


def _check_spec(config: TrainerConfig, data_format: str) -> None:
    wanted = set(config.spec.evaluation.metrics) & set(GENERATION_METRICS)
    if data_format == "text" and wanted:
        raise SpecError(
            f"spec.evaluation.metrics: {', '.join(sorted(wanted))} need prompt/answer pairs; "
            "a text dataset supports loss and perplexity"
        )


def _baseline(
    config: TrainerConfig, model: Any, tokenizer: Any, examples: list[data.Example], rows: Any
) -> EvalOutput | None:
    """The base model's evaluation, computed once per run and kept in storage for resumes."""
    if not config.spec.evaluation.compare_with_base:
        return None
    cached = storage.join(config.output_prefix, "baseline.json")
    if storage.exists(cached):
        saved = json.loads(storage.read_bytes(cached))
        return EvalOutput(EvalMetrics.model_validate(saved["metrics"]), saved["generations"])
    out = evaluate(model, tokenizer, examples, rows, config.spec.evaluation)
    payload = {"metrics": out.metrics.model_dump(mode="json"), "generations": out.generations}
    storage.write_bytes(cached, json.dumps(payload).encode())
    return out


def run(
    config: TrainerConfig, reporter: Reporter, workdir: Path, cache: Path | None = None
) -> TrainerResult:
    """Runs every stage; never raises for a failure a result can describe.

    workdir holds this run's local files; cache (default workdir/cache) holds staged data and
    converted models, and may be shared between runs.
    """
    try:
        return _run(config, reporter, workdir, cache or workdir / "cache")
    except TrainerError as exc:
        reporter.stage("failed", str(exc))
        return TrainerResult(
            run_id=config.run_id, outcome="Failed", exit_code=exc.exit_code, message=str(exc)
        )
    except Exception as exc:  # a bug or an environment failure: retryable
        log.exception("Trainer failed")
        reporter.stage("failed", str(exc))
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return TrainerResult(
            run_id=config.run_id,
            outcome="Failed",
            exit_code=ExitCode.RUNTIME_ERROR,
            message=f"{type(exc).__name__}: {first}",
        )


def _run(config: TrainerConfig, reporter: Reporter, workdir: Path, cache: Path) -> TrainerResult:
    spec = config.spec
    import transformers

    transformers.set_seed(spec.hyperparameters.seed)

    reporter.stage("model", spec.model.uri)
    source = modeling.locate_model(spec.model.uri, spec.model.revision, cache)
    source = modeling.materialize_gguf(source, cache, spec.model.trust_remote_code)
    tokenizer = modeling.load_tokenizer(source, spec.model.trust_remote_code)

    reporter.stage("data", spec.dataset.uri)
    splits = data.prepare(spec.dataset, tokenizer, workdir / "data")
    _check_spec(config, splits.format)
    max_len = spec.dataset.max_seq_length
    train_rows, too_long = data.tokenize(splits.train, tokenizer, max_len)
    validation_rows, _ = data.tokenize(splits.validation, tokenizer, max_len)
    test_examples = splits.test[: spec.evaluation.max_samples]
    test_rows, _ = data.tokenize(test_examples, tokenizer, max_len)
    splits.report["tooLong"] = too_long
    if not train_rows:
        raise DataError(
            f"every training example is longer than spec.dataset.maxSeqLength ({max_len} tokens)"
        )
    log.info(
        "Data format=%s %s",
        splits.format,
        " ".join(f"{k}={v}" for k, v in sorted(splits.report.items())),
    )

    model = modeling.load_model(spec, source)
    reporter.stage("baseline")
    baseline = _baseline(config, model, tokenizer, test_examples, test_rows)

    # Seed again: loading (or converting) the model may have drawn from the RNG, and the adapter's
    # initialisation must not depend on whether a converted model was already cached.
    transformers.set_seed(spec.hyperparameters.seed)
    model = modeling.apply_method(model, spec, source)
    trainable, total = modeling.count_parameters(model)
    reporter.stage("train", f"{trainable:,} of {total:,} parameters trainable")
    outcome = train(
        model,
        tokenizer,
        train_rows,
        validation_rows,
        spec,
        workdir / "checkpoints",
        storage.join(config.output_prefix, "checkpoints"),
        reporter,
    )

    reporter.stage("evaluate")
    tuned = evaluate(model, tokenizer, test_examples, test_rows, spec.evaluation)
    base_metrics = baseline.metrics if baseline else None
    gates = check_gates(spec.gates, tuned.metrics, base_metrics)
    passed = all(g.passed for g in gates)
    for g in gates:
        log.info("Gate %s %s", "passed" if g.passed else "FAILED", describe(g))

    reporter.stage("export")
    staging = workdir / "export"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    merge = spec.output.merge_adapter and passed
    merged = save_models(
        model, tokenizer, spec, staging, merge, lambda: modeling.load_unquantized(spec, source)
    )
    evaluation = Evaluation(
        tuned.metrics,
        base_metrics,
        tuned.generations,
        baseline.generations if baseline else [],
        test_examples,
    )
    write_eval_samples(staging / "eval_samples.jsonl", evaluation)
    plot_losses(staging / "loss.png", outcome.history)
    (staging / "report.md").write_text(
        model_card(config, evaluation, gates, outcome, splits.report, splits.format)
    )
    metrics = MetricsStatus(tuned=tuned.metrics, base=base_metrics)
    (staging / "metrics.json").write_text(
        json.dumps(
            {
                "tuned": tuned.metrics.model_dump(mode="json"),
                "base": base_metrics.model_dump(mode="json") if base_metrics else None,
                "history": outcome.history,
                "data": splits.report,
            },
            indent=2,
        )
    )
    failed = [describe(g) for g in gates if not g.passed]
    result = TrainerResult(
        run_id=config.run_id,
        outcome="Succeeded" if passed else "GatesFailed",
        exit_code=ExitCode.SUCCEEDED if passed else ExitCode.GATES_FAILED,
        message=(
            f"trained {outcome.steps} steps; {len(gates)} gate(s) passed; promoted"
            if passed
            else f"gates failed: {'; '.join(failed)}; nothing promoted"
        ),
        steps=outcome.steps,
        epochs=outcome.epochs,
        train_seconds=outcome.seconds,
        resumed_from_step=outcome.resumed_from_step,
        metrics=metrics,
        gates=gates,
        artifacts=artifact_uris(config, spec, merged),
        promoted=passed,
    )
    artifacts = result.artifacts
    assert artifacts is not None
    (staging / "result.json").write_text(result.model_dump_json(indent=2, exclude_none=True))
    latest = {
        "runId": config.run_id,
        "job": config.job_name,
        "manifestUri": artifacts.manifest_uri,
        "adapterUri": artifacts.adapter_uri,
        "mergedUri": artifacts.merged_uri,
        "metrics": tuned.metrics.model_dump(mode="json", exclude_none=True),
    }
    publish(staging, config, passed, latest)
    reporter.stage("done", result.message)
    return result
