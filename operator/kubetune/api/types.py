"""Constrained string types shared by the spec: URIs, Kubernetes names and quantities.

Each type carries one regular expression. pydantic checks it with a message that names the fix,
and the CRD carries the same expression as `pattern`, so both sides accept the same strings.
The expressions use only syntax that Python's `re`, Rust's `regex` and Go's RE2 agree on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

# A run id is this many lowercase hex characters; child objects are named `<job name>-<run id>`.
RUN_ID_LENGTH = 8
# Kubernetes label values (and so Job names, which become the pods' job-name label) are at most
# 63 characters; a FineTuneJob name leaves room for "-" and the run id.
MAX_NAME_LENGTH = 63 - 1 - RUN_ID_LENGTH

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

MODEL_SCHEMES = ("hf://", "s3://", "gs://", "az://", "file:///")
MODEL_URI = (
    r"^(hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+(/[^\s]+\.gguf)?"
    r"|(s3|gs|az)://[a-z0-9][-_.a-z0-9]*(/[^\s]*)?"
    r"|file:///[^\s]*)$"
)
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
DATA_SCHEMES = ("hf://datasets/", "s3://", "gs://", "az://", "https://", "file:///")
DATASET_URI = (
    r"^(hf://datasets/[A-Za-z0-9][-_.A-Za-z0-9]*/[-_.A-Za-z0-9]+(/[^\s]+)?"
    r"|((s3|gs|az)://[a-z0-9][-_.a-z0-9]*/|https://[^\s/]+/|file:///)[^\s]*"
    r"\.(jsonl|json|csv|parquet)"
    # A prefix (ending in /): the newest data file under it, chosen when the run starts.
    r"|((s3|gs|az)://[a-z0-9][-_.a-z0-9]*/|file:///)([^\s]*/)?)$"
)
OUTPUT_SCHEMES = ("s3://", "gs://", "az://", "file:///")
OUTPUT_URI = r"^((s3|gs|az)://[a-z0-9][-_.a-z0-9]*(/[^\s]*)?|file:///[^\s]*)$"
# An experiment tracker's server: http(s)://host[:port][/path], no spaces, no credentials in it.
TRACKING_URI = r"^https?://[^\s/@]+(/[^\s]*)?$"
# Kubernetes resource.Quantity without a sign: 8, 500m, 16Gi, 1.5, 1e3.
QUANTITY = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# An environment variable's name, as the kubelet accepts it (C identifiers, the usual case).
ENV_VAR_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# An extended resource name such as nvidia.com/gpu or amd.com/gpu.
RESOURCE_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[-_.A-Za-z0-9]+$"
)


def _scheme_of(value: str) -> str:
    return value.split("://", 1)[0] + "://" if "://" in value else value


@dataclass(frozen=True)
class _JsonPattern:
    """Puts the pattern into the JSON schema (and so the CRD) without pydantic's own check,
    whose message ("String should match pattern ...") does not say how to fix the value."""

    pattern: str

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        schema["pattern"] = self.pattern
        return schema


def _pattern_check(pattern: str, explain: Callable[[str], str]) -> tuple[Any, ...]:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.match(value):
            raise ValueError(explain(value))
        return value

    return AfterValidator(check), _JsonPattern(pattern)


def _explain_model_uri(value: str) -> str:
    if not value.startswith(MODEL_SCHEMES):
        return (
            f"unsupported model URI {value!r}; use one of {', '.join(MODEL_SCHEMES)} "
            "(e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    if value.startswith("hf://"):
        return f"{value!r} is not hf://ORG/NAME (optionally followed by /path/to/file.gguf)"
    return f"{value!r} is not a valid model URI (bucket names are lowercase; no spaces)"


def _explain_dataset_uri(value: str) -> str:
    if not value.startswith(DATA_SCHEMES):
        return f"unsupported dataset URI {value!r}; use one of {', '.join(DATA_SCHEMES)}"
    if value.startswith("hf://"):
        return f"{value!r} is not hf://datasets/ORG/NAME[/path]"
    if not value.endswith(DATA_EXTENSIONS):
        return (
            f"dataset file {value!r} must end in one of {', '.join(DATA_EXTENSIONS)}, or in / "
            "to name the newest data file under a prefix (s3://, gs://, az:// or file:///)"
        )
    return f"{value!r} is not a valid dataset URI (bucket names are lowercase; no spaces)"


def _explain_output_uri(value: str) -> str:
    if not value.startswith(OUTPUT_SCHEMES):
        return (
            f"unsupported output URI {value!r} (scheme {_scheme_of(value)!r}); "
            f"use one of {', '.join(OUTPUT_SCHEMES)}"
        )
    return f"{value!r} is not a valid output URI (bucket names are lowercase; no spaces)"


def _quantity_from_number(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


ModelUri = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    *_pattern_check(MODEL_URI, _explain_model_uri),
]
DatasetUri = Annotated[
    str,
    Field(min_length=1, max_length=2048),
    *_pattern_check(DATASET_URI, _explain_dataset_uri),
]
OutputUri = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    *_pattern_check(OUTPUT_URI, _explain_output_uri),
]


def _explain_tracking_uri(value: str) -> str:
    if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
        return f"{value!r} has credentials in it; put them in the Secret named by credentialsSecret"
    return f"{value!r} is not an http:// or https:// URL of the tracking server"


TrackingUri = Annotated[
    str,
    Field(min_length=1, max_length=1024),
    *_pattern_check(TRACKING_URI, _explain_tracking_uri),
]


def _explain_webhook_url(value: str) -> str:
    if "@" in value.split("://", 1)[-1].split("/", 1)[0]:
        return f"{value!r} has credentials in it; name a Secret key with urlSecret instead"
    return f"{value!r} is not an http:// or https:// URL of the receiver"


WebhookUrl = Annotated[
    str,
    Field(min_length=1, max_length=2048),
    *_pattern_check(TRACKING_URI, _explain_webhook_url),
]


DnsSubdomain = Annotated[
    str,
    Field(min_length=1, max_length=253),
    *_pattern_check(
        DNS_SUBDOMAIN,
        lambda v: f"{v!r} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.')",
    ),
]
DnsLabel = Annotated[
    str,
    Field(min_length=1, max_length=63),
    *_pattern_check(
        DNS_LABEL,
        lambda v: f"{v!r} is not a valid DNS label (lowercase letters, digits and '-')",
    ),
]
ResourceName = Annotated[
    str,
    Field(min_length=1, max_length=253),
    *_pattern_check(
        RESOURCE_NAME, lambda v: f"{v!r} is not a resource name such as nvidia.com/gpu"
    ),
]
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_from_number),
    *_pattern_check(
        QUANTITY, lambda v: f"{v!r} is not a Kubernetes quantity such as 8, 500m or 32Gi"
    ),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
EnvVarName = Annotated[
    str,
    Field(min_length=1, max_length=256),
    *_pattern_check(
        ENV_VAR_NAME, lambda v: f"{v!r} is not an environment variable name such as HF_TOKEN"
    ),
]

_SUFFIXES = {
    "": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity's value (k8s.io/apimachinery/pkg/api/resource): 500m -> 0.5,
    32Gi -> 34359738368, 1e3 -> 1000. The API layer may not import the kubernetes client, whose
    utils.parse_quantity does the same."""
    text = str(value)
    if not re.match(QUANTITY, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as 8, 500m or 32Gi")
    number = re.match(r"^[0-9.]+([eE][-+]?[0-9]+)?", text)
    assert number is not None
    suffix = text[number.end() :]
    return Decimal(number.group(0)) * Decimal(_SUFFIXES[suffix])
