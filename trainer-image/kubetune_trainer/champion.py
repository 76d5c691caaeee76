"""The champion: the run `<output>/latest.json` names, evaluated on this run's test set so that
gates with `compareWith: promoted` compare like with like.

Evaluated once per run, before training, on rank 0 (its result is kept as `champion.json` in the
run, so a resumed run does not redo it):
- an adapter of the same base model (and revision) is loaded onto the base model already in
  memory, evaluated, and removed again (PEFT's unload; prefix and prompt tuning never change the
  base model's modules), so the champion costs no second copy of the model;
- a full fine-tune (only a merged model) is loaded on its own, evaluated and freed;
- a champion of another base model (a new base model was chosen since) cannot be loaded onto
  this one: its recorded metrics, from its own test set, stand in, and the run says so.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import ADAPTER_METHODS, EvalMetrics, PromotionRecord, TrainerConfig
from kubetune_trainer import data, storage
from kubetune_trainer.errors import SpecError
from kubetune_trainer.evaluation import evaluate
from kubetune_trainer.promotion import read_champion

log = logging.getLogger(__name__)

CACHED = "champion.json"


@dataclass(frozen=True)
class Champion:
    record: PromotionRecord
    metrics: EvalMetrics | None
    generations: list[str]
    note: str = ""  # how the metrics were obtained when not by evaluating here
    regression: EvalMetrics | None = None  # on evaluation.regressionUri, when it is set


def wanted(config: TrainerConfig) -> bool:
    return any(g.reference() == "promoted" for g in config.spec.gates)


def _check_own_runs(output_uri: str, record: PromotionRecord) -> None:
    """latest.json lies in the tenant's bucket, so it is input: the champion it names must be a
    run of this same output (<output.uri>/runs/...). Otherwise a latest.json could make this
    pod fetch another team's model with the profile's identity."""
    runs = storage.join(output_uri, "runs") + "/"
    for name, uri in (("adapterUri", record.adapter_uri), ("mergedUri", record.merged_uri)):
        if uri and (not uri.startswith(runs) or "/../" in uri or uri.endswith("/..")):
            raise SpecError(
                f"{storage.join(output_uri, 'latest.json')}: its {name} {uri} is not a run "
                f"under spec.output.uri ({runs}); restore the file kubetune wrote or delete it "
                "to start without a champion"
            )


def _same_base(config: TrainerConfig, record: PromotionRecord) -> bool:
    base = record.base_model
    model = config.spec.model
    return base is None or (base.uri == model.uri and base.revision == model.revision)


def evaluate_champion(
    config: TrainerConfig,
    model: Any,
    tokenizer: Any,
    examples: list[data.Example],
    rows: Any,
    workdir: Path,
    regression: tuple[list[data.Example], Any] | None = None,
) -> Champion | None:
    """The champion evaluated on the test set, and on the regression set when there is one
    (None when nothing is promoted). The base model is left as it was: a champion adapter
    loaded onto it is removed again."""
    if not wanted(config):
        return None
    record = read_champion(config.spec.output.uri).record
    if record is None:
        log.info("Champion none: nothing promoted yet under %s", config.spec.output.uri)
        return None
    _check_own_runs(config.spec.output.uri, record)
    cached = storage.join(config.output_prefix, CACHED)
    if storage.exists(cached):
        kept = _kept(cached, record)
        if kept is not None:
            return kept
    champion = _evaluate(config, record, model, tokenizer, examples, rows, workdir, regression)
    payload = {
        "runId": record.run_id,
        "metrics": champion.metrics.model_dump(mode="json") if champion.metrics else None,
        "generations": champion.generations,
        "note": champion.note,
        "regression": (
            champion.regression.model_dump(mode="json") if champion.regression else None
        ),
    }
    storage.write_bytes(cached, json.dumps(payload).encode())
    return champion


def _kept(cached: str, record: PromotionRecord) -> Champion | None:
    """The champion's evaluation an earlier attempt of this run kept, if it is of this champion
    and readable (one cut short, or written by another trainer version, is done again)."""
    try:
        saved = json.loads(storage.read_bytes(cached))
        if saved["runId"] != record.run_id:
            return None
        metrics = EvalMetrics.model_validate(saved["metrics"]) if saved["metrics"] else None
        kept = saved.get("regression")
        return Champion(
            record,
            metrics,
            list(saved["generations"]),
            str(saved["note"]),
            EvalMetrics.model_validate(kept) if kept else None,
        )
    except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        log.warning(
            "Champion evaluation kept at %s is unreadable (%s); evaluating again", cached, exc
        )
        return None


def _evaluate(
    config: TrainerConfig,
    record: PromotionRecord,
    model: Any,
    tokenizer: Any,
    examples: list[data.Example],
    rows: Any,
    workdir: Path,
    regression: tuple[list[data.Example], Any] | None = None,
) -> Champion:
    spec = config.spec

    def on_regression_set(candidate: Any) -> EvalMetrics | None:
        if not regression:
            return None
        return evaluate(candidate, tokenizer, *regression, spec.evaluation).metrics

    if not _same_base(config, record):
        note = (
            f"the promoted run {record.run_id} tuned another base model "
            f"({record.base_model.uri if record.base_model else '?'}); its recorded metrics "
            "(from its own test set) stand in"
        )
        log.warning("Champion %s", note)
        return Champion(record, record.metrics, [], note)
    target = workdir / "champion"
    if record.adapter_uri and (record.method in ADAPTER_METHODS or record.method is None):
        from peft import PeftModel

        storage.download(record.adapter_uri, target)
        log.info("Champion run=%s adapter=%s", record.run_id, record.adapter_uri)
        wrapped = PeftModel.from_pretrained(model, str(target), is_trainable=False)
        out = evaluate(wrapped, tokenizer, examples, rows, spec.evaluation)
        guard = on_regression_set(wrapped)
        if not wrapped.peft_config["default"].is_prompt_learning:
            restored = wrapped.unload()  # the adapter's layers out of the base model again
            assert restored is model, "PEFT's unload returned another model"
        del wrapped
        return Champion(record, out.metrics, out.generations, regression=guard)
    if record.merged_uri:
        from transformers import AutoModelForCausalLM

        storage.download(record.merged_uri, target)
        log.info("Champion run=%s merged=%s", record.run_id, record.merged_uri)
        full = AutoModelForCausalLM.from_pretrained(str(target), torch_dtype=model.dtype)
        full.to(model.device)
        out = evaluate(full, tokenizer, examples, rows, spec.evaluation)
        guard = on_regression_set(full)
        del full
        gc.collect()
        return Champion(record, out.metrics, out.generations, regression=guard)
    note = f"the promoted run {record.run_id} names no model to load; its recorded metrics stand in"
    log.warning("Champion %s", note)
    return Champion(record, record.metrics, [], note)
