"""The data stage without a model: formats, cleaning, splits, prompts, label masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import DatasetSpec, ExitCode
from kubetune_trainer import data, storage
from kubetune_trainer.errors import DataError, SpecError


class PlainTokenizer:
    """Enough of a tokenizer for the data stage: one id per character, no chat template."""

    chat_template = None
    bos_token, bos_token_id, eos_token_id = "^", 1, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


class ChatTokenizer(PlainTokenizer):
    chat_template = "{{ messages }}"

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool,
        tokenize: bool,
        chat_template: str | None = None,
    ) -> str:
        if chat_template not in (None, self.chat_template):  # another template: a real render
            import jinja2

            return jinja2.Template(chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt
            )
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def write(tmp_path: Path, name: str, rows: list[Any]) -> str:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(rows) + "\n")
    return path.as_uri()


# fmt: off
FORMAT_CASES = [
        pytest.param("a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}], "alpaca", "### User:\nAdd\n\n1 2\n\n### Assistant:\n", "3", id="alpaca"),
        pytest.param("a.jsonl", [{"prompt": "2+2=", "completion": "4"}], "completion", "2+2=", "4", id="completion"),
        pytest.param("a.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}], "chat", "### User:\nhi\n\n### Assistant:\n", "hello", id="chat"),
        pytest.param("a.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}], "chat", "### User:\nhi\n\n### Assistant:\n", "yo", id="sharegpt"),
        pytest.param("a.jsonl", [{"text": "plain words"}], "text", "", "plain words", id="text"),
        pytest.param("a.json", [{"prompt": "p", "completion": "c"}], "completion", "p", "c", id="json-array"),
        pytest.param("a.csv", ["prompt,completion", "p,c"], "completion", "p", "c", id="csv"),
    ]
# fmt: on


@pytest.mark.parametrize(("name", "rows", "fmt", "prompt", "answer"), FORMAT_CASES)
def test_formats_are_detected_and_rendered(
    tmp_path: Path, name: str, rows: list, fmt: str, prompt: str, answer: str
) -> None:
    uri = write(
        tmp_path, name, rows * 20 if fmt != "text" else [{"text": f"words {i}"} for i in range(20)]
    )
    examples, detected, _, _ = data.load_examples(uri, PlainTokenizer(), tmp_path, "auto")
    assert detected == fmt
    if fmt != "text":
        assert (examples[0].prompt, examples[0].completion) == (prompt, answer)


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path: Path) -> None:
    uri = write(tmp_path, "a.jsonl", [{"instruction": "Add", "output": "3"}])
    [example], _, _, _ = data.load_examples(uri, ChatTokenizer(), tmp_path, "auto")
    assert example.prompt == "<user>Add<assistant>" and example.templated


def test_cleaning_dedupes_and_splits_reproducibly(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(100)] + [
        {"prompt": "q1", "completion": "a1"},
        {"prompt": " ", "completion": "x"},
    ]
    spec = DatasetSpec(
        uri=write(tmp_path, "d.jsonl", rows), validation_split=0.1, test_split=0.2, seed=3
    )
    first = data.prepare(spec, PlainTokenizer(), tmp_path)
    again = data.prepare(spec, PlainTokenizer(), tmp_path)
    assert first.report == {
        "read": 102,
        "empty": 1,
        "duplicates": 1,
        "train": 70,
        "validation": 10,
        "test": 20,
    }
    assert [e.prompt for e in first.test] == [e.prompt for e in again.test]
    assert not {e.prompt for e in first.test} & {e.prompt for e in first.train}
    other = data.prepare(spec.model_copy(update={"seed": 4}), PlainTokenizer(), tmp_path)
    assert [e.prompt for e in other.test] != [e.prompt for e in first.test]


def test_labels_cover_only_the_answer_and_long_examples_are_dropped() -> None:
    examples = [data.Example("Q:", "yes", "x line 1"), data.Example("Q:", "y" * 50, "x line 2")]
    rows, too_long = data.tokenize(examples, PlainTokenizer(), max_length=20)
    assert too_long == 1
    [row] = rows
    prompt = [1, ord("Q"), ord(":")]
    assert row["input_ids"] == [*prompt, ord(" "), ord("y"), ord("e"), ord("s"), 2]
    assert row["labels"] == [-100] * 3 + row["input_ids"][3:]


def test_test_uri_replaces_the_test_split(tmp_path: Path) -> None:
    train = write(
        tmp_path, "train.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(10)]
    )
    test = write(
        tmp_path,
        "test.jsonl",
        [{"prompt": "t1", "completion": "b"}, {"prompt": "t2", "completion": "b"}],
    )
    splits = data.prepare(
        DatasetSpec(uri=train, test_uri=test, validation_split=0.0), PlainTokenizer(), tmp_path
    )
    assert [e.prompt for e in splits.test] == ["t1", "t2"] and len(splits.train) == 10


def test_nothing_left_to_train_on(tmp_path: Path) -> None:
    uri = write(tmp_path, "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match="nothing left to train on"):
        data.prepare(
            DatasetSpec(uri=uri, validation_split=0.0, test_split=0.5), PlainTokenizer(), tmp_path
        )


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"yo {i}"}]}
    for i in range(20)
]


@pytest.mark.parametrize(
    ("template", "system", "prompt", "templated"),
    [
        (None, None, "<user>hi<assistant>", True),  # the tokenizer's own template
        ("tokenizer", "Be brief.", "<system>Be brief.<user>hi<assistant>", True),
        ("plain", None, "### User:\nhi\n\n### Assistant:\n", False),
        ("plain", "Be brief.", "### System:\nBe brief.\n\n### User:\nhi\n\n### Assistant:\n", False),
        ("chatml", None, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", True),
        ("{% for m in messages %}[{{ m.content }}]{% endfor %}>", "s", "[s][hi]>", True),
    ],
)  # fmt: skip
def test_the_spec_chooses_the_prompt_layout_and_system_prompt(
    template: str | None, system: str | None, prompt: str, templated: bool, tmp_path: Path
) -> None:
    spec = DatasetSpec.model_validate(
        {"uri": write(tmp_path, "c.jsonl", CHAT_ROWS), "testSplit": 0.1}
        | ({"chatTemplate": template} if template else {})
        | ({"systemPrompt": system} if system is not None else {})
    )
    splits = data.prepare(spec, ChatTokenizer(), tmp_path / "cache")
    example = (splits.train + splits.test)[0]
    assert (example.prompt, example.templated) == (prompt, templated)
    assert splits.prompts is not None and "prompt layout" in splits.prompts.describe()


def test_a_record_with_its_own_system_message_keeps_it(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "system", "content": "mine"}, *r["messages"]]} for r in CHAT_ROWS
    ]
    spec = DatasetSpec.model_validate(
        {"uri": write(tmp_path, "c.jsonl", rows), "systemPrompt": "default", "testSplit": 0.1}
    )
    (example, *_) = data.prepare(spec, ChatTokenizer(), tmp_path / "cache").train
    assert example.prompt == "<system>mine<user>hi<assistant>"


def test_chat_settings_on_a_completion_file_are_a_spec_error(tmp_path: Path) -> None:
    uri = write(tmp_path, "p.jsonl", [{"prompt": "p", "completion": f"c{i}"} for i in range(20)])
    spec = DatasetSpec.model_validate({"uri": uri, "systemPrompt": "x", "testSplit": 0.1})
    with pytest.raises(SpecError, match="apply only to the alpaca and chat formats"):
        data.prepare(spec, ChatTokenizer(), tmp_path / "cache")


# -- reading files: line breaks, big cells, malformed content, size ---------------------------


@pytest.mark.parametrize(
    "separator",
    [
        pytest.param("\u2028", id="line-separator"),
        pytest.param("\u2029", id="paragraph-separator"),
        pytest.param("\x85", id="next-line"),
    ],
)
def test_a_jsonl_line_breaks_only_at_newline(tmp_path: Path, separator: str) -> None:
    """JSON Lines separates records by \\n only; str.splitlines also broke on these, which
    are valid unescaped inside a JSON string, and the valid file failed as invalid JSON."""
    path = tmp_path / "train.jsonl"
    first = {"prompt": f"a{separator}b", "completion": "c"}
    path.write_bytes(
        (
            json.dumps(first, ensure_ascii=False) + "\r\n" + '{"prompt": "d", "completion": "e"}\n'
        ).encode()
    )
    records = data.read_records(path, "train.jsonl")
    assert [r.data for r in records] == [first, {"prompt": "d", "completion": "e"}]
    assert [r.where for r in records] == ["train.jsonl line 1", "train.jsonl line 2"]


def test_a_csv_cell_larger_than_128_kib_reads(tmp_path: Path) -> None:
    """Python's csv stops at 131072 characters per cell (`_csv.Error`, which became a retry on
    GPUs); a long document in one cell is ordinary data."""
    long = "word " * 60_000  # 300 KB
    path = tmp_path / "train.csv"
    path.write_text(f'prompt,completion\n"{long}",yes\n', encoding="utf-8")
    (record,) = data.read_records(path, "train.csv")
    assert record.data == {"prompt": long, "completion": "yes"}


# (file name, content, the one-line message expected)
# fmt: off
MALFORMED = [
    pytest.param("train.csv", b"prompt,completion\na,b\nc\rx,d\n", "train.csv line 3: not valid CSV (a carriage return inside a cell that is not quoted); quote cells", id="csv-bare-carriage-return"),
    pytest.param("train.csv", b"prompt,completion\na,b,c\n", "train.csv line 2: 3 cells but the header names 2 columns", id="csv-extra-cells"),
    pytest.param("train.csv", b"prompt,completion\na,b\n\xff,c\n", "train.csv line 3: not valid UTF-8 (byte 0xff)", id="csv-not-utf8"),
    pytest.param("train.jsonl", b'{"text": "a"}\n' + b"[" * 100_000 + b"\n", "train.jsonl line 2: the JSON is nested too deeply", id="jsonl-deep"),
    pytest.param("train.jsonl", b'{"text": "a"}\n{"text": \n', "train.jsonl line 2: invalid JSON (Expecting value at column 10)", id="jsonl-truncated"),
    pytest.param("train.json", b"[" * 100_000, "train.json: the JSON is nested too deeply", id="json-deep"),
]
# fmt: on


@pytest.mark.parametrize(("name", "content", "message"), MALFORMED)
def test_a_malformed_file_is_the_users_error_naming_the_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    """DataError (exit code 3, no retry), never csv.Error or RecursionError (a retry on GPUs)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as raised:
        data.read_records(path, name)
    assert str(raised.value).startswith(message), str(raised.value)
    assert raised.value.exit_code == ExitCode.DATA_ERROR


