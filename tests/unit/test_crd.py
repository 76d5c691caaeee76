"""The checked-in CRD and API reference are what the models generate, and the CRD is structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.cli import main
from kubetune.codegen.apidoc import render_api_docs
from kubetune.codegen.crd import KINDS, PROFILE, Kind, crd, render_crd
from tests.conftest import ROOT

CRD_PATH = ROOT / "crds" / "kubetune.dev_finetunejobs.yaml"
DOCS_PATH = ROOT / "docs" / "api.md"
EACH_KIND = pytest.mark.parametrize("kind", KINDS, ids=[k.singular for k in KINDS])


@EACH_KIND
def test_checked_in_crd_is_current(kind: Kind) -> None:
    path = ROOT / "crds" / kind.file_name
    assert path.read_text(encoding="utf-8") == render_crd(kind), "crds/ is stale: run `make crd`"


def test_checked_in_api_docs_are_current() -> None:
    assert DOCS_PATH.read_text(encoding="utf-8") == render_api_docs(), (
        "docs/api.md is stale: run `make docs`"
    )


@EACH_KIND
def test_cli_reproduces_the_crd_byte_for_byte(tmp_path: Any, kind: Kind) -> None:
    out = tmp_path / "crd.yaml"
    assert main(["crd", "--kind", kind.singular, "--output", str(out)]) == 0
    assert out.read_bytes() == (ROOT / "crds" / kind.file_name).read_bytes()


def _nodes(node: Any, path: str = "") -> Any:
    """Every schema node with its path."""
    if isinstance(node, dict):
        yield path, node
        for name, sub in node.get("properties", {}).items():
            yield from _nodes(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            yield from _nodes(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _nodes(node["additionalProperties"], f"{path}{{}}")
        for option in node.get("anyOf", ()):
            yield from _nodes(option, f"{path}|")


SCHEMA = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _schema(kind: Kind) -> Any:
    return crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(lambda p, n: "$ref" not in n and "$defs" not in n, id="refs-inlined"),
        pytest.param(lambda p, n: "title" not in n, id="no-titles"),
        pytest.param(lambda p, n: "const" not in n, id="no-const"),
        pytest.param(lambda p, n: not n.get("uniqueItems"), id="no-uniqueItems"),
        pytest.param(
            lambda p, n: not ("properties" in n and "additionalProperties" in n),
            id="properties-xor-additionalProperties",
        ),
        pytest.param(lambda p, n: {"type": "null"} not in n.get("anyOf", []), id="no-null-types"),
        pytest.param(
            lambda p, n: (
                isinstance(n.get("exclusiveMinimum", True), bool)
                and isinstance(n.get("exclusiveMaximum", True), bool)
            ),
            id="openapi3-exclusive-bounds",
        ),
        pytest.param(
            lambda p, n: p.endswith("|") or "type" in n or n.get("x-kubernetes-int-or-string"),
            id="every-node-typed",
        ),
        pytest.param(
            lambda p, n: "anyOf" not in n or n.get("x-kubernetes-int-or-string"),
            id="anyOf-only-for-int-or-string",
        ),
        pytest.param(
            lambda p, n: p.count(".") != 1 or p == ".metadata" or "description" in n,
            id="top-level-described",
        ),
    ],
)
@EACH_KIND
def test_schema_is_structural(rule: Any, kind: Kind) -> None:
    bad = [path for path, node in _nodes(_schema(kind)) if not rule(path, node)]
    assert bad == []


@EACH_KIND
def test_every_spec_field_is_described(kind: Kind) -> None:
    missing = [
        path
        for path, node in _nodes(_schema(kind)["properties"]["spec"], "spec")
        if not path.endswith(("[]", "{}", "|")) and "description" not in node
    ]
    assert missing == []


def test_names_printer_columns_and_subresources() -> None:
    spec = crd()["spec"]
    assert spec["group"] == "kubetune.dev"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["plural"] == "finetunejobs"
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Method", "Model", "Progress", "Gates", "Age"]
    for name, json_path in columns.items():
        if json_path.startswith(".metadata"):
            continue
        node = SCHEMA
        for part in json_path.strip(".").split("."):
            node = node["properties"][part]
        assert "type" in node, name


def test_profile_names_and_printer_columns() -> None:
    """`kubectl get finetuneprofiles` (or ftp) shows what each profile offers; cluster-scoped,
    no status (the operator writes nothing on a profile)."""
    spec = crd(PROFILE)["spec"]
    assert (spec["scope"], spec["names"]["shortNames"]) == ("Cluster", ["ftp"])
    version = spec["versions"][0]
    assert "subresources" not in version
    schema = _schema(PROFILE)
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        node = schema
        for part in column["jsonPath"].strip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"], column


@EACH_KIND
def test_defaults_are_valid_under_their_own_schema(kind: Kind) -> None:
    import jsonschema

    for path, node in _nodes(_schema(kind)):
        if "default" in node and node["default"] not in ({}, []):
            sub = {k: v for k, v in node.items() if k not in ("default", "description")}
            assert jsonschema.Draft4Validator(sub).is_valid(node["default"]), path


# The oldest release whose CEL validation supports fieldPath (on by default from 1.28), and newer.
@pytest.mark.parametrize("version", ["1.30.0", "1.32.0", "1.34.0"])
@EACH_KIND
def test_crd_is_a_valid_crd_manifest_for_kubernetes(version: str, kind: Kind) -> None:
    import kubernetes_validate

    doc = yaml.safe_load((ROOT / "crds" / kind.file_name).read_text())
    kubernetes_validate.validate(doc, version, strict=True)  # raises on any problem
