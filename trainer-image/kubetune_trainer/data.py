"""The data stage: read records, detect the format, clean, split, render prompts, tokenize.

Every record becomes an `Example`: the prompt the model sees and the completion it must learn
(loss is computed on completion tokens only). Text datasets have no prompt: loss on every token.
Problems are reported as one line naming the file and line: `train.jsonl line 17: invalid JSON`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import obstore

from kubetune.api import DatasetSpec
from kubetune_trainer import storage
from kubetune_trainer.errors import DataError, SpecError

CHAT_KEYS = ("messages", "conversations")
# The prompt layout for tokenizers without a chat template (documented in docs/trainer.md).
DEFAULT_USER = "### User:\n{content}\n\n### Assistant:\n"
DEFAULT_SYSTEM = "### System:\n{content}\n\n"
# Named templates for spec.dataset.chatTemplate (besides `tokenizer` and `plain`).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


PROBE = "\x00kubetune-probe\x00"  # a user turn no template rewrites


@dataclass(frozen=True)
class Prompts:
    """How chat and alpaca records become prompt text: a Jinja chat template (None: the plain
    layout) and an optional system prompt put first."""

    template: str | None
    system: str | None = None
    choice: str = "tokenizer"  # what the spec asked for, for the model card
    # What every rendered prompt begins with, before the user's words: a chat template may put
    # a system message of its own there (SmolLM2's does) when the spec gives none.
    opening: str = ""

    @classmethod
    def default(cls, tokenizer: Any) -> Prompts:
        """The tokenizer's own chat template, or the plain layout when it has none."""
        return cls(getattr(tokenizer, "chat_template", None) or None)

    @classmethod
    def for_spec(cls, spec: DatasetSpec, tokenizer: Any) -> Prompts:
        choice = spec.chat_template or "tokenizer"
        if choice == "plain":
            template = None
        elif choice == "tokenizer":
            template = cls.default(tokenizer).template
        else:
            template = NAMED_TEMPLATES.get(choice, choice)
        prompts = cls(template, spec.system_prompt, choice)
        try:
            probe = render_prompt(tokenizer, [{"role": "user", "content": PROBE}], prompts)
        except Exception:  # a template that cannot render a lone user turn: nothing to show
            return prompts
        return replace(prompts, opening=probe.split(PROBE, 1)[0])

    def describe(self) -> str:
        if self.choice == "tokenizer":
            layout = "the model's chat template" if self.template else "plain (the model has none)"
        elif self.choice in ("plain", *NAMED_TEMPLATES):
            layout = self.choice
        else:
            digest = hashlib.sha256(self.choice.encode()).hexdigest()[:12]
            layout = f"an inline chat template (sha256 {digest})"
        if self.system is not None:
            system = repr(self.system)
        elif self.opening.strip():
            shown = self.opening if len(self.opening) <= 160 else self.opening[:157] + "..."
            system = f"none given; each prompt begins {shown!r}"
        else:
            system = "none"
        return f"prompt layout: {layout}; system prompt: {system}"


@dataclass(frozen=True)
class Example:
    prompt: str  # "" for text datasets
    completion: str
    source: str  # "train.jsonl line 17", for error messages
    templated: bool = False  # the prompt came from the chat template and holds its special tokens


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    format: str
    prompts: Prompts
    report: dict[str, int] = field(default_factory=dict)
    sha256: str = ""  # of the dataset file as read


# Above this share of test examples seen in training, the test set mostly measures memorisation:
# the report and the run's summary say so.
LEAKAGE_WARN_SHARE = 0.2
# Answers repeat by nature when they come from a small set (labels, yes/no): their overlap is
# memorisation only when most training answers are distinct.
DISTINCT_ANSWERS_SHARE = 0.5


