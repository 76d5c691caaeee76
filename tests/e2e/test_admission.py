"""The real API server's verdict on every example and every row of the validation tables,
through `kubectl apply --dry-run=server` against the CRDs kubetune generates: the real
OpenAPI schema and the real CEL (not cel-python), row by row beside pydantic's (and so
`kubetune validate`'s) verdict. A row the API server lets through that pydantic refuses, or the
other way round, is a CRD that disagrees with the API types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api import FineTuneJob, FineTuneProfile, FineTuneSchedule
from kubetune.manifests import Loader
from tests.conftest import ROOT, valid_job
from tests.e2e.conftest import Kubectl
from tests.unit import test_profiles as profiles_table
from tests.unit import test_validation_table as jobs_table
from tests.unit.test_profiles import profile_doc, profile_problems
from tests.unit.test_validation_table import model_problems, pydantic_problems

EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
MODELS: dict[str, Any] = {
    "FineTuneJob": FineTuneJob,
    "FineTuneProfile": FineTuneProfile,
    "FineTuneSchedule": FineTuneSchedule,
}
KINDS = set(MODELS)


def _dry_run(kubectl: Kubectl, doc: dict[str, Any]) -> tuple[bool, str]:
    done = kubectl("apply", "--dry-run=server", "-f", "-", "-o", "name", stdin_json=doc)
    return done.returncode == 0, done.stderr


def _ours(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.load_all(path.read_text(), Loader=Loader) if isinstance(d, dict)]
    return [d for d in docs if d.get("kind") in KINDS]


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if _ours(p)], ids=lambda p: str(p.relative_to(ROOT / "examples"))
)
def test_every_example_is_admitted_by_the_real_api_server(
    kubectl: Kubectl, namespace: str, path: Path
) -> None:
    """The file as a user applies it: kubectl parses the YAML (`learningRate: 1e-4` is a
    number to it, as to kubetune validate's YAML 1.2 loader)."""
    where = namespace
    for doc in _ours(path):
        assert model_problems(MODELS[doc["kind"]], doc) == []
        if doc["kind"] != "FineTuneProfile" and doc["metadata"].get("namespace"):
            where = doc["metadata"]["namespace"]
            kubectl("create", "namespace", where)  # a namespace of its own; exists: fine
    done = kubectl("apply", "--dry-run=server", "-n", where, "-f", str(path))
    assert done.returncode == 0, done.stderr


def _names(said: str, path: str) -> bool:
    """Whether the API server's refusal names the field: `path: ...`, an element of it
    (`path[1]: Duplicate value`), an unknown field by its path (strict decoding), or, for a
    rule on the whole object (`(document)` in kubetune's words), `<nil>`."""
    if path in ("(document)", "<root>") or path.startswith("metadata."):
        # A CRD's rules cannot sit in metadata: rules on the name are the root's.
        return "<nil>: Invalid value" in said
    return f"{path}: " in said or f"{path}[" in said or f'unknown field "{path}"' in said


def _expected(server_says: str) -> str:
    """What a row's emulated message promises of the real one: a CEL rule's own message."""
    return server_says.split("Invalid value: ", 1)[1] if "Invalid value: " in server_says else ""


@pytest.mark.parametrize(("edit", "path", "server_says"), jobs_table.INVALID)
def test_an_invalid_job_is_refused_by_the_real_api_server_where_pydantic_refuses_it(
    kubectl: Kubectl, namespace: str, edit: Any, path: str, server_says: str
) -> None:
    job = valid_job()
    edit(job)
    assert any(p.startswith(f"{path}: ") for p in pydantic_problems(job))
    accepted, said = _dry_run(kubectl, job)
    assert not accepted, "the real API server admitted a manifest pydantic refuses"
    assert _names(said, path), said
    assert _expected(server_says) in said, said


@pytest.mark.parametrize("edit", jobs_table.VALID)
def test_a_valid_job_is_admitted_by_the_real_api_server(
    kubectl: Kubectl, namespace: str, edit: Any
) -> None:
    job = valid_job()
    edit(job)
    assert pydantic_problems(job) == []
    accepted, said = _dry_run(kubectl, job)
    assert accepted, said


@pytest.mark.parametrize(("edit", "path", "server_says"), profiles_table.INVALID)
def test_an_invalid_profile_is_refused_by_the_real_api_server_where_pydantic_refuses_it(
    kubectl: Kubectl, namespace: str, edit: Any, path: str, server_says: str
) -> None:
    doc = profile_doc()
    edit(doc)
    assert any(p.startswith(f"{path}: ") for p in profile_problems(doc))
    accepted, said = _dry_run(kubectl, doc)
    assert not accepted, "the real API server admitted a profile pydantic refuses"
    assert _names(said, "<root>" if server_says.startswith("<root>") else path), said
    assert _expected(server_says) in said, said


@pytest.mark.parametrize("edit", profiles_table.VALID)
def test_a_valid_profile_is_admitted_by_the_real_api_server(
    kubectl: Kubectl, namespace: str, edit: Any
) -> None:
    doc = profile_doc()
    edit(doc)
    assert profile_problems(doc) == []
    accepted, said = _dry_run(kubectl, doc)
    assert accepted, said
