"""The trainer's pipeline: one explicit sequence of named stages for one run.

model (locate, tokenizer) -> data (the tokenizer renders prompts) -> baseline (the base model
evaluated before training) -> train -> evaluate -> gates -> export -> promote, one function each
(`_prepare` holds the first two, `_evaluate` the gates, `_export` the promotion); the files of a
run are written by export.py. Every failure ends as a TrainerResult with an exit code.

In a distributed run every rank runs this same sequence (distributed.py): each prepares the model
and data, all train together, and rank 0 alone evaluates, judges, exports and promotes while the
others wait; every rank ends with rank 0's result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api import (
    RUN_RECORD,
    EvalMetrics,
    ExitCode,
    GateResult,
    MetricsStatus,
    RegressionMetrics,
    TrainerConfig,
    TrainerResult,
    credential_routes,
)
from kubetune.api.types import DATA_EXTENSIONS
from kubetune.api.wire import Stage
from kubetune_trainer import champion, data, distributed, hub, modeling, promotion, storage
from kubetune_trainer.errors import DataError, SpecError, TrainerError, first_line
from kubetune_trainer.evaluation import GENERATION_METRICS, EvalOutput, evaluate
from kubetune_trainer.export import (
    Evaluation,
    artifact_uris,
    latest_record,
    publish,
    save_models,
    write_run_files,
)
from kubetune_trainer.gates import References, check_gates, describe
from kubetune_trainer.model_cache import ModelCache
from kubetune_trainer.telemetry import Reporter, Reporters
from kubetune_trainer.tracking import Tracking
from kubetune_trainer.training import TrainOutcome, train

log = logging.getLogger("kubetune_trainer")


def _check_spec(config: TrainerConfig, data_format: str) -> None:
    wanted = set(config.spec.evaluation.metrics) & set(GENERATION_METRICS)
    if data_format == "text" and wanted:
        raise SpecError(
            f"spec.evaluation.metrics: {', '.join(sorted(wanted))} need prompt/answer pairs; "
            "a text dataset supports loss and perplexity"
        )


@dataclass(frozen=True)
class Baseline:
    """The base model's evaluation on the test set, and on the regression set when set."""

    test: EvalOutput
    regression: EvalMetrics | None = None


def _baseline(config: TrainerConfig, model: Any, prepared: Prepared) -> Baseline | None:
    """The base model's evaluation, computed once per run and kept in storage for resumes."""
    if not config.spec.evaluation.compare_with_base:
        return None
    cached = storage.join(config.output_prefix, "baseline.json")
    if storage.exists(cached):
        saved = json.loads(storage.read_bytes(cached))
        kept = saved.get("regression")
        return Baseline(
            EvalOutput(EvalMetrics.model_validate(saved["metrics"]), saved["generations"]),
            EvalMetrics.model_validate(kept) if kept else None,
        )
    tokenizer, spec = prepared.tokenizer, config.spec.evaluation
    out = evaluate(model, tokenizer, prepared.test_examples, prepared.test_rows, spec)
    guard = _on_regression_set(model, prepared, spec)
    payload = {
        "metrics": out.metrics.model_dump(mode="json"),
        "generations": out.generations,
        "regression": guard.model_dump(mode="json") if guard else None,
    }
    storage.write_bytes(cached, json.dumps(payload).encode())
    return Baseline(out, guard)


def _on_regression_set(model: Any, prepared: Prepared, spec: Any) -> EvalMetrics | None:
    if not prepared.regression_examples:
        return None
    rows = prepared.regression_rows
    return evaluate(model, prepared.tokenizer, prepared.regression_examples, rows, spec).metrics