@dataclass(frozen=True)
class Leakage:
    """Test examples whose answer, prompt or both also occur in the training split (whitespace
    normalised): exact-match scores on them measure memory, not generalisation."""

    test: int
    answers_in_train: int
    prompts_in_train: int
    pairs_in_train: int
    train: int = 0
    distinct_train_answers: int = 0

    @property
    def answer_share(self) -> float:
        return self.answers_in_train / self.test if self.test else 0.0

    @property
    def prompt_share(self) -> float:
        return self.prompts_in_train / self.test if self.test else 0.0

    @property
    def answers_are_labels(self) -> bool:
        """Most training answers repeat (a classification task): answer overlap is expected."""
        return self.train > 0 and self.distinct_train_answers / self.train < DISTINCT_ANSWERS_SHARE

    def warning(self) -> str | None:
        if self.prompt_share > LEAKAGE_WARN_SHARE:
            return (
                f"{self.prompts_in_train} of {self.test} test prompts ({self.prompt_share:.0%}) "
                "also occur in the training data: the test scores partly measure memorisation; "
                "deduplicate the data or give a separate test set (spec.dataset.testUri)"
            )
        if self.answer_share > LEAKAGE_WARN_SHARE and not self.answers_are_labels:
            return (
                f"{self.answers_in_train} of {self.test} test answers ({self.answer_share:.0%}) "
                "also occur in the training data: the test scores partly measure memorisation; "
                "use a test set whose answers are not in training (spec.dataset.testUri)"
            )
        return None


def _norm(text: str) -> str:
    return " ".join(text.split())


