"""model.dtype auto on a CPU: the frozen base of an adapter method loads in bfloat16 where the CPU
multiplies bfloat16 natively (AMX or AVX512-BF16), its trained weights stay float32; full
fine-tuning and qlora stay float32, and so does everything on a CPU without those instructions.
The report names the precision and why."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import modeling
from tests.trainer.conftest import config_for, job_manifest


def _spec(tiny_model: Path, task_file: Path, method: str, **fields: Any) -> Any:
    doc = job_manifest(tiny_model, task_file, "file:///tmp/unused", method, **fields)
    return config_for(doc).spec


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


@pytest.mark.parametrize(
    ("method", "bf16_cpu", "expected"),
    [
        ("lora", True, "bfloat16"),
        ("dora", True, "bfloat16"),
        ("ia3", True, "bfloat16"),
        ("prefix", True, "bfloat16"),
        ("prompt", True, "bfloat16"),
        ("qlora", True, "float32"),
        ("full", True, "float32"),
        ("lora", False, "float32"),
        ("prompt", False, "float32"),
    ],
)
def test_auto_on_a_cpu(
    method: str,
    bf16_cpu: bool,
    expected: str,
    cpu_only: pytest.MonkeyPatch,
    tiny_model: Path,
    task_file: Path,
) -> None:
    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: bf16_cpu)
    dtype, why = modeling.resolve_dtype(_spec(tiny_model, task_file, method))
    assert dtype == expected
    assert why.startswith("auto: ")


def test_a_named_dtype_is_kept_on_a_cpu(
    cpu_only: pytest.MonkeyPatch, tiny_model: Path, task_file: Path
) -> None:
    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: True)
    spec = _spec(tiny_model, task_file, "lora", model__dtype="float32")
    assert modeling.resolve_dtype(spec) == ("float32", "")
    # ...except by qlora on a CPU, whose bitsandbytes layers compute in float32.
    spec = _spec(tiny_model, task_file, "qlora", model__dtype="bfloat16")
    dtype, why = modeling.resolve_dtype(spec)
    assert (dtype, why.startswith("not bfloat16: qlora")) == ("float32", True)


def test_bf16_base_keeps_the_adapter_in_float32(
    cpu_only: pytest.MonkeyPatch, tiny_model: Path, task_file: Path
) -> None:
    import torch

    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: True)
    for method in ("lora", "ia3"):
        spec = _spec(tiny_model, task_file, method)
        source = modeling.ModelSource(str(tiny_model))
        model = modeling.apply_method(modeling.load_model(spec, source), spec, source)
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        assert trained == {torch.float32}, (method, trained)
        assert frozen == {torch.bfloat16}, (method, frozen)
        assert modeling.load_unquantized(spec, source).dtype == torch.bfloat16


def test_the_report_names_the_precision_and_why(
    cpu_only: pytest.MonkeyPatch, tiny_model: Path, task_file: Path
) -> None:
    from kubetune_trainer.export import _method_lines

    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: False)
    lines = _method_lines(_spec(tiny_model, task_file, "lora"))
    assert (
        "- base model dtype: float32 (auto: this CPU has no bfloat16 matrix instructions)" in lines
    )


@pytest.mark.parametrize(
    ("method", "dtype", "autocast"),
    [
        ("lora", "auto", True),
        ("ia3", "auto", True),
        ("prompt", "auto", True),
        # DoRA's weight norm would be taken of a bfloat16 sum under autocast.
        ("dora", "auto", False),
        ("lora", "float32", False),
        ("qlora", "auto", False),
        ("full", "auto", False),
        # bfloat16 weights of full fine-tuning train as they are: nothing to autocast from.
        ("full", "bfloat16", False),
    ],
)
def test_adapters_over_a_bf16_base_train_under_autocast_on_a_cpu(
    method: str,
    dtype: str,
    autocast: bool,
    cpu_only: pytest.MonkeyPatch,
    tiny_model: Path,
    task_file: Path,
    tmp_path: Path,
) -> None:
    from kubetune_trainer.training import training_arguments

    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: True)
    spec = _spec(tiny_model, task_file, method, model__dtype=dtype)
    args = training_arguments(spec, tmp_path, has_validation=False)
    assert (args.bf16, args.mixed_precision) == (autocast, "bf16" if autocast else "no")


def test_lora_matmuls_run_in_bf16_with_float32_master_weights(
    cpu_only: pytest.MonkeyPatch,
    tiny_model: Path,
    task_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In training the LoRA layers take the bfloat16 input as it is (no cast to float32 and back)
    and compute in bfloat16, while AdamW updates their float32 weights; afterwards PEFT's casts
    and the model's own forward (no autocast) are back for the evaluation."""
    import torch
    from transformers import AutoTokenizer

    from kubetune_trainer.training import train

    caplog.set_level(logging.INFO, logger="kubetune_trainer")
    from tests.trainer.conftest import Recorder

    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: True)
    spec = _spec(tiny_model, task_file, "lora", hyperparameters={"maxSteps": 2, "batchSize": 4})
    source = modeling.ModelSource(str(tiny_model))
    model = modeling.apply_method(modeling.load_model(spec, source), spec, source)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        {"input_ids": [5 + i, 9, 13, 20 + i], "labels": [-100, -100, 13, 20 + i]} for i in range(8)
    ]
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    lora_b = next(m for n, m in model.named_modules() if n.endswith("lora_B.default"))
    seen: list[tuple[Any, Any]] = []
    hook = lora_a.register_forward_hook(lambda m, a, out: seen.append((a[0].dtype, out.dtype)))
    before = lora_b.weight.detach().clone()
    try:
        train(
            model, tokenizer, rows, [], spec, tmp_path / "w", (tmp_path / "c").as_uri(), Recorder()
        )
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
        layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert f"Autocast=bfloat16 (input casts off in {len(layers)} adapter layers)" in caplog.text
        assert lora_a.weight.dtype == lora_b.weight.dtype == torch.float32
        assert not torch.equal(lora_b.weight, before)  # trained (lora_B starts at zero)

        seen.clear()
        assert layers and all(m.cast_input_dtype_enabled for m in layers)
        assert "_original_forward" not in vars(model) and "forward" not in vars(model)
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 9, 13]]))
        assert set(seen) == {(torch.float32, torch.float32)}  # PEFT's cast, no autocast
    finally:
        hook.remove()


def test_dora_layers_keep_their_input_casts(
    cpu_only: pytest.MonkeyPatch, tiny_model: Path, task_file: Path
) -> None:
    """A DoRA layer takes its weight norm in its input's dtype: under autocast (a GPU's) it keeps
    PEFT's cast to float32; plain LoRA layers give theirs up."""
    from kubetune_trainer.training import _no_adapter_input_casts

    cpu_only.setattr(modeling, "cpu_multiplies_bf16", lambda: True)
    counts = {}
    for method in ("lora", "dora"):
        spec = _spec(tiny_model, task_file, method)
        source = modeling.ModelSource(str(tiny_model))
        model = modeling.apply_method(modeling.load_model(spec, source), spec, source)
        with _no_adapter_input_casts(model, active=True) as counts[method]:
            pass
        with _no_adapter_input_casts(model, active=False) as off:
            assert off == 0
    assert counts["lora"] > 0 and counts["dora"] == 0
