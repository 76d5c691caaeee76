"""Regression test for the silent QLoRA-on-CPU bug.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks every Linear4bit into an inference-only
layout on the first no-grad forward; training afterwards gets wrong gradients. The pipeline runs
exactly such a forward (the baseline evaluation) before training. This test makes bitsandbytes
believe the CPU has AVX512-BF16 (as a CI machine may) and checks that no layer is repacked by
the baseline evaluation, and that QLoRA still learns after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import FineTuneJob, resolve_spec
from kubetune_trainer import data, modeling
from kubetune_trainer.evaluation import evaluate
from tests.trainer.conftest import job_manifest


def _linear4bit(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _repacked(model) -> int:
    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in _linear4bit(model)
    )


@pytest.fixture
def cpu_with_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.nn.modules as modules

    monkeypatch.setattr(modules, "has_avx512bf16", lambda: True)


def _load(tiny_model: Path, task_file: Path, tmp_path: Path, keep_trainable: bool):
    doc = job_manifest(tiny_model, task_file, (tmp_path / "out").as_uri(), "qlora")
    spec = resolve_spec(FineTuneJob.model_validate(doc).spec)
    source = modeling.ModelSource(str(tiny_model))
    tokenizer = modeling.load_tokenizer(source, False)
    if keep_trainable:
        model = modeling.load_model(spec, source)
    else:  # what loading looked like before the fix
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model, quantization_config=q, dtype=torch.float32
        )
    splits = data.prepare(spec.dataset, tokenizer, tmp_path / "data")
    rows, _ = data.tokenize(splits.test, tokenizer, 256)
    return spec, source, tokenizer, model, splits, rows


@pytest.mark.usefixtures("cpu_with_avx512bf16")
def test_baseline_evaluation_does_not_repack_4bit_layers(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    spec, source, tokenizer, model, splits, rows = _load(
        tiny_model, task_file, tmp_path, keep_trainable=True
    )
    assert _linear4bit(model), "qlora must load 4-bit layers"
    evaluate(model, tokenizer, splits.test, rows, spec.evaluation)
    assert _repacked(model) == 0
    peft_model = modeling.apply_method(model, spec, source)
    assert all(not m.support_avx512bf16_for_cpu for m in _linear4bit(peft_model))


@pytest.mark.usefixtures("cpu_with_avx512bf16")
def test_without_the_fix_the_same_evaluation_repacks(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """The control: shows the simulated CPU really triggers the repacking the fix prevents."""
    spec, _, tokenizer, model, splits, rows = _load(
        tiny_model, task_file, tmp_path, keep_trainable=False
    )
    evaluate(model, tokenizer, splits.test, rows, spec.evaluation)
    assert _repacked(model) == len(_linear4bit(model)) > 0
