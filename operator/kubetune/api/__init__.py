"""kubetune's API types: the FineTuneJob resource and the operator-trainer contract.

Imported by both images: depends on pydantic alone (no kopf, kubernetes, torch or transformers).
"""

from kubetune.api.base import ApiModel, Rule
from kubetune.api.contract import (
    TERMINATION_MESSAGE_LIMIT,
    ExitCode,
    TrainerConfig,
    TrainerResult,
    child_name,
    make_run_id,
    resolve_spec,
    run_prefix,
)
from kubetune.api.errors import describe_errors, format_path
from kubetune.api.resource import (
    API_VERSION,
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJob,
    ObjectMeta,
)
from kubetune.api.spec import (
    DatasetSpec,
    EvaluationSpec,
    FineTuneJobSpec,
    GateSpec,
    HyperparametersSpec,
    LoraSpec,
    MethodSpec,
    ModelSpec,
    OutputSpec,
    QuantizationSpec,
    ResourcesSpec,
    Toleration,
)
from kubetune.api.status import (
    Artifacts,
    Condition,
    EvalMetrics,
    FineTuneJobStatus,
    GateResult,
    MetricsStatus,
    Progress,
)
from kubetune.api.types import MAX_NAME_LENGTH, RUN_ID_LENGTH

__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "GROUP",
    "KIND",
    "MAX_NAME_LENGTH",
    "PLURAL",
    "RUN_ID_LENGTH",
    "SHORT_NAMES",
    "SINGULAR",
    "TERMINATION_MESSAGE_LIMIT",
    "VERSION",
    "ApiModel",
    "Artifacts",
    "Condition",
    "DatasetSpec",
    "EvalMetrics",
    "EvaluationSpec",
    "ExitCode",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "GateResult",
    "GateSpec",
    "HyperparametersSpec",
    "LoraSpec",
    "MethodSpec",
    "MetricsStatus",
    "ModelSpec",
    "ObjectMeta",
    "OutputSpec",
    "Progress",
    "QuantizationSpec",
    "ResourcesSpec",
    "Rule",
    "Toleration",
    "TrainerConfig",
    "TrainerResult",
    "child_name",
    "describe_errors",
    "format_path",
    "make_run_id",
    "resolve_spec",
    "run_prefix",
]
