"""What the Kubernetes API server does with a custom resource before storing it, for tests.

No kube-apiserver can run here, so this applies the CRD's openAPIV3Schema the way the API server
does, in its order: prune nulls from non-nullable fields, apply structural defaults, validate the
schema, then evaluate every `x-kubernetes-validations` CEL rule with a real CEL implementation
(cel-python), with values typed by the schema as the API server types them (`number` fields are
doubles even when written `0`), and Kubernetes' own CEL libraries where the CRDs use them: the
quantity library (k8s.io/apiserver/pkg/cel/library/quantity.go, in every API server since 1.29:
`quantity(string)`, `isQuantity(string)`, `q.compareTo(q)`, `q.isGreaterThan(q)`,
`q.isLessThan(q)`), with quantities parsed by the official Python client's parse_quantity.

Unknown fields follow the request's `fieldValidation` (KEP-2885, GA in 1.27): `Strict` (what
kubectl sends by default) rejects them; `Warn` (the server's default, so what client libraries
get) and `Ignore` drop them, as structural-schema pruning does. The emulated cluster
(cluster.py) applies this to every create, update and status write of a FineTuneJob.

`metadata` is not in the CRD's schema, but it is always the standard ObjectMeta: its unknown
fields are pruned, or with Strict rejected, like any other ("Pruning ... the only exception is
metadata, which is pruned to ObjectMeta fields", kubernetes.io/docs/tasks/extend-kubernetes/
custom-resources/custom-resource-definitions/#field-pruning). Strict also rejects a field given
twice in the request body ("Strict: ... if any duplicate fields are present",
kubernetes.io/docs/reference/using-api/api-concepts/#field-validation): `admit_manifest` takes
the YAML text kubectl would send. A `generateName` without a `name` gets its name before
validation, as the registry's create does (k8s.io/apiserver/pkg/storage/names).
"""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from kubernetes.utils.quantity import parse_quantity

# The fields of metav1.ObjectMeta (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
OBJECT_META_FIELDS = frozenset(
    {
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
        "annotations", "ownerReferences", "finalizers", "managedFields",
    }
)  # fmt: skip
# names.SimpleNameGenerator: randomLength 5, MaxGeneratedNameLength 63 - 5; utilrand's alphabet.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def generate_name(prefix: str) -> str:
    """The name the API server gives an object created with only metadata.generateName."""
    return prefix[: 63 - 5] + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))


