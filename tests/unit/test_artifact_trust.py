"""What makes a run's artifacts trustworthy elsewhere: the adapter names its base model as the
spec did, and the test set's overlap with training is measured, with a warning only where the
overlap means memorisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api import FineTuneJob
from kubetune_trainer.data import Example, leakage
from kubetune_trainer.export import base_model_id, make_adapter_portable
from tests.conftest import valid_job


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("hf://org/model/subfolder", "org/model"),
        ("s3://models/base/llama", "s3://models/base/llama"),
        ("file:///models/tiny", "file:///models/tiny"),
    ],
)
def test_the_base_model_is_named_as_the_spec_named_it(uri: str, expected: str) -> None:
    assert base_model_id(uri) == expected


def test_adapter_config_and_readme_are_rewritten(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cache_path = "/work/huggingface/hub/models--HuggingFaceTB--SmolLM2/snapshots/abc"
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": cache_path, "r": 16})
    )
    (adapter / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    doc = valid_job()
    doc["spec"]["model"]["revision"] = "main"
    spec = FineTuneJob.model_validate(doc).spec
    make_adapter_portable(adapter, spec, "---\nbase_model: x\n---\n# card\n![loss](loss.png)\n")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config == {
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": 16,
        "revision": "main",
    }
    readme = (adapter / "README.md").read_text()
    assert "# card" in readme and "](../loss.png)" in readme and "Model Card for" not in readme


def _ex(prompt: str, answer: str) -> Example:
    return Example(prompt, answer, "test")


def test_leaked_free_text_answers_are_a_warning() -> None:
    """The old demo data: SQL answers, mostly distinct, 23 of 29 test answers seen in training."""
    train = [_ex(f"question {i}", f"SELECT {i} FROM t") for i in range(100)]
    test = [_ex(f"new question {i}", f"SELECT {i} FROM t") for i in range(23)]
    test += [_ex(f"other {i}", f"SELECT x{i} FROM u") for i in range(6)]
    leak = leakage(train, test)
    assert (leak.test, leak.answers_in_train, leak.prompts_in_train) == (29, 23, 0)
    assert leak.warning() is not None and "23 of 29 test answers (79%)" in leak.warning()


def test_repeated_labels_are_not_a_warning_but_repeated_prompts_are() -> None:
    train = [_ex(f"review {i}", "positive" if i % 2 else "negative") for i in range(100)]
    test = [_ex(f"unseen review {i}", "positive") for i in range(20)]
    leak = leakage(train, test)
    assert leak.answers_in_train == 20 and leak.answers_are_labels and leak.warning() is None
    test = [_ex(f"review {i}", "negative") for i in range(0, 20, 2)]  # the same reviews again
    leak = leakage(train, test)
    assert leak.pairs_in_train == 10 and leak.warning() is not None
    assert "10 of 10 test prompts" in leak.warning()


def test_whitespace_does_not_hide_an_overlap() -> None:
    leak = leakage([_ex("q", "SELECT  a\nFROM t")], [_ex("q2", "SELECT a FROM t ")])
    assert leak.answers_in_train == 1