def leakage(train: list[Example], test: list[Example]) -> Leakage:
    answers = {_norm(ex.completion) for ex in train}
    prompts = {_norm(ex.prompt) for ex in train if ex.prompt}
    pairs = {(_norm(ex.prompt), _norm(ex.completion)) for ex in train}
    return Leakage(
        train=len(train),
        distinct_train_answers=len(answers),
        test=len(test),
        answers_in_train=sum(_norm(ex.completion) in answers for ex in test),
        prompts_in_train=sum(bool(ex.prompt) and _norm(ex.prompt) in prompts for ex in test),
        pairs_in_train=sum((_norm(ex.prompt), _norm(ex.completion)) in pairs for ex in test),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Record:
    data: Any
    where: str  # "train.jsonl line 17"


def _name(uri: str) -> str:
    return PurePosixPath(urlsplit(uri).path).name or uri


# The default of spec.dataset.maxFileBytes: a data file larger than this is refused before it is
# downloaded. Its records are held in memory (as Python objects, several times the file's size),
# so a file far larger than any fine-tuning set would end the pod out of memory, and retried.
DEFAULT_MAX_FILE_BYTES = 4 << 30
MAX_BYTES_FIELD = "spec.dataset.maxFileBytes"


def max_file_bytes(spec: DatasetSpec) -> int:
    """The bound on each data file's size: the spec's maxFileBytes, or the default."""
    return spec.max_file_bytes or DEFAULT_MAX_FILE_BYTES


def _too_large(uri: str, size: int, limit: int) -> DataError:
    return DataError(
        f"dataset {uri}: {size} bytes, more than {MAX_BYTES_FIELD} ({limit} bytes); use a "
        f"smaller file, or raise {MAX_BYTES_FIELD} if the pod's memory holds its records "
        "(several times the file's size)"
    )


def fetch(uri: str, cache: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Path:
    """The dataset file on local disk (remote files are staged into cache first, streamed, with
    their size checked before the download and while it runs)."""
    if uri.startswith("file://"):
        path = Path(urlsplit(uri).path)
        if not path.is_file():
            raise DataError(f"dataset {uri}: no such file")
        if path.stat().st_size > max_bytes:
            raise _too_large(uri, path.stat().st_size, max_bytes)
        return path
    if uri.startswith("hf://datasets/"):
        return _fetch_hf(uri, cache)
    target = cache / _name(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    loc = storage.locate(uri)
    try:
        size = obstore.head(loc.store, loc.key())["size"]
        if size > max_bytes:
            raise _too_large(uri, size, max_bytes)
        got = obstore.get(loc.store, loc.key())
        written = 0
        with target.open("wb") as out:
            for chunk in got:
                written += len(chunk)
                if written > max_bytes:  # replaced by a larger file since the head
                    raise _too_large(uri, written, max_bytes)
                out.write(chunk)
    except FileNotFoundError as exc:
        raise DataError(f"dataset {uri}: no such object") from exc
    except DataError:
        target.unlink(missing_ok=True)
        raise
    except Exception as exc:  # the store: a permission, a network failure (retryable)
        raise storage._problem("read", uri, exc) from exc
    return target


def _fetch_hf(uri: str, cache: Path) -> Path:
    """A Hub dataset, exported to JSON lines (its train split) through the datasets library."""
    import datasets

    repo_and_path = uri.removeprefix("hf://datasets/").split("/", 2)
    repo = "/".join(repo_and_path[:2])
    try:
        ds = datasets.load_dataset(
            repo, data_files=repo_and_path[2] if len(repo_and_path) > 2 else None
        )
    except Exception as exc:
        raise DataError(f"dataset {uri}: cannot load from the Hub: {exc}".splitlines()[0]) from exc
    split = ds["train"] if "train" in ds else next(iter(ds.values()))
    target = cache / f"{repo.replace('/', '--')}.jsonl"
    split.to_json(str(target), lines=True)
    return target


def read_records(path: Path, name: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[Record]:
    """The records of a data file, read without holding the file's text beside them (JSON lines
    and CSV are read line by line). Any malformed content is the user's error (DataError),
    naming the file, the line and the fix."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{name}: not a readable parquet file: {exc}") from exc
        return [Record(r, f"{name} row {i + 1}") for i, r in enumerate(rows)]
    if suffix == ".jsonl":
        return _jsonl(path, name)
    if suffix == ".json":
        return _json(path, name)
    if suffix == ".csv":
        return _csv(path, name, max_bytes)
    raise DataError(
        f"{name}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet"
    )


def _lines(path: Path, name: str) -> Iterator[tuple[int, str]]:
    """(number, text) of each line, split on \\n only (as JSON Lines and CSV define lines: a
    U+2028 or a form feed inside a string is no line break), each decoded as UTF-8."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{name} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                    "save the file as UTF-8"
                ) from exc


def _jsonl(path: Path, name: str) -> list[Record]:
    records = []
    for number, line in _lines(path, name):
        if not line.strip():
            continue
        try:
            records.append(Record(json.loads(line.rstrip("\r\n")), f"{name} line {number}"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{name} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); each "
                "line must be one JSON object"
            ) from exc
        except RecursionError as exc:
            raise DataError(
                f"{name} line {number}: the JSON is nested too deeply to read; flatten the record"
            ) from exc
    return records


def _json(path: Path, name: str) -> list[Record]:
    raw = path.read_bytes()
    text = _decode(raw, name)
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name} line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    except RecursionError as exc:
        raise DataError(f"{name}: the JSON is nested too deeply to read") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON array of records")
    return [Record(r, f"{name} record {i + 1}") for i, r in enumerate(data)]


def _csv(path: Path, name: str, max_bytes: int) -> list[Record]:
    # A cell may be as large as the file may be (Python's default stops at 128 KiB). The limit
    # is the process's; it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), min(max_bytes, sys.maxsize)))
    reader = csv.DictReader(line for _, line in _lines(path, name))
    records = []
    try:
        for row in reader:
            if None in row:  # more cells than the header names
                raise DataError(
                    f"{name} line {reader.line_num}: {len(row[None]) + len(row) - 1} cells "
                    f"but the header names {len(row) - 1} columns; quote cells that hold commas"
                )
            records.append(Record(row, f"{name} line {reader.line_num}"))
    except csv.Error as exc:
        problem = str(exc)
        if "new-line character" in problem:  # a bare \r: old Mac line ends, or in a cell
            problem = "a carriage return inside a cell that is not quoted"
        raise DataError(
            f"{name} line {reader.line_num + 1}: not valid CSV ({problem}); quote cells that hold "
            'commas, quotes or line breaks ("...", with "" for a quote) and save it as UTF-8'
        ) from exc
    return records


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{name} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
            "save the file as UTF-8"
        ) from exc


def detect_format(record: Record) -> str:
    data = record.data
    if not isinstance(data, dict):
        raise DataError(f"{record.where}: expected a JSON object, got {type(data).__name__}")
    keys = set(data)
    if keys & set(CHAT_KEYS):
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the format from fields {sorted(keys)}; expected "
        "messages (chat), instruction/output (alpaca), prompt/completion or text, or set "
        "spec.dataset.format"
    )


