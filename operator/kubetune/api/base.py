"""The base of every API type: camelCase JSON names, unknown fields rejected, cross-field rules.

A cross-field rule is written twice, side by side: as a CEL expression that the Kubernetes API
server evaluates (it lands in the CRD as `x-kubernetes-validations`) and as a Python predicate that
the pydantic model evaluates. The test suite runs both over the same table of manifests, so the two
cannot drift apart unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

RULE_ERROR_TYPE = "kubetune_rule"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule of one API type.

    cel: the CEL expression, evaluated with `self` bound to the object, true when valid.
    check: the same rule in Python, over the parsed model.
    message: what is wrong and how to fix it, shown by both the API server and `kubetune validate`.
    field: the JSON path, relative to the object, of the field to blame (e.g. `.maxSteps`).
    detail: the values that broke the rule, appended in parentheses where Python checks it
      (`kubetune validate`, the operator); the CRD's message stays the fixed one.
    blame: the field Python blames where the CRD cannot name one (its fieldPath is resolved
      against the schema, where metadata is opaque).
    """

    cel: str
    check: Callable[[Any], bool]
    message: str
    field: str | None = None
    detail: Callable[[Any], str] | None = None
    blame: str | None = None

    def explain(self, obj: Any) -> str:
        return f"{self.message} ({self.detail(obj)})" if self.detail else self.message

    def to_crd(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = self.field
        return out


def _add_rules_to_schema(schema: dict[str, Any], cls: type[ApiModel]) -> None:
    rules = cls.__dict__.get("__rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.to_crd() for r in rules]


class ApiModel(BaseModel):
    """Base of every kubetune API type."""

    # strict: "3" is not an integer and "true" is not a boolean, as for the API server.
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        json_schema_extra=_add_rules_to_schema,
    )

    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        broken = [r for r in type(self).__dict__.get("__rules__", ()) if not r.check(self)]
        if broken:
            raise PydanticCustomError(
                RULE_ERROR_TYPE,
                "{message}",
                {
                    "message": "; ".join(r.explain(self) for r in broken),
                    "violations": [(r.field or r.blame or "", r.explain(self)) for r in broken],
                },
            )
        return self
