"""Turns pydantic validation errors into one line per problem that names the field and the fix.

`spec.method.type: 'lorra' is not one of lora, qlora, dora, ia3, prefix, prompt, full`
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from kubetune.api.base import RULE_ERROR_TYPE

_QUOTED = re.compile(r"'([^']*)'|(-?\d+(?:\.\d+)?)")


def format_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """('spec', 'gates', 0, 'metric') -> 'spec.gates[0].metric'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def _join(base: str, relative: str) -> str:
    """Joins a rule's relative field path (".output.mergeAdapter") to the object's path."""
    if not relative:
        return base
    if base == "(document)":
        return relative.lstrip(".")
    return base + relative


def _model_fields_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The JSON names of the fields of the model found at loc under root, if it is a model."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = next((f for name, f in cls.model_fields.items() if (f.alias or name) == part), None)
        if field is None:
            return None
        cls = _innermost_model(field.annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f.alias or name for name, f in cls.model_fields.items()]
    return None


def _innermost_model(annotation: Any) -> Any:
    """list[X] | None -> X, for the model types of the API (one model per field at most)."""
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in args or ():
        inner = _innermost_model(arg)
        if inner is not None:
            return inner
    return None


def _camel(name: str) -> str:
    head, *rest = re.split(r"[_\-]", name)
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def did_you_mean(name: str, fields: list[str]) -> str | None:
    """The field a user most likely meant: the camelCase of a snake_case or kebab-case name, the
    same name in other letter case, or the closest spelling."""
    by_folded = {f.lower(): f for f in fields}
    for candidate in (_camel(name), name):
        if candidate.lower() in by_folded:
            return by_folded[candidate.lower()]
    close = difflib.get_close_matches(name.lower(), list(by_folded), n=1, cutoff=0.75)
    return by_folded[close[0]] if close else None


def _allowed(expected: str) -> str:
    values = [a or b for a, b in _QUOTED.findall(expected)]
    return ", ".join(values) if values else expected


def _describe(err: dict[str, Any], root: type[BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        fields = _model_fields_at(root, tuple(err["loc"][:-1])) if root else None
        if not fields:
            return "unknown field"
        guess = did_you_mean(str(err["loc"][-1]), fields)
        if guess:
            return f"unknown field; did you mean `{guess}`?"
        return f"unknown field; valid fields here: {', '.join(fields)}"
    if kind in ("literal_error", "enum"):
        return f"{value!r} is not one of {_allowed(str(ctx.get('expected', '')))}"
    comparisons = {
        "greater_than": ("greater than", "gt"),
        "greater_than_equal": ("at least", "ge"),
        "less_than": ("less than", "lt"),
        "less_than_equal": ("at most", "le"),
    }
    if kind in comparisons:
        words, key = comparisons[kind]
        return f"must be {words} {ctx[key]}, got {value!r}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters, got {len(value)}"
    if kind == "string_too_short":
        return f"must be at least {ctx['min_length']} characters"
    if kind == "too_long":
        return f"must have at most {ctx['max_length']} items"
    if kind == "too_short":
        return f"must have at least {ctx['min_length']} items"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, got {value!r}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {value!r}"
    if kind == "string_type":
        return f"must be a string, got {value!r}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping of fields, got {type(value).__name__}"
    if kind == "list_type":
        return f"must be a list, got {type(value).__name__}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def describe_errors(exc: ValidationError, root: type[BaseModel] | None = None) -> list[str]:
    """One 'path: problem' line for each problem in exc; root is the validated model type."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        path = format_path(err["loc"])
        if err["type"] == RULE_ERROR_TYPE:
            for field, message in err["ctx"]["violations"]:
                lines.append(f"{_join(path, field)}: {message}")
        else:
            lines.append(f"{path}: {_describe(err, root)}")
    return lines
