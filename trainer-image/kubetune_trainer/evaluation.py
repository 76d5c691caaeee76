"""The evaluate stage: teacher-forced loss and perplexity, and greedy generations scored with
rougeL, bleu and exactMatch, for the tuned model and (before training) the base model."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from kubetune.api import EvalMetrics, EvaluationSpec
from kubetune_trainer.data import Example

GENERATION_METRICS = ("rougeL", "bleu", "exactMatch")


@dataclass
class EvalOutput:
    metrics: EvalMetrics
    generations: list[str]


def normalize(text: str) -> str:
    """What exactMatch compares: the text with runs of whitespace made one space, trimmed."""
    return re.sub(r"\s+", " ", text).strip()


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def sample_scores(prediction: str, reference: str, metrics: list[str]) -> dict[str, float]:
    """One example's exactMatch (0 or 1) and rougeL F1: what eval_samples.jsonl records and
    the test-set scores average (bleu is a corpus score only)."""
    out: dict[str, float] = {}
    if "exactMatch" in metrics:
        out["exactMatch"] = float(normalize(prediction) == normalize(reference))
    if "rougeL" in metrics:
        out["rougeL"] = _rouge().score(reference, prediction)["rougeL"].fmeasure
    return out


def score(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not references:
        return out
    per_sample = [
        sample_scores(p, r, metrics) for p, r in zip(predictions, references, strict=True)
    ]
    for name in ("exactMatch", "rougeL"):
        if name in metrics:
            out[name] = sum(s[name] for s in per_sample) / len(per_sample)
    if "bleu" in metrics:
        import sacrebleu

        out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    return out


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def teacher_forced_loss(
    model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int
) -> float:
    """Mean cross-entropy over every completion token of rows."""
    import torch

    total, tokens = 0.0, 0
    device = _device(model)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                labels[i, :n] = torch.tensor(r["labels"])
                mask[i, :n] = 1
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
            )
            count = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * count
            tokens += count
    return total / max(tokens, 1)


def generate(
    model: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers to each example's prompt, batched with left padding."""
    import torch

    device = _device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                encoded = [
                    tokenizer(ex.prompt, add_special_tokens=not ex.templated)["input_ids"]
                    for ex in batch
                ]
                padded = tokenizer.pad({"input_ids": encoded}, return_tensors="pt")
                generated = model.generate(
                    input_ids=padded["input_ids"].to(device),
                    attention_mask=padded["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                width = padded["input_ids"].shape[1]
                for row in generated:
                    outputs.append(tokenizer.decode(row[width:], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return outputs


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    rows: list[dict[str, list[int]]],
    spec: EvaluationSpec,
    batch_size: int = 16,
) -> EvalOutput:
    was_training = model.training
    model.eval()
    try:
        values: dict[str, float] = {}
        if {"loss", "perplexity"} & set(spec.metrics) and rows:
            loss = teacher_forced_loss(model, rows, tokenizer.pad_token_id, batch_size)
            values["loss"] = loss
            values["perplexity"] = math.exp(min(loss, 700.0))
        generations: list[str] = []
        if set(GENERATION_METRICS) & set(spec.metrics):
            generations = generate(model, tokenizer, examples, spec.max_new_tokens, batch_size)
            values.update(score(generations, [ex.completion for ex in examples], spec.metrics))
    finally:
        model.train(was_training)
    # A model whose loss is NaN or infinite has no value for these metrics (and a gate on them
    # fails); JSON, the status and the termination message have no NaN.
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    # score() and the loss use the metrics' API names, which are EvalMetrics' field aliases.
    return EvalOutput(
        EvalMetrics.model_validate({m: finite.get(m) for m in spec.metrics}), generations
    )