def _field(record: Record, key: str, fmt: str, required: bool = True) -> str:
    data = record.data
    if not isinstance(data, dict):
        raise DataError(f"{record.where}: expected a JSON object, got {type(data).__name__}")
    value = data.get(key)
    if value is None:
        if required:
            raise DataError(f"{record.where}: missing '{key}' for the {fmt} format")
        return ""
    if not isinstance(value, str):
        value = str(value)
    return value.strip()


def to_turns(record: Record, fmt: str) -> tuple[list[dict[str, str]], str] | tuple[None, str]:
    """(messages before the answer, the answer); messages is None for plain prompt text."""
    if fmt == "alpaca":
        instruction = _field(record, "instruction", fmt)
        extra = _field(record, "input", fmt, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return [{"role": "user", "content": user}], _field(record, "output", fmt)
    if fmt == "chat":
        data = record.data if isinstance(record.data, dict) else {}
        turns = next((data[k] for k in CHAT_KEYS if k in data), None)
        if not isinstance(turns, list) or not turns:
            raise DataError(
                f"{record.where}: 'messages' must be a non-empty list for the chat format"
            )
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{record.where}: message {i + 1} is not an object")
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            role = {"human": "user", "gpt": "assistant"}.get(role, role)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise DataError(
                    f"{record.where}: message {i + 1} needs a role (system, user, assistant) "
                    "and string content"
                )
            messages.append({"role": role, "content": content.strip()})
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{record.where}: the last message must be the assistant's answer")
        return messages[:-1], messages[-1]["content"]
    if fmt == "completion":
        return None, _field(record, "completion", fmt)
    raise DataError(f"unknown dataset format {fmt!r}")


def _examples(
    records: list[Record], fmt: str, tokenizer: Any, prompts: Prompts | None = None
) -> tuple[list[Example], Counter]:
    if prompts is None:
        prompts = Prompts.default(tokenizer)
    dropped: Counter = Counter()
    out = []
    for record in records:
        if fmt == "text":
            text = _field(record, "text", fmt)
            if not text:
                dropped["empty"] += 1
                continue
            out.append(Example("", text, record.where))
            continue
        messages, answer = to_turns(record, fmt)
        if fmt == "completion":
            prompt = _field(record, "prompt", fmt)
        elif not messages or not any(m["content"] for m in messages):
            prompt = ""
        else:
            prompt = render_prompt(tokenizer, messages, prompts)
        if not prompt.strip() or not answer:
            dropped["empty"] += 1
            continue
        templated = fmt != "completion" and prompts.template is not None
        out.append(Example(prompt, answer, record.where, templated))
    return out, dropped


def render_prompt(
    tokenizer: Any, messages: list[dict[str, str]], prompts: Prompts | None = None
) -> str:
    """The prompt text for messages: the system prompt first (unless the record has its own),
    then the chat template (the tokenizer's by default), or the plain layout without one."""
    if prompts is None:
        prompts = Prompts.default(tokenizer)
    if prompts.system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": prompts.system}, *messages]
    if prompts.template is not None:
        return tokenizer.apply_chat_template(
            messages, chat_template=prompts.template, add_generation_prompt=True, tokenize=False
        )
    parts = [
        m["content"] + "\n\n"
        if m["role"] == "assistant"
        else DEFAULT_SYSTEM.format(content=m["content"])
        if m["role"] == "system"
        else DEFAULT_USER.format(content=m["content"])
        for m in messages
    ]
    return "".join(parts)


def _dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    seen: set[tuple[str, str]] = set()
    out = []
    for ex in examples:
        key = (ex.prompt, ex.completion)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out, len(examples) - len(out)


def _split(
    examples: list[Example], fraction: float, total: int
) -> tuple[list[Example], list[Example]]:
    """Takes fraction of total (the whole dataset) off the front of the shuffled examples."""
    if fraction <= 0:
        return examples, []
    count = max(1, round(total * fraction))
    return examples[count:], examples[:count]


def load_examples(
    uri: str,
    tokenizer: Any,
    cache: Path,
    fmt: str,
    prompts: Prompts | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[list[Example], str, Counter, str]:
    """The examples of one file, its format, what was dropped, and the file's sha256."""
    path = fetch(uri, cache, max_bytes)
    records = read_records(path, _name(uri), max_bytes)
    if not records:
        raise DataError(f"{_name(uri)}: the file has no records")
    if fmt == "auto":
        fmt = detect_format(records[0])
    examples, dropped = _examples(records, fmt, tokenizer, prompts)
    dropped["read"] = len(records)
    return examples, fmt, dropped, file_sha256(path)


def prepare(spec: DatasetSpec, tokenizer: Any, cache: Path) -> Splits:
    """Reads, cleans and splits the data as the spec says."""
    prompts = Prompts.for_spec(spec, tokenizer)
    limit = max_file_bytes(spec)
    examples, fmt, report, sha256 = load_examples(
        spec.uri, tokenizer, cache, spec.format, prompts, limit
    )
    if fmt not in ("alpaca", "chat") and (spec.chat_template or spec.system_prompt is not None):
        raise SpecError(
            f"spec.dataset.chatTemplate: {_name(spec.uri)} is in the {fmt} format; chatTemplate "
            "and systemPrompt apply only to the alpaca and chat formats"
        )
    if spec.dedupe:
        examples, report["duplicates"] = _dedupe(examples)
    if not examples:
        raise DataError(
            f"{_name(spec.uri)}: no usable records after cleaning ({report['read']} read, "
            f"{report['empty']} empty, {report.get('duplicates', 0)} duplicates)"
        )
    random.Random(spec.seed).shuffle(examples)
    total = len(examples)
    test: list[Example]
    validation: list[Example]
    if spec.test_uri:
        test, _, _, _ = load_examples(spec.test_uri, tokenizer, cache, fmt, prompts, limit)
    else:
        examples, test = _split(examples, spec.test_split, total)
    if spec.validation_uri:
        validation, _, _, _ = load_examples(
            spec.validation_uri, tokenizer, cache, fmt, prompts, limit
        )
    else:
        examples, validation = _split(examples, spec.validation_split, total)
    if not examples:
        raise DataError(
            f"{_name(spec.uri)}: nothing left to train on after the validation and test splits"
        )
    if not test:
        raise DataError(f"{_name(spec.uri)}: the test set is empty")
    report.update(train=len(examples), validation=len(validation), test=len(test))
    return Splits(examples, validation, test, fmt, prompts, dict(report), sha256)


def tokenize(
    examples: list[Example], tokenizer: Any, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """input_ids and labels (-100 on prompt tokens); examples longer than max_length are dropped."""
    rows = []
    too_long = 0
    eos = tokenizer.eos_token_id
    for ex in examples:
        prompt_ids = (
            tokenizer(ex.prompt, add_special_tokens=not ex.templated)["input_ids"]
            if ex.prompt
            else []
        )
        answer = (
            (" " + ex.completion) if ex.prompt and not ex.prompt[-1:].isspace() else ex.completion
        )
        completion_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        if not ex.prompt and tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id]
        ids = prompt_ids + completion_ids
        if len(ids) > max_length:
            too_long += 1
            continue
        labels = [-100] * len(prompt_ids) + completion_ids
        rows.append({"input_ids": ids, "labels": labels})
    return rows, too_long
