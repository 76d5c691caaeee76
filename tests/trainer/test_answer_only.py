"""Answer-only logits: the output layer applied only at the positions that predict an answer
token gives the loss and the gradients of transformers' own causal LM loss (ForCausalLMLoss,
every position's logits) on the same batch, padded or packed, through the Trainer too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.training import _trainer_class, answer_only_loss, make_collator

# Three examples of different lengths: a prompt the loss ignores (-100), then the answer.
EXAMPLES = [
    ([5, 9, 13, 20, 7, 11], 2),
    ([30, 31, 32, 33], 1),
    ([40, 41, 42, 43, 44, 45, 46, 47], 3),
]


def _model(tiny_model: Path) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.use_cache = False
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config).train()


def _batch(tiny_model: Path, packing: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    rows = [
        {"input_ids": ids, "labels": [-100] * (len(ids) - answer) + ids[-answer:]}
        for ids, answer in EXAMPLES
    ]
    return make_collator(AutoTokenizer.from_pretrained(tiny_model), packing)(rows)


def _grads(model: Any) -> dict[str, Any]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("summed", [True, False], ids=["over-num-items", "mean"])
def test_the_same_loss_and_gradients_as_every_positions_logits(
    tiny_model: Path, packing: bool, summed: bool
) -> None:
    import torch

    model = _model(tiny_model)
    batch = _batch(tiny_model, packing)
    answers = sum(answer for _, answer in EXAMPLES)
    # num_items_in_batch as the Trainer counts it: the step's answer tokens (here 2x this batch,
    # as with two micro-batches a step).
    items = torch.tensor(2 * answers) if summed else None

    reference = model(**batch, num_items_in_batch=items).loss
    reference.backward()
    expected = _grads(model)
    model.zero_grad()

    rows: list[int] = []
    head = model.get_output_embeddings()
    seen = head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    ours = answer_only_loss(model, head, batch, items, summed)
    seen.remove()
    ours.backward()
    assert rows == [answers]  # the output layer saw the answer positions only
    assert abs(ours.item() - reference.item()) < 1e-5, (ours.item(), reference.item())
    got = _grads(model)
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-6, rtol=1e-4), name


def test_the_trainer_uses_it_in_training_only(tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import TrainingArguments

    model = _model(tiny_model)
    batch = _batch(tiny_model, packing=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    items = torch.tensor(sum(answer for _, answer in EXAMPLES))
    losses = {}
    for answer_only in (True, False):
        trainer = _trainer_class(1, answer_only)(model=model, args=args)
        rows: list[int] = []
        hook = model.get_output_embeddings().register_forward_hook(
            lambda m, args, out, rows=rows: rows.append(args[0].numel() // args[0].shape[-1])
        )
        model.train()
        losses[answer_only] = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        model.eval()
        with torch.no_grad():  # evaluation: every position, as the Trainer's own
            trainer.compute_loss(model, dict(batch), return_outputs=True)
        hook.remove()
        padded = batch["input_ids"].numel()
        assert rows == ([int(items), padded] if answer_only else [padded, padded])
    assert abs(losses[True].item() - losses[False].item()) < 1e-5