class _DuplicateKeys(yaml.SafeLoader):
    """The body as the server's strict decoder sees it: a key twice in one object is a
    `duplicate field` error (reported, not last-wins)."""

    duplicates: list[str]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                self.duplicates.append(f'duplicate field "{key}"')
        return super().construct_mapping(node, deep=deep)


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _prune_nulls(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties")
        out = {}
        for key, item in value.items():
            sub = (
                props.get(key, {}) if props is not None else schema.get("additionalProperties", {})
            )
            if item is None and not sub.get("nullable"):
                continue
            out[key] = _prune_nulls(sub, item)
        return out
    if isinstance(value, list):
        return [_prune_nulls(schema.get("items", {}), v) for v in value]
    return value


def _prune_unknown(schema: dict[str, Any], value: Any) -> Any:
    """Structural pruning: fields the schema does not declare are dropped."""
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return {k: _prune_unknown(extra, v) for k, v in value.items()}
            return value  # e.g. metadata: an object with no declared fields keeps them all
        return {k: _prune_unknown(props[k], v) for k, v in value.items() if k in props}
    if isinstance(value, list):
        return [_prune_unknown(schema.get("items", {}), v) for v in value]
    return value


def _unknown(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """The paths of the fields the schema does not declare (what pruning would drop)."""
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in value.items():
                    out += _unknown(extra, v, f"{path}.{k}" if path else k)
            return out
        for k, v in value.items():
            where = f"{path}.{k}" if path else k
            out += _unknown(props[k], v, where) if k in props else [where]
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _unknown(schema.get("items", {}), v, f"{path}[{i}]")
    return out


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


def _strict(schema: Any) -> Any:
    """The schema as JSON Schema draft 4, which shares OpenAPI 3.0's boolean exclusiveMinimum."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if k != "x-kubernetes-validations"}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False  # kubectl --validate=strict (the default)
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _to_cel(schema: dict[str, Any], value: Any) -> Any:
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): _to_cel(
                    props.get(k, {})
                    if props is not None
                    else schema.get("additionalProperties", {}),
                    v,
                )
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        return celtypes.ListType([_to_cel(schema.get("items", {}), v) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return celtypes.StringType(value)


@dataclass(frozen=True)
class _Quantity:
    """A resource.Quantity value in CEL."""

    value: Any


def _quantity(text: Any) -> Any:
    if not isinstance(text, celtypes.StringType):
        return celpy.CELEvalError("no such overload: quantity", TypeError, None)
    try:
        return _Quantity(parse_quantity(str(text)))
    except ValueError as exc:
        return celpy.CELEvalError(f"invalid quantity: {exc}", ValueError, None)


def _is_quantity(text: Any) -> Any:
    try:
        parse_quantity(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


def _compare(a: _Quantity, b: _Quantity) -> Any:
    return celtypes.IntType((a.value > b.value) - (a.value < b.value))


CEL_LIBRARY = {
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "compareTo": _compare,
    "isGreaterThan": lambda a, b: celtypes.BoolType(a.value > b.value),
    "isLessThan": lambda a, b: celtypes.BoolType(a.value < b.value),
}


class ApiServer:
    """Admits or rejects objects of one CRD as the API server would."""

    def __init__(self, crd: dict[str, Any]) -> None:
        self.schema = openapi_schema(crd)
        self.validator = jsonschema.Draft4Validator(_strict(self.schema))
        self.status_validator = jsonschema.Draft4Validator(
            _strict(self.schema["properties"].get("status") or {})
        )
        self.cel = celpy.Environment()
        self._programs: dict[str, Any] = {}

    def decoding_errors(self, obj: dict[str, Any]) -> list[str]:
        """Strict decoding: each field that pruning would drop is an `unknown field` error (a
        400 BadRequest, before any validation: "strict decoding error: unknown field ...")."""
        meta = obj.get("metadata")
        unknown = (
            [f"metadata.{k}" for k in meta if k not in OBJECT_META_FIELDS]
            if isinstance(meta, dict)
            else []
        )
        rest = {k: v for k, v in obj.items() if k != "metadata"}
        unknown += _unknown(self.schema, _prune_nulls(self.schema, rest))
        return [f'unknown field "{p}"' for p in unknown]

    def admit_manifest(self, text: str, strict: bool = True) -> tuple[dict[str, Any], list[str]]:
        """What `kubectl create -f` of this YAML text ends in (one document): the stored object
        and the errors. With strict, a duplicate field is an error before anything else."""
        loader = _DuplicateKeys(text)
        loader.duplicates = []
        try:
            obj = loader.get_single_data()
        finally:
            loader.dispose()
        if strict and loader.duplicates:
            return obj, loader.duplicates
        return self.admit(obj, strict=strict)

    def admit(self, obj: dict[str, Any], strict: bool = True) -> tuple[dict[str, Any], list[str]]:
        """The object as it would be stored, and the errors that would reject it. strict:
        fieldValidation=Strict (unknown fields are errors) rather than pruned."""
        if strict:
            decoding = self.decoding_errors(obj)
            if decoding:
                return obj, decoding
        stored = _prune_nulls(self.schema, copy.deepcopy(obj))
        meta = stored.get("metadata")
        if isinstance(meta, dict):
            stored["metadata"] = meta = {k: v for k, v in meta.items() if k in OBJECT_META_FIELDS}
            if meta.get("generateName") and not meta.get("name"):
                meta["name"] = generate_name(meta["generateName"])
        stored = _apply_defaults(self.schema, _prune_unknown(self.schema, stored))
        errors = [
            f"{_path(e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(self.validator.iter_errors(stored), key=lambda e: list(e.absolute_path))
        ]
        if not errors:
            self._rules(self.schema, stored, [], errors)
        return stored, errors

    def admit_status(self, status: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """A status subresource write: only `.status` is validated (and pruned: the operator's
        client sends no fieldValidation), as the API server does for /status."""
        schema = self.schema["properties"]["status"]
        stored = _apply_defaults(schema, _prune_unknown(schema, _prune_nulls(schema, status)))
        errors = [
            f"status{'.' if e.absolute_path else ''}{_path(e.absolute_path)}: {e.message}"
            for e in sorted(
                self.status_validator.iter_errors(stored), key=lambda e: list(e.absolute_path)
            )
        ]
        if not errors:
            self._rules(schema, stored, ["status"], errors)
        return stored, errors

    def rule_messages(self) -> list[str]:
        """The message of every CEL rule in the schema."""
        messages: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                messages.extend(r["message"] for r in node.get("x-kubernetes-validations", ()))
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.schema)
        return messages

    def rules_count(self) -> int:
        return len(self.rule_messages())

    def _program(self, rule: str) -> Any:
        if rule not in self._programs:
            self._programs[rule] = self.cel.program(self.cel.compile(rule), functions=CEL_LIBRARY)
        return self._programs[rule]

    def _rules(
        self, schema: dict[str, Any], value: Any, path: list[Any], errors: list[str]
    ) -> None:
        for rule in schema.get("x-kubernetes-validations", ()):
            result = self._program(rule["rule"]).evaluate({"self": _to_cel(schema, value)})
            if isinstance(result, Exception):
                raise AssertionError(f"CEL rule {rule['rule']!r} failed to evaluate: {result}")
            if not isinstance(result, celtypes.BoolType):
                raise AssertionError(f"CEL rule {rule['rule']!r} gave {result!r}, not a bool")
            if not result:
                where = _path(path) or "<root>"
                if "fieldPath" in rule:
                    where = (_path(path) + rule["fieldPath"]) if path else rule["fieldPath"][1:]
                errors.append(f"{where}: Invalid value: {rule['message']}")
        if isinstance(value, dict):
            props = schema.get("properties")
            for key, item in value.items():
                sub = props.get(key) if props is not None else schema.get("additionalProperties")
                if sub:
                    self._rules(sub, item, [*path, key], errors)
        elif isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                self._rules(schema["items"], item, [*path, i], errors)
