"""Reading FineTuneJob and FineTuneProfile manifests from YAML, with problems reported as
`file:line: path: message`.

Used by `kubetune validate` and `kubetune run`: the same pydantic models the operator uses, so a
manifest that passes here passes the operator and (through the generated CRD) the API server.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.admission import ClusterPolicy, admit_pinned
from kubetune.api import (
    GROUP,
    KIND,
    PROFILE_KIND,
    SCHEDULE_KIND,
    FineTuneJob,
    FineTuneProfile,
    FineTuneSchedule,
    describe_errors,
    stamp,
)


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats, as kubectl reads them: `2e-4` is a number; and
    a key given twice in one mapping is an error, as the API server's strict field validation
    (what kubectl asks for) rejects a duplicate field instead of keeping the last one
    (kubernetes.io/docs/reference/using-api/api-concepts/#field-validation)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges; its keys may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {first}); a mapping holds each key once",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


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


@dataclass(frozen=True)
class Problem:
    """One problem: where (file, line, field) and what, with the fix when there is one."""

    source: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.field + ': ' if self.field else ''}{self.message}"


@dataclass
class Document:
    """One YAML document of a manifest file and what validating it found."""

    source: str
    index: int
    line: int
    job: FineTuneJob | None = None
    profile: FineTuneProfile | None = None
    schedule: FineTuneSchedule | None = None
    problems: list[Problem] = field(default_factory=list)
    skipped_kind: str | None = None
    generate_name: str | None = None
    node: yaml.Node | None = None
    under_profile: str | None = None  # the profile (given beside it) it was checked against
    name: str | None = None  # metadata.name as written, valid or not
    warnings: list[Problem] = field(default_factory=list)  # what the cluster may still refuse

    kind: str | None = KIND  # None: not one object (a file that cannot be read, or holds none)

    @property
    def display_name(self) -> str:
        """The name; for a generateName the prefix, as the API server will complete it."""
        if self.generate_name:
            return f"{self.generate_name}* (generateName)"
        parsed = self.parsed
        return parsed.metadata.name if parsed is not None else "?"

    @property
    def parsed(self) -> FineTuneJob | FineTuneProfile | FineTuneSchedule | None:
        return self.job or self.profile or self.schedule

    @property
    def valid(self) -> bool:
        return self.parsed is not None and not self.problems

    def problem(self, message: str, line: int | None = None, field: str | None = None) -> None:
        self.problems.append(Problem(self.source, line or self.line or None, field, message))

    def warn(self, message: str, line: int | None = None, field: str | None = None) -> None:
        self.warnings.append(Problem(self.source, line or self.line or None, field, message))

    def to_json(self) -> dict[str, Any]:
        """What `kubetune validate -o json` prints for this document."""

        def listed(problems: list[Problem]) -> list[dict[str, Any]]:
            return [{"line": p.line, "field": p.field, "message": p.message} for p in problems]

        return {
            "file": self.source,
            "document": self.index,
            "line": self.line or None,
            "kind": self.skipped_kind or self.kind,
            "name": self.name,
            "generateName": self.generate_name,
            "valid": self.valid,
            "skipped": self.skipped_kind is not None,
            "problems": listed(self.problems),
            "warnings": listed(self.warnings),
        }


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node along loc (a pydantic error location). A field
    that is missing is blamed on the key of the mapping that lacks it (`spec:`), not on that
    mapping's first child."""
    line = node.start_mark.line + 1 if node is not None else None
    parent_key_line = line
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if pair is None:  # a missing field: the key of the mapping it is missing from
                return parent_key_line
            parent_key_line = pair[0].start_mark.line + 1
            node = pair[1]
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            parent_key_line = node.start_mark.line + 1
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
    doc.node = node
    if not isinstance(data, dict):
        doc.kind = None
        doc.problem("expected a mapping (a Kubernetes object)")
        return doc
    api_version, kind = data.get("apiVersion"), data.get("kind")
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        doc.name = metadata["name"] or None
    if kind != KIND and not str(api_version or "").startswith(f"{GROUP}/"):
        doc.skipped_kind = f"{api_version}/{kind}"
        return doc
    if isinstance(metadata, dict) and not metadata.get("name"):
        doc.generate_name = metadata.get("generateName") or None
    model: type[FineTuneJob] | type[FineTuneProfile] | type[FineTuneSchedule] = FineTuneJob
    if kind == PROFILE_KIND:
        model, doc.kind = FineTuneProfile, PROFILE_KIND
    elif kind == SCHEDULE_KIND:
        model, doc.kind = FineTuneSchedule, SCHEDULE_KIND
    try:
        # By the JSON names only, as the API server reads it: `learning_rate` is an unknown
        # field there, so it is here too (the models also accept Python names, for code).
        parsed = model.model_validate(data, by_name=False)
        if isinstance(parsed, FineTuneProfile):
            doc.profile = parsed
        elif isinstance(parsed, FineTuneSchedule):
            doc.schedule = parsed
        else:
            doc.job = parsed
    except ValidationError as exc:
        for problem in describe_errors(exc, model):
            path, _, message = problem.partition(": ")
            doc.problem(message, _problem_line(problem, node), path)
    return doc


