"""Reading FineTuneJob manifests from YAML, with problems reported as `file:line: path: message`.

Used by `kubetune validate` and `kubetune run`: the same pydantic models the operator uses, so a
manifest that passes here passes the operator and (through the generated CRD) the API server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import GROUP, KIND, FineTuneJob, describe_errors


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, as kubectl reads them: `2e-4` is a number."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass
class Document:
    """One YAML document of a manifest file and what validating it found."""

    source: str
    index: int
    line: int
    job: FineTuneJob | None = None
    problems: list[str] = field(default_factory=list)
    skipped_kind: str | None = None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node along loc (a pydantic error location)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                # An unknown field is reported at its key, which does exist.
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _problem_line(problem: str, node: yaml.Node | None) -> int | None:
    path = problem.split(": ", 1)[0]
    loc: list[Any] = []
    for segment in path.replace("]", "").split("."):
        name, *indices = segment.split("[")
        loc.append(name)
        loc.extend(int(i) for i in indices if i.isdigit())
    return _line_of(node, tuple(loc))


def validate_document(data: Any, node: yaml.Node | None, doc: Document) -> Document:
    if not isinstance(data, dict):
        doc.problems.append(f"{doc.source}:{doc.line}: expected a mapping (a Kubernetes object)")
        return doc
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if kind != KIND and not str(api_version or "").startswith(f"{GROUP}/"):
        doc.skipped_kind = f"{api_version}/{kind}"
        return doc
    try:
        doc.job = FineTuneJob.model_validate(data)
    except ValidationError as exc:
        for problem in describe_errors(exc, FineTuneJob):
            line = _problem_line(problem, node) or doc.line
            doc.problems.append(f"{doc.source}:{line}: {problem}")
    return doc


@dataclass
class RawDocument:
    """One YAML document as read: its data, its node (for line numbers) and where it is."""

    data: Any
    node: yaml.Node | None
    doc: Document


def read_documents(path: str | Path) -> list[RawDocument] | Document:
    """The documents of a YAML file, or one Document whose problem says why it cannot be read."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return Document(source, 0, 0, problems=[f"{source}: no such file"])
    except (OSError, UnicodeDecodeError) as exc:
        return Document(source, 0, 0, problems=[f"{source}: cannot read: {exc}"])
    try:
        nodes = list(yaml.compose_all(text, Loader=Loader))
        datas = list(yaml.load_all(text, Loader=Loader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        return Document(source, 0, 0, problems=[f"{where}: invalid YAML: {exc}".splitlines()[0]])
    return [
        RawDocument(data, node, Document(source, index, node.start_mark.line + 1 if node else 1))
        for index, (node, data) in enumerate(zip(nodes, datas, strict=True))
        if data is not None
    ]


def load_manifests(path: str | Path) -> list[Document]:
    """Every document of a YAML file, validated. Problems name the file, line and field."""
    raw = read_documents(path)
    if isinstance(raw, Document):
        return [raw]
    docs = [validate_document(r.data, r.node, r.doc) for r in raw]
    if not docs:
        docs.append(Document(str(path), 0, 1, problems=[f"{path}: no {KIND} in this file"]))
    return docs