class _LibraryWarnings(logging.Handler):
    """The libraries' warnings into trainer.log (the trainer's own lines get there through its
    own logger's handler, not twice)."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(logging.WARNING)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(log.name):
            self.target.handle(record)


def _quiet_libraries() -> Callable[[], None]:
    """transformers' warnings through the root logger (to trainer.log) instead of its own stderr
    handler, and no library progress bars ("Loading weights", "Writing model shards",
    downloads): the run's reporter says what stage it is in. Returns what restores them."""
    from transformers.utils import logging as hf_logging

    library = logging.getLogger("transformers")
    hf_logging.get_logger("transformers")  # its handler set up first, as transformers does
    handlers, propagate = list(library.handlers), library.propagate
    bars = hf_logging.is_progress_bar_enabled()
    for handler in handlers:
        library.removeHandler(handler)
    library.propagate = True
    hf_logging.disable_progress_bar()

    def restore() -> None:
        library.propagate = propagate
        for handler in handlers:
            library.addHandler(handler)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def warnings_captured() -> bool:
    """Whether Python's warnings already go to logging (a caller's logging.captureWarnings)."""
    import warnings

    return getattr(warnings.showwarning, "__module__", "") == "logging"


def run(
    config: TrainerConfig, reporter: Reporter, workdir: Path, cache: Path | None = None
) -> TrainerResult:
    """Runs every stage; never raises for a failure a result can describe.

    workdir holds this run's local files; cache (default workdir/cache) holds staged data and
    converted models, and may be shared between runs. In a distributed run rank 0 works in
    workdir and rank N in workdir/rank-N; the cache is shared by the ranks of a pod.
    """
    rank = distributed.current()
    cache = cache or workdir / "cache"
    if not rank.main:
        workdir = workdir / f"rank-{rank.rank}"
    # The run's own log, kept beside its artifacts (trainer.log): it outlives the pod.
    workdir.mkdir(parents=True, exist_ok=True)
    # The trainer's own lines (INFO and up), and on the root logger the libraries' warnings
    # (bitsandbytes, Python's warnings: WARNING and up only), which kubetune run's console does
    # not show (it shows the trainer's own WARNINGs).
    handler = logging.FileHandler(workdir / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    libraries = _LibraryWarnings(handler)
    root = logging.getLogger()
    root.addHandler(libraries)
    captured = warnings_captured()
    logging.captureWarnings(True)
    restore_libraries = _quiet_libraries()
    # Each storage source with a Secret of its own reads and writes with it.
    storage.use_credentials(credential_routes(config.spec, config.model_cache))
    # Trackers hear from rank 0 only, and only from a run that trains: one run, one record.
    tracking = Tracking([])
    opened = False  # the run is this process's to write (checked, and not finished before)
    try:
        _check_outside_cache(config)
        _check_world(config, rank)
        done = finished_run(config, promote=rank.main)
        if done is not None:  # never reopened: resuming is for a run that was interrupted
            reporter.stage(Stage.DONE, done.warnings[-1])  # the note that says so
            result = done
        else:
            opened = True
            tracking = Tracking.for_config(config, workdir) if rank.main else Tracking([])
            reporter = Reporters(reporter, tracking)
            distributed.init(rank)
            result = _run(config, reporter, tracking, workdir, cache)
    except distributed.RankZeroError as exc:  # rank 0's failure, told to this rank
        reporter.stage(Stage.FAILED, str(exc))
        result = TrainerResult(
            run_id=config.run_id, outcome="Failed", exit_code=exc.exit_code, message=str(exc)
        )
    except TrainerError as exc:
        # In trainer.log (INFO: the console and the pod's log say it as the run's outcome).
        log.info("Failed exit_code=%d %s", int(exc.exit_code), exc)
        reporter.stage(Stage.FAILED, str(exc))
        result = _failure(config, rank, exc.exit_code, str(exc))
    except Exception as exc:  # a bug or an environment failure: retryable
        first = first_line(exc)
        if rank.distributed and distributed.peer_lost(exc):
            log.error("Lost another process of the run: %s", first)
            code, message = ExitCode.PEER_LOST, f"lost another process of the run ({first})"
        else:
            log.exception("Trainer failed")
            code, message = ExitCode.RUNTIME_ERROR, f"{type(exc).__name__}: {first}"
        reporter.stage(Stage.FAILED, message)
        result = _failure(config, rank, code, message)
    finally:
        restore_libraries()
        if not captured:
            logging.captureWarnings(False)
        root.removeHandler(libraries)
        log.removeHandler(handler)
        handler.close()
    if opened and rank.main and result.outcome == "Failed":
        _keep_failure(config, result, workdir)
    tracking.close(result, workdir / STAGING)
    return result


def _keep_failure(config: TrainerConfig, result: TrainerResult, workdir: Path) -> None:
    """A failed attempt's result.json and trainer.log in the run's folder, so that what went
    wrong outlives the pod. No manifest.json: the run is not finished (a retry trains, and its
    publish replaces both); the operator reads a result.json only beside a manifest. Best
    effort: a store that cannot be written (perhaps why the run failed) loses only this."""
    try:
        if storage.exists(storage.join(config.output_prefix, "manifest.json")):
            return  # published before it failed (promoting, say): its files stay as checksummed
        storage.write_bytes(
            storage.join(config.output_prefix, "result.json"),
            result.model_dump_json(indent=2, exclude_none=True).encode(),
        )
        if (workdir / LOG_FILE).exists():
            storage.write_bytes(
                storage.join(config.output_prefix, LOG_FILE), (workdir / LOG_FILE).read_bytes()
            )
    except Exception as exc:
        first = first_line(exc)[:300]
        log.warning("The failed run's result.json and trainer.log were not stored: %s", first)


def finished_run(config: TrainerConfig, promote: bool = True) -> TrainerResult | None:
    """The stored result of this run if it has finished: its manifest.json is written after
    result.json. A finished run (promoted or not) is never trained, judged or written again,
    whatever runs it again (the same spec with `kubetune run`, a retried pod): reopening it
    would resume past its last step and judge it against itself as the champion.

    The stored result is the tenant's bucket speaking, so it counts only if it is this run's
    (its runId, its artifacts under this run's prefix); otherwise the run is trained afresh.
    A run stopped between its manifest and its promotion (latest.json) has its promotion
    completed here (when promote: rank 0), under the same conditional write and the same
    rule against a better run promoted meanwhile."""
    run = config.output_prefix
    try:
        if not storage.exists(storage.join(run, "manifest.json")):
            return None
    except Exception as exc:  # unreadable: the stages report the storage problem themselves
        log.warning("Could not tell whether run %s already finished: %s", config.run_id, exc)
        return None
    try:
        stored = TrainerResult.model_validate_json(
            storage.read_bytes(storage.join(run, "result.json"))
        )
    except Exception as exc:
        first = first_line(exc)
        raise TrainerError(
            f"run {config.run_id} has a manifest.json but its result.json cannot be read "
            f"({first}): {run}; if the storage is reachable the run's files were changed after "
            "it finished: start a new run (a changed spec, or kubetune run --fresh)"
        ) from exc
    foreign = _foreign(config, stored)
    if foreign:
        log.warning(
            "The files at %s are not this run's (%s): training run %s afresh",
            run, foreign, config.run_id,
        )  # fmt: skip
        return None
    if stored.promoted and promote:
        stored = _complete_promotion(config, stored)
    note = (
        f"run {config.run_id} had already finished ({stored.outcome}); nothing was trained, "
        "judged or written again (to train on changed data, change the spec or run "
        "kubetune run --fresh)"
    )
    log.warning("%s", note)
    return stored.model_copy(update={"warnings": [*stored.warnings, note]})


def _foreign(config: TrainerConfig, stored: TrainerResult) -> str:
    """Why a stored result is not this run's ('' when it is)."""
    if stored.run_id != config.run_id:
        return f"result.json names run {stored.run_id}"
    prefix = config.output_prefix.rstrip("/") + "/"
    artifacts = stored.artifacts.model_dump(exclude_none=True) if stored.artifacts else {}
    outside = sorted(
        k
        for k, uri in artifacts.items()
        if not str(uri).startswith(prefix) or _dot_segments(str(uri)[len(prefix) :])
    )
    return f"its {', '.join(outside)} lie outside {prefix}" if outside else ""


def _dot_segments(path: str) -> bool:
    """Whether a path has segments that a store would resolve ('.', '..', percent-encoded)."""
    return any(part in (".", "..") or "%" in part for part in path.split("/"))


def _complete_promotion(config: TrainerConfig, stored: TrainerResult) -> TrainerResult:
    """A promoted run counts as promoted only if latest.json names it: if the run stopped
    before writing it, it is written now, under the same conditional write and the same rule
    against a better run promoted meanwhile. When another run holds latest.json (promoted since,
    or instead), the run is reported as not promoted, and its result.json says so: announcing
    it again would send serving back to it."""
    current = promotion.read_champion(config.spec.output.uri).record
    if current is not None and current.run_id == config.run_id:
        return stored
    reason = f"run {current.run_id} is the promoted run now" if current is not None else ""
    if current is None or (
        stored.promoted_at is not None
        and current.promoted_at is not None
        and current.promoted_at < stored.promoted_at
    ):  # older than this run's promotion: it never happened
        record = latest_record(config, stored)
        if stored.promoted_at is not None:
            record = record.model_copy(update={"promoted_at": stored.promoted_at})
        decide = promotion.decider(
            config.run_id, config.spec.gates, record.metrics or EvalMetrics(),
            stored.previous_run_id,
        )  # fmt: skip
        outcome = promotion.promote(config.spec.output.uri, record, decide)
        if outcome.promoted:
            log.warning("Run %s stopped before its promotion; promoted it now", config.run_id)
            return stored
        reason = outcome.reason
    log.warning("Run %s is not the promoted run: %s", config.run_id, reason)
    lost = stored.model_copy(
        update={
            "promoted": False,
            "promoted_at": None,
            "outcome": "GatesFailed",
            "exit_code": ExitCode.GATES_FAILED,
            "message": f"gates passed but not promoted: {reason}",
        }
    )
    _rewrite_result(config, lost)
    return lost


def _rewrite_result(config: TrainerConfig, result: TrainerResult) -> None:
    """result.json replaced, and its line in manifest.json with it (checksums stay true)."""
    run = config.output_prefix
    body = result.model_dump_json(indent=2, exclude_none=True).encode()
    storage.write_bytes(storage.join(run, "result.json"), body)
    manifest = json.loads(storage.read_bytes(storage.join(run, "manifest.json")))
    for entry in manifest.get("files", []):
        if entry.get("path") == "result.json":
            entry.update(size=len(body), sha256=hashlib.sha256(body).hexdigest())
    storage.write_bytes(storage.join(run, "manifest.json"), json.dumps(manifest, indent=2).encode())


def _check_world(config: TrainerConfig, rank: distributed.Rank) -> None:
    expected = config.world_size or 1
    if rank.world_size != expected:
        raise SpecError(
            f"the run was configured for {expected} process(es) (spec.resources.nodes times the "
            f"processes per pod) but launched with {rank.world_size}; launch it with "
            "python -m kubetune_trainer.launch, which reads the same numbers"
        )


def _failure(
    config: TrainerConfig, rank: distributed.Rank, code: ExitCode, message: str
) -> TrainerResult:
    """A failure of this process; in a distributed run it names the rank."""
    if rank.distributed:
        message = f"rank {rank.rank} (pod {rank.node}, local rank {rank.local_rank}): {message}"
    return TrainerResult(
        run_id=config.run_id,
        outcome="Failed",
        exit_code=code,
        message=message,
        rank=rank.rank if rank.distributed else None,
    )


LOG_FILE = "trainer.log"
STAGING = "export"  # the run's files, staged in the workdir before they are published


@dataclass
class Prepared:
    """What the model and data stages hand on: the model's source, its tokenizer and the splits."""

    source: modeling.ModelSource
    tokenizer: Any
    splits: data.Splits
    train_rows: list[dict[str, list[int]]]
    validation_rows: list[dict[str, list[int]]]
    test_examples: list[data.Example]
    test_rows: list[dict[str, list[int]]]
    leakage: data.Leakage
    # evaluation.regressionUri's examples (up to maxSamples), for the forgetting check
    regression_examples: list[data.Example] = field(default_factory=list)
    regression_rows: list[dict[str, list[int]]] = field(default_factory=list)


def _run(
    config: TrainerConfig, reporter: Reporter, tracking: Tracking, workdir: Path, cache: Path
) -> TrainerResult:
    import transformers

    started = time.monotonic()
    tracking.check_installed()
    tracking.start()
    transformers.set_seed(config.spec.hyperparameters.seed)
    pinned = distributed.on_main(lambda: _pin_inputs(config))
    assert pinned is not None
    config = pinned
    prepared = _prepare(config, reporter, workdir, cache)
    tracking.params(_data_params(prepared))
    model = modeling.load_model(config.spec, prepared.source)
    reporter.stage(Stage.BASELINE)
    # The base model's evaluation and the champion's (the promoted run, when a gate compares
    # with it): rank 0's, once for the run.
    references = distributed.on_main(
        lambda: (
            _baseline(config, model, prepared),
            champion.evaluate_champion(
                config,
                model,
                prepared.tokenizer,
                prepared.test_examples,
                prepared.test_rows,
                workdir,
                (prepared.regression_examples, prepared.regression_rows)
                if prepared.regression_examples
                else None,
            ),
        )
    )
    assert references is not None
    baseline, champ = references
    model, outcome = _train(config, reporter, workdir, prepared, model)
    outcome.started = started

    def judge_and_export() -> TrainerResult:
        reporter.stage(Stage.EVALUATE)
        evaluation, gates = _evaluate(config, prepared, model, baseline, champ)
        reporter.stage(Stage.EXPORT)
        return _export(
            config, workdir, prepared, model, outcome, evaluation, gates, tracking, champ
        )

    result = distributed.on_main(judge_and_export)
    assert result is not None
    reporter.stage(Stage.DONE, result.message)
    return result


INPUTS = "inputs.json"  # the data files a run chose for URIs that name a prefix


def _pin_inputs(config: TrainerConfig) -> TrainerConfig:
    """The config with each data URI that names a prefix (ends in /) replaced by the newest data
    file under it. Chosen once, when the run starts, and kept in the run (inputs.json): a
    resumed run trains on what it started with, even when newer data has arrived since."""
    spec = config.spec
    fields = {
        "dataset.uri": spec.dataset.uri,
        "dataset.validationUri": spec.dataset.validation_uri,
        "dataset.testUri": spec.dataset.test_uri,
        "evaluation.regressionUri": spec.evaluation.regression_uri,
    }
    prefixes = {k: v for k, v in fields.items() if v and v.endswith("/")}
    if not prefixes:
        return config
    kept = storage.join(config.output_prefix, INPUTS)
    chosen: dict[str, str] = {}
    if storage.exists(kept):
        chosen = json.loads(storage.read_bytes(kept))
    for name, prefix in prefixes.items():
        if chosen.get(name, "").startswith(prefix):
            continue
        found = storage.newest(prefix, DATA_EXTENSIONS)
        if found is None:
            raise DataError(
                f"spec.{name}: no data file ({', '.join(DATA_EXTENSIONS)}) under {prefix}; "
                "upload one, or name a file"
            )
        chosen[name] = found
    storage.write_bytes(kept, json.dumps(chosen, indent=2).encode())
    for name in prefixes:
        log.info("Data %s=%s (the newest under %s)", name, chosen[name], prefixes[name])
    dataset = spec.dataset.model_copy(
        update={
            "uri": chosen.get("dataset.uri", spec.dataset.uri),
            "validation_uri": chosen.get("dataset.validationUri", spec.dataset.validation_uri),
            "test_uri": chosen.get("dataset.testUri", spec.dataset.test_uri),
        }
    )
    evaluation = spec.evaluation.model_copy(
        update={
            "regression_uri": chosen.get("evaluation.regressionUri", spec.evaluation.regression_uri)
        }
    )
    resolved = spec.model_copy(update={"dataset": dataset, "evaluation": evaluation})
    return config.model_copy(update={"spec": resolved})


def _check_outside_cache(config: TrainerConfig) -> None:
    """Artifacts are never written with the model cache's credentials: an output inside the
    cache's prefix would be (storage routes a URI to its longest matching source). The operator
    refuses such a job under its profile; this holds for `kubetune run` and older operators."""
    cache = config.model_cache.uri if config.model_cache else None
    output = config.spec.output.uri.rstrip("/")
    if cache and (output == cache.rstrip("/") or output.startswith(cache.rstrip("/") + "/")):
        raise SpecError(
            f"spec.output.uri: {config.spec.output.uri} lies in the profile's model cache "
            f"({cache}); write the run elsewhere"
        )


def _prepare(config: TrainerConfig, reporter: Reporter, workdir: Path, cache: Path) -> Prepared:
    """The model stage (locate, convert, tokenizer) and the data stage (the tokenizer renders
    the prompts): everything but the weights."""
    spec = config.spec
    reporter.stage(Stage.MODEL, spec.model.uri)
    # The cache lock's holder names this run and node: a retry of the same run (a new pod)
    # takes over the lock its killed predecessor left.
    rank = distributed.current()
    holder = f"{config.run_id}/node-{rank.node}"
    shared = ModelCache(config.model_cache, cache, holder=holder) if config.model_cache else None
    # The ranks of a pod share its cache: the first fills it (a download, a GGUF conversion),
    # the others then find it there.
    local_first = rank.local_rank == 0
    if not local_first:
        distributed.barrier()
    with hub.refusals(spec.model):
        source = modeling.locate_model(spec.model.uri, spec.model.revision, cache, shared)
        source = modeling.materialize_gguf(source, cache, spec.model.trust_remote_code)
    if local_first:
        distributed.barrier()
    with hub.refusals(spec.model):
        tokenizer = modeling.load_tokenizer(source, spec.model.trust_remote_code)

    reporter.stage(Stage.DATA, spec.dataset.uri)
    splits = data.prepare(spec.dataset, tokenizer, workdir / "data")
    if spec.dataset.chat_template is not None:
        # The exported tokenizer renders prompts the way training saw them.
        tokenizer.chat_template = splits.prompts.template
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
    leak = data.leakage(splits.train, test_examples)
    log.info(
        "Test overlap test=%d answers_in_train=%d prompts_in_train=%d pairs_in_train=%d",
        leak.test,
        leak.answers_in_train,
        leak.prompts_in_train,
        leak.pairs_in_train,
    )
    if leak.warning():
        log.warning("%s", leak.warning())
    regression_examples: list[data.Example] = []
    regression_rows: list[dict[str, list[int]]] = []
    if spec.evaluation.regression_uri:
        regression_examples, regression_rows = _regression_set(
            spec.evaluation.regression_uri, tokenizer, workdir, splits, config
        )
    return Prepared(
        source,
        tokenizer,
        splits,
        train_rows,
        validation_rows,
        test_examples,
        test_rows,
        leak,
        regression_examples,
        regression_rows,
    )


def _regression_set(
    uri: str, tokenizer: Any, workdir: Path, splits: data.Splits, config: TrainerConfig
) -> tuple[list[data.Example], list[dict[str, list[int]]]]:
    """evaluation.regressionUri read in its own format (general behaviour need not look like
    the task's data), its prompts rendered as the training data's are."""
    spec = config.spec
    examples, fmt, _, _ = data.load_examples(
        uri,
        tokenizer,
        workdir / "data",
        "auto",
        splits.prompts,
        data.max_file_bytes(spec.dataset),
    )
    examples = examples[: spec.evaluation.max_samples]
    wanted = set(spec.evaluation.metrics) & set(GENERATION_METRICS)
    if fmt == "text" and wanted:
        raise SpecError(
            f"spec.evaluation.regressionUri: {uri} is plain text; "
            f"{', '.join(sorted(wanted))} need prompt/answer pairs (use an alpaca, chat or "
            "prompt/completion file, or evaluate only loss and perplexity)"
        )
    rows, _ = data.tokenize(examples, tokenizer, spec.dataset.max_seq_length)
    if not examples:
        raise DataError(f"spec.evaluation.regressionUri: {uri} has no usable examples")
    log.info("Regression set examples=%d format=%s", len(examples), fmt)
    return examples, rows


def _data_params(prepared: Prepared) -> dict[str, Any]:
    """What the data stage read, as tracked parameters (data.train, data.sha256, ...)."""
    splits, leak = prepared.splits, prepared.leakage
    return {
        **{f"data.{key}": value for key, value in splits.report.items()},
        "data.format": splits.format,
        "data.sha256": splits.sha256,
        "data.prompt": splits.prompts.describe(),
        "data.leakage.answersInTrain": leak.answers_in_train,
        "data.leakage.promptsInTrain": leak.prompts_in_train,
    }


def _train(
    config: TrainerConfig, reporter: Reporter, workdir: Path, prepared: Prepared, model: Any
) -> tuple[Any, TrainOutcome]:
    """The method applied to the model, then training (with checkpoints and resume)."""
    import transformers

    spec = config.spec
    # Seed again: loading (or converting) the model may have drawn from the RNG, and the adapter's
    # initialisation must not depend on whether a converted model was already cached.
    transformers.set_seed(spec.hyperparameters.seed)
    model = modeling.apply_method(model, spec, prepared.source)
    trainable, total = modeling.count_parameters(model)
    reporter.stage(Stage.TRAIN, f"{trainable:,} of {total:,} parameters trainable")
    outcome = train(
        model,
        prepared.tokenizer,
        prepared.train_rows,
        prepared.validation_rows,
        spec,
        workdir / "checkpoints",
        storage.join(config.output_prefix, "checkpoints"),
        reporter,
    )
    if outcome.model is not None:  # FSDP: the trained model, gathered whole on rank 0
        model, outcome.model = outcome.model, None
    return model, outcome


def _evaluate(
    config: TrainerConfig,
    prepared: Prepared,
    model: Any,
    baseline: Baseline | None,
    champ: champion.Champion | None,
) -> tuple[Evaluation, list[GateResult]]:
    """The tuned model on the test set (and the regression set), beside the baseline and the
    champion, and the gates' verdicts."""
    spec = config.spec
    tuned = evaluate(
        model, prepared.tokenizer, prepared.test_examples, prepared.test_rows, spec.evaluation
    )
    base_metrics = baseline.test.metrics if baseline else None
    refs = References(
        base=base_metrics,
        promoted=champ.metrics if champ else None,
        promoted_run_id=champ.record.run_id if champ else None,
    )
    regression, refs_r = None, References()
    guard = _on_regression_set(model, prepared, spec.evaluation)
    if guard is not None:
        measured = champ is not None and champ.regression is not None
        regression = RegressionMetrics(
            tuned=guard,
            base=baseline.regression if baseline else None,
            promoted=champ.regression if champ else None,
        )
        refs_r = References(
            base=regression.base,
            promoted=regression.promoted,
            promoted_run_id=champ.record.run_id if champ and measured else None,
            unpromoted="nothing promoted yet"
            if champ is None
            else f"promoted {champ.record.run_id} not measured on this set",
        )
    gates = check_gates(
        spec.gates, tuned.metrics, refs, (guard, refs_r) if guard is not None else None
    )
    for g in gates:
        log.info("Gate %s %s", "passed" if g.passed else "FAILED", describe(g))
    evaluation = Evaluation(
        tuned.metrics,
        base_metrics,
        tuned.generations,
        baseline.test.generations if baseline else [],
        prepared.test_examples,
        promoted=refs.promoted,
        promoted_outputs=champ.generations if champ else [],
        promoted_run_id=refs.promoted_run_id,
        regression=regression,
        regression_examples=len(prepared.regression_examples),
    )
    return evaluation, gates


def _export(
    config: TrainerConfig,
    workdir: Path,
    prepared: Prepared,
    model: Any,
    outcome: TrainOutcome,
    evaluation: Evaluation,
    gates: list[GateResult],
    tracking: Tracking,
    champ: champion.Champion | None = None,
) -> TrainerResult:
    """The models and the run's files staged, then published; promoted only if every gate
    passed and no better run was promoted meanwhile (promotion.py). The trackers get the
    result before the files are written (W&B's offline records go into them) and the files
    once they are published."""
    spec = config.spec
    decide = promotion.decider(
        config.run_id, spec.gates, evaluation.tuned, champ.record.run_id if champ else None
    )
    passed = all(g.passed for g in gates)
    superseded = ""
    if passed:  # checked again, atomically, when latest.json is written
        superseded = decide(promotion.read_champion(spec.output.uri).record) or ""
    staging = workdir / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    source = prepared.source
    merged = save_models(
        model,
        prepared.tokenizer,
        spec,
        staging,
        spec.output.merge_adapter and passed and not superseded,
        lambda: modeling.load_unquantized(spec, source),
    )
    result = _result(config, outcome, evaluation, gates, merged, superseded)
    result = result.model_copy(
        update={"warnings": [w] if (w := prepared.leakage.warning()) else []}
    )
    tracking.finish(result, staging)
    if tracking.warnings:
        result = result.model_copy(update={"warnings": [*result.warnings, *tracking.warnings]})

    def write(res: TrainerResult, why: str) -> None:
        write_run_files(
            staging, config, evaluation, gates, outcome, prepared.splits, prepared.leakage, res, why
        )
        # The record latest.json got for this run, kept with it (in its manifest): what a
        # rollback to this run writes back.
        record = staging / RUN_RECORD
        if res.promoted:
            update = {"promoted_at": res.promoted_at, "previous_run_id": res.previous_run_id}
            promoted = latest_record(config, res).model_copy(update=update)
            record.write_text(promoted.model_dump_json(by_alias=True, exclude_none=True, indent=2))
        else:
            record.unlink(missing_ok=True)

    if (workdir / LOG_FILE).exists():
        shutil.copyfile(workdir / LOG_FILE, staging / LOG_FILE)  # the log up to the upload
    files = promotion.RunFiles(
        write=write,
        publish=lambda record, only: publish(staging, config, record, decide, only=only),
        lost=lambda why: _result(config, outcome, evaluation, gates, merged, why),
    )
    return promotion.settle(
        spec.output.uri,
        config.run_id,
        result,
        superseded,
        lambda res: latest_record(config, res),
        files,
    )


def _result(
    config: TrainerConfig,
    outcome: TrainOutcome,
    evaluation: Evaluation,
    gates: list[GateResult],
    merged: bool,
    superseded: str,
) -> TrainerResult:
    passed = all(g.passed for g in gates) and not superseded
    failed = [describe(g) for g in gates if not g.passed]
    if passed and not gates:
        message = f"trained {outcome.steps} steps; promoted: the job has no gates to pass"
    elif passed:
        message = f"trained {outcome.steps} steps; {len(gates)} gate(s) passed; promoted"
    elif superseded:
        message = f"trained {outcome.steps} steps; gates passed but not promoted: {superseded}"
    else:
        message = f"gates failed: {'; '.join(failed)}; nothing promoted"
    return TrainerResult(
        run_id=config.run_id,
        outcome="Succeeded" if passed else "GatesFailed",
        exit_code=ExitCode.SUCCEEDED if passed else ExitCode.GATES_FAILED,
        message=message,
        steps=outcome.steps,
        epochs=outcome.epochs,
        train_seconds=outcome.seconds,
        tokens=outcome.tokens,
        resumed_from_step=outcome.resumed_from_step,
        tokens_per_second=outcome.tokens_per_second,
        metrics=MetricsStatus(
            tuned=evaluation.tuned,
            base=evaluation.base,
            promoted=evaluation.promoted,
            promoted_run_id=evaluation.promoted_run_id,
            regression=evaluation.regression,
        ),
        gates=gates,
        artifacts=artifact_uris(config, config.spec, merged),
        promoted=passed,
    )