@dataclass
class RawDocument:
    """One YAML document as read: its data, its node (for line numbers) and where it is."""

    data: Any
    node: yaml.Node | None
    doc: Document


def _yaml_problem(source: str, exc: yaml.YAMLError) -> Document:
    """A YAML error with its detail: where (line and column), what was found and what was
    expected, and the construct it happened in."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    message = f"invalid YAML: {problem}"
    if mark is not None:
        message += f" (column {mark.column + 1})"
    if context:
        message += f", {context}"
        if context_mark is not None and (mark is None or context_mark.line != mark.line):
            message += f" at line {context_mark.line + 1}"
    doc = Document(source, 0, mark.line + 1 if mark is not None else 0, kind=None)
    doc.problem(message)
    return doc


def _source(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def read_documents(path: str | Path) -> list[RawDocument] | Document:
    """The documents of a YAML file (`-`: standard input), or one Document whose problem says
    why it cannot be read."""
    source = _source(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        doc = Document(source, 0, 0, kind=None)
        doc.problem("no such file")
        return doc
    except (OSError, UnicodeDecodeError) as exc:
        doc = Document(source, 0, 0, kind=None)
        doc.problem(f"cannot read: {exc}")
        return doc
    try:
        nodes = list(yaml.compose_all(text, Loader=Loader))
        datas = list(yaml.load_all(text, Loader=Loader))
    except yaml.YAMLError as exc:
        return _yaml_problem(source, exc)
    return [
        RawDocument(data, node, Document(source, index, node.start_mark.line + 1 if node else 1))
        for index, (node, data) in enumerate(zip(nodes, datas, strict=True))
        if data is not None
    ]


def load_manifests(path: str | Path) -> list[Document]:
    """Every document of a YAML file, validated. Problems name the file, line and field. A file
    with no FineTuneJob in it is a problem too: validating it checked nothing."""
    raw = read_documents(path)
    if isinstance(raw, Document):
        return [raw]
    docs = [validate_document(r.data, r.node, r.doc) for r in raw]
    if all(d.skipped_kind for d in docs):
        found = ", ".join(sorted({str(d.skipped_kind) for d in docs})) or "nothing"
        empty = Document(_source(path), 0, 0, kind=None)
        empty.problem(f"no {KIND}, {PROFILE_KIND} or {SCHEDULE_KIND} in this file (found: {found})")
        docs.append(empty)
    return docs


def check_against_cluster(
    docs: list[Document],
    settings: ClusterPolicy | None = None,
    settings_source: str = "",
) -> None:
    """Each valid FineTuneJob (and each schedule's template, as the job it stamps) checked as
    the operator checks a run before it starts it, as far as the files given can tell:

    - under a FineTuneProfile given beside it (in any of the files): the profile's defaults
      filled in, its limits checked; each violation is a problem at the job's field (the
      profile's namespaceSelector needs the namespace's labels, which only the cluster knows);
    - a profile named but not given: a warning naming the files read (without it on the
      cluster, the run waits in Pending/ProfileNotFound);
    - no profile named: a serviceAccountName, or an operator that requires a profile, is a
      warning (a default profile on the cluster may allow it);
    - the operator's policy: trainer images, GPUs per job, file:// outputs, with `settings`
      (the chart's values: settings_from_values) or the chart's defaults.
    """
    settings = settings or ClusterPolicy()
    profiles = {d.profile.metadata.name: d.profile for d in docs if d.profile and not d.problems}
    read = ", ".join(dict.fromkeys(d.source for d in docs))
    for doc in docs:
        job, prefix = doc.job, "spec."
        if doc.schedule is not None:  # the FineTuneJob its template stamps
            job, prefix = stamped_job(doc.schedule), "spec.jobTemplate.spec."
        if job is not None and not doc.problems:
            _check_job(doc, job, prefix, profiles, settings, settings_source, read)


def _check_job(
    doc: Document,
    job: FineTuneJob,
    prefix: str,
    profiles: dict[str, FineTuneProfile],
    settings: ClusterPolicy,
    settings_source: str,
    read: str,
) -> None:
    """One job admitted as the operator admits it (admission.admit_pinned, under the profile
    given beside it or none), each problem reported at its field; what only the cluster can
    decide is a warning."""

    def at(line: str, to: Callable[[str, int | None, str | None], None]) -> None:
        line = prefix + line.removeprefix("spec.")
        path, _, message = line.partition(": ")
        to(message, _problem_line(line, doc.node), path)

    origin = f"the values in {settings_source}" if settings_source else "the chart's defaults"
    name = job.spec.profile
    if name and name not in profiles:
        at(
            f"spec.profile: FineTuneProfile {name!r} is not among the files read ({read}); "
            "on a cluster without it the run waits in Pending (ProfileNotFound). Give its "
            f"file too to check the job against it (kubectl get finetuneprofiles {name} -o "
            "yaml > profile.yaml)",
            doc.warn,
        )
    admission = admit_pinned(job, profiles.get(name or ""), settings)
    if name in profiles:
        for line in admission.profile_problems:
            at(line, doc.problem)
        if admission.profile_problems:
            return
        doc.under_profile = name
    elif not name:
        for line in admission.profile_problems:
            at(f"{line}; a default FineTuneProfile of the cluster may allow it", doc.warn)
        if settings.require_profile:
            at(
                "spec.profile: the operator runs FineTuneJobs only under a FineTuneProfile "
                f"({origin}: trainer.requireProfile); name one, unless the cluster has a "
                "default profile offered to this namespace",
                doc.warn,
            )
    hint = "" if settings_source else "; --settings VALUES.yaml checks against your cluster's"
    for line in admission.policy_problems:
        # A profile not among the files may allow more images: only a warning then.
        unknown = name and not doc.under_profile and line.startswith("spec.image:")
        report = doc.warn if unknown else doc.problem
        at(f"{line} (the operator's policy: {origin}{hint})", report)


def settings_from_values(path: str | Path) -> tuple[ClusterPolicy | None, Document]:
    """The cluster policy `kubetune validate` checks against, from a Helm values file of the
    chart (what `helm install -f` is given, or `helm get values RELEASE -o yaml`):
    trainer.image (repository, tag or digest), trainer.allowedImages, trainer.maxGpusPerJob,
    trainer.allowFileOutput, trainer.requireProfile; the chart's defaults for what it leaves out.
    Or None and the file's problems (a Document of kind None)."""
    raw = read_documents(path)
    if isinstance(raw, Document):
        return None, raw
    doc = Document(_source(path), 0, raw[0].doc.line if raw else 0, kind=None)
    values = raw[0].data if raw else {}
    if not isinstance(values, dict):
        doc.problem("must be a mapping: the chart's values, as `helm get values RELEASE -o yaml` "
                    "prints them")  # fmt: skip
        return None, doc
    trainer = values.get("trainer") or {}
    image = trainer.get("image") or {} if isinstance(trainer, dict) else {}
    for name, value in (("trainer", trainer), ("trainer.image", image)):
        if not isinstance(value, dict):
            doc.problem("must be a mapping (as in the chart's values.yaml)", field=name)
            return None, doc
    fields: dict[str, Any] = {}
    if image.get("repository") or image.get("tag") or image.get("digest"):
        default = ClusterPolicy().trainer_image
        repository, _, tag = default.rpartition(":")
        repository = image.get("repository") or repository
        # The chart's helper: a digest, when set, is used instead of the tag.
        digest, tag = image.get("digest"), image.get("tag") or tag
        fields["trainer_image"] = f"{repository}@{digest}" if digest else f"{repository}:{tag}"
    keys = {
        "allowed_images": "allowedImages",
        "max_gpus_per_job": "maxGpusPerJob",
        "allow_file_output": "allowFileOutput",
        "require_profile": "requireProfile",
    }
    fields.update({k: trainer[key] for k, key in keys.items() if trainer.get(key) is not None})
    try:
        return ClusterPolicy.model_validate(fields), doc
    except ValidationError as exc:
        for line in describe_errors(exc):
            name, _, message = line.partition(": ")
            key = keys.get(name, name)
            at = _line_of(raw[0].node, ("trainer", key)) if raw else None
            doc.problem(message, line=at, field=f"trainer.{key}")
        return None, doc


def stamped_job(schedule: FineTuneSchedule) -> FineTuneJob:
    """A FineTuneJob as the schedule stamps it (api.stamp), for a time as of now."""
    raw = schedule.model_dump(by_alias=True, exclude_none=True, mode="json")
    return FineTuneJob.model_validate(stamp(raw, datetime.now(UTC)))
