"""A tiny Llama and a toy task, built offline in seconds, for training tests.

The task: say whether a short review is positive or negative. The answer is decided by which
sentiment word the review contains, so a model that learns it generalises to unseen reviews.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["great", "tasty", "lovely", "superb", "friendly", "excellent", "fresh", "perfect"]
NEGATIVE = ["awful", "bland", "rude", "terrible", "stale", "dirty", "cold", "horrible"]
SUBJECTS = [
    "the food",
    "the service",
    "the soup",
    "our waiter",
    "the bread",
    "the room",
    "the pasta",
    "the coffee",
]
FILLERS = ["honestly", "really", "today", "again", "as usual", "this time", "overall", "sadly"]

INSTRUCTION = "Is this review positive or negative?"


def task_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        label = rng.choice(["positive", "negative"])
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        review = f"{rng.choice(SUBJECTS)} was {rng.choice(FILLERS)} {word}"
        records.append({"instruction": INSTRUCTION, "input": review, "output": label})
    return records


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden size 64) and a byte-level BPE tokenizer trained on the task."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [
        f"### User:\n{INSTRUCTION}\n\n{r['input']}\n\n### Assistant:\n{r['output']}"
        for r in task_records(2000, seed)
    ]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wide enough weights that a few adapter steps can make the output distribution peaked.
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def poison(model_dir: Path, target: Path) -> Path:
    """A copy of a saved model whose embeddings are NaN: every loss is NaN from the first step,
    as when training has diverged (the way to test what the trainer does then)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    for name, tensor in tensors.items():
        if "embed" in name:
            tensor.fill_(float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    return target