@pytest.mark.parametrize("scheme", [pytest.param("file", id="file"), pytest.param("s3", id="s3")])
def test_a_data_file_over_the_bound_is_refused_before_download(
    scheme: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    content = b'{"text": "a"}\n' * 100
    if scheme == "s3":
        request.getfixturevalue("s3_env")
        uri = f"s3://data/bound-{tmp_path.name}/train.jsonl"
        storage.write_bytes(uri, content)
    else:
        (tmp_path / "train.jsonl").write_bytes(content)
        uri = (tmp_path / "train.jsonl").as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as raised:
        data.fetch(uri, cache, max_bytes=1000)
    assert str(raised.value) == (
        f"dataset {uri}: 1400 bytes, more than spec.dataset.maxFileBytes (1000 bytes); use a "
        "smaller file, or raise spec.dataset.maxFileBytes if the pod's memory holds its "
        "records (several times the file's size)"
    )
    assert not (cache / "train.jsonl").exists()  # nothing downloaded
    assert data.fetch(uri, cache, max_bytes=1400).read_bytes() == content  # at the bound: read


def test_the_default_bound_is_generous() -> None:
    spec = DatasetSpec.model_validate({"uri": "s3://data/train.jsonl"})
    assert data.max_file_bytes(spec) == data.DEFAULT_MAX_FILE_BYTES == 4 << 30


def test_the_report_says_what_a_prompt_begins_with_when_no_system_prompt_is_given(
    tmp_path: Path,
) -> None:
    """SmolLM2's template puts a system message of its own before every user turn: "system
    prompt: none" would be wrong, so the description quotes the prompt's real opening."""
    own = (
        "{% if messages[0].role != 'system' %}<system>You are SmolLM{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    )
    uri = write(tmp_path, "c.jsonl", CHAT_ROWS)
    described = {}
    for name, extra in (("default", {}), ("given", {"systemPrompt": "be brief"})):
        spec = DatasetSpec.model_validate(
            {"uri": uri, "testSplit": 0.1, "chatTemplate": own} | extra
        )
        splits = data.prepare(spec, ChatTokenizer(), tmp_path / name)
        assert splits.prompts is not None
        described[name] = splits.prompts.describe()
    assert described["default"].endswith(
        "system prompt: none given; each prompt begins '<system>You are SmolLM<user>'"
    )
    assert described["given"].endswith("system prompt: 'be brief'")
    plain = DatasetSpec.model_validate({"uri": uri, "testSplit": 0.1, "chatTemplate": "plain"})
    prompts = data.prepare(plain, ChatTokenizer(), tmp_path / "plain").prompts
    assert prompts is not None and "each prompt begins '### User:" in prompts.describe()
