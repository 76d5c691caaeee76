"""Every invalid manifest is rejected by the pydantic models AND by the generated CRD (schema and
CEL rules, as the API server applies them), both naming the same field; valid ones pass both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api import MAX_NAME_LENGTH, FineTuneJob, FineTuneSchedule, describe_errors
from kubetune.manifests import Loader
from tests.conftest import ROOT, valid_job
from tests.support.apiserver import ApiServer

Edit = Callable[[dict[str, Any]], None]


def at(path: str, value: Any) -> Edit:
    """An edit that sets spec.a.b (creating mappings on the way) to value."""

    def edit(job: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = job
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return edit


def drop(path: str) -> Edit:
    def edit(job: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = job
        for key in parents:
            node = node[key]
        del node[last]

    return edit


def both(*edits: Edit) -> Edit:
    def edit(job: dict[str, Any]) -> None:
        for e in edits:
            e(job)

    return edit


# (edit, path pydantic names, text the API server's error must contain)
# fmt: off
INVALID = [
    pytest.param(at("spec.method.type", "lorra"), "spec.method.type", "spec.method.type: 'lorra' is not one of", id="method-enum"),
    pytest.param(at("spec.model.dtype", "fp8"), "spec.model.dtype", "spec.model.dtype: 'fp8'", id="dtype-enum"),
    pytest.param(at("spec.dataset.format", "xml"), "spec.dataset.format", "spec.dataset.format: 'xml'", id="format-enum"),
    pytest.param(at("spec.hyperparameters.lrScheduler", "step"), "spec.hyperparameters.lrScheduler", "spec.hyperparameters.lrScheduler: 'step'", id="scheduler-enum"),
    pytest.param(at("spec.method.quantization", {"bits": 6}), "spec.method.quantization.bits", "spec.method.quantization.bits: 6", id="bits-enum"),
    pytest.param(at("spec.hyperparameters.learningRate", -1e-4), "spec.hyperparameters.learningRate", "spec.hyperparameters.learningRate: -0.0001 is less than or equal to the minimum", id="negative-lr"),
    pytest.param(at("spec.hyperparameters.learningRate", 0), "spec.hyperparameters.learningRate", "spec.hyperparameters.learningRate: 0 is less than or equal to the minimum", id="zero-lr"),
    pytest.param(at("spec.hyperparameters.batchSize", 0), "spec.hyperparameters.batchSize", "spec.hyperparameters.batchSize: 0 is less than the minimum", id="zero-batch"),
    pytest.param(at("spec.hyperparameters.epochs", -2), "spec.hyperparameters.epochs", "spec.hyperparameters.epochs: -2", id="negative-epochs"),
    pytest.param(at("spec.resources", {"gpus": -1}), "spec.resources.gpus", "spec.resources.gpus: -1", id="negative-gpus"),
    pytest.param(at("spec.dataset.maxSeqLength", 8), "spec.dataset.maxSeqLength", "spec.dataset.maxSeqLength: 8", id="short-seq"),
    pytest.param(at("spec.dataset.validationSplit", 1.5), "spec.dataset.validationSplit", "spec.dataset.validationSplit: 1.5", id="split-over-one"),
    pytest.param(at("spec.dataset.testSplit", -0.1), "spec.dataset.testSplit", "spec.dataset.testSplit: -0.1", id="split-negative"),
    pytest.param(both(at("spec.dataset.validationSplit", 0.6), at("spec.dataset.testSplit", 0.5)), "spec.dataset.testSplit", "spec.dataset.testSplit: Invalid value: validationSplit + testSplit", id="splits-leave-no-training-data"),
    pytest.param(at("spec.dataset.testSplit", 0), "spec.dataset.testSplit", "spec.dataset.testSplit: Invalid value: evaluation needs a test set", id="no-test-set"),
    pytest.param(both(at("spec.dataset.format", "completion"), at("spec.dataset.systemPrompt", "Be brief.")), "spec.dataset.chatTemplate", "spec.dataset.chatTemplate: Invalid value: chatTemplate and systemPrompt apply only", id="chat-settings-for-completions"),
    pytest.param(at("spec.hyperparameters.maxSteps", 100), "spec.hyperparameters.maxSteps", "spec.hyperparameters.maxSteps: Invalid value: set epochs or maxSteps, not both", id="epochs-and-maxsteps"),
    pytest.param(at("spec.hyperparameters.microBatchSize", 3), "spec.hyperparameters.microBatchSize", "spec.hyperparameters.microBatchSize: Invalid value: batchSize must be a multiple", id="micro-batch-not-a-divisor"),
    pytest.param(at("spec.hyperparameters.epochs", "three"), "spec.hyperparameters.epochs", "spec.hyperparameters.epochs: 'three' is not of type 'integer'", id="string-for-integer"),
    pytest.param(at("spec.hyperparameters.epochs", "3"), "spec.hyperparameters.epochs", "spec.hyperparameters.epochs: '3' is not of type 'integer'", id="quoted-integer"),
    pytest.param(at("spec.model.trustRemoteCode", "yes"), "spec.model.trustRemoteCode", "spec.model.trustRemoteCode: 'yes' is not of type 'boolean'", id="string-for-boolean"),
    pytest.param(at("spec.gates", [{"metric": "exactMatch"}]), "spec.gates[0]", "spec.gates[0]: Invalid value: a gate sets exactly one", id="gate-without-bound"),
    pytest.param(at("spec.gates", [{"metric": "exactMatch", "min": 0.1, "max": 0.9}]), "spec.gates[0]", "spec.gates[0]: Invalid value: a gate sets exactly one", id="gate-with-two-bounds"),
    pytest.param(at("spec.gates", [{"metric": "accuracy", "min": 0.5}]), "spec.gates[0].metric", "spec.gates[0].metric: 'accuracy'", id="gate-unknown-metric"),
    pytest.param(at("spec.gates", [{"metric": "bleu", "min": 10}]), "spec.gates", "spec.gates: Invalid value: every gate's metric must be listed", id="gate-on-unevaluated-metric"),
    pytest.param(both(at("spec.evaluation.compareWithBase", False), at("spec.gates", [{"metric": "loss", "minImprovement": 0.1}])), "spec.gates", "spec.gates: Invalid value: minImprovement and maxRegression gates that compare with the base need", id="improvement-without-base"),
    pytest.param(both(at("spec.evaluation.compareWithBase", False), at("spec.gates", [{"metric": "loss", "maxRegression": 0.1, "compareWith": "base"}])), "spec.gates", "spec.gates: Invalid value: minImprovement and maxRegression gates", id="regression-without-base"),
    pytest.param(at("spec.gates", [{"metric": "loss", "max": 1.0, "compareWith": "promoted"}]), "spec.gates[0].compareWith", "spec.gates[0].compareWith: Invalid value: compareWith applies to minImprovement and maxRegression", id="compare-with-on-a-max"),
    pytest.param(at("spec.gates", [{"metric": "loss", "maxRegression": -0.1}]), "spec.gates[0].maxRegression", "spec.gates[0].maxRegression", id="negative-regression"),
    pytest.param(at("spec.gates", [{"metric": "loss", "minImprovement": 0.1, "compareWith": "champion"}]), "spec.gates[0].compareWith", "spec.gates[0].compareWith", id="compare-with-enum"),
    pytest.param(at("spec.gates", [{"metric": "loss", "maxRegression": 0.05, "evalSet": "regression"}]), "spec.gates", "spec.gates: Invalid value: a gate with evalSet: regression needs evaluation.regressionUri", id="regression-gate-without-set"),
    pytest.param(both(at("spec.evaluation.regressionUri", "s3://d/general.jsonl"), at("spec.gates", [{"metric": "loss", "max": 2, "evalSet": "forgetting"}])), "spec.gates[0].evalSet", "spec.gates[0].evalSet", id="eval-set-enum"),
    pytest.param(at("spec.notify", {"webhook": {"url": "http://a.b/c", "urlSecret": {"name": "w", "key": "url"}}}), "spec.notify.webhook", "spec.notify.webhook: Invalid value: a webhook sets exactly one of url or urlSecret", id="webhook-two-urls"),
    pytest.param(at("spec.notify", {"webhook": {}}), "spec.notify.webhook", "spec.notify.webhook: Invalid value: a webhook sets exactly one of url or urlSecret", id="webhook-no-url"),
    pytest.param(at("spec.notify", {"webhook": {"url": "ftp://a.b/c"}}), "spec.notify.webhook.url", "spec.notify.webhook.url: 'ftp://a.b/c' does not match", id="webhook-scheme"),
    pytest.param(at("spec.notify", {"webhook": {"url": "https://user:pw@a.b/c"}}), "spec.notify.webhook.url", "spec.notify.webhook.url: 'https://user:pw@a.b/c' does not match", id="webhook-credentials-in-url"),
    pytest.param(at("spec.notify", {"webhook": {"urlSecret": {"name": "w"}}}), "spec.notify.webhook.urlSecret.key", "spec.notify.webhook.urlSecret: 'key' is a required property", id="webhook-secret-without-key"),
    pytest.param(at("spec.evaluation.metrics", ["loss", "loss"]), "spec.evaluation.metrics", "spec.evaluation.metrics: ['loss', 'loss'] has non-unique elements", id="duplicate-metric"),
    pytest.param(at("spec.evaluation.metrics", []), "spec.evaluation.metrics", "spec.evaluation.metrics: [] should be non-empty", id="no-metrics"),
    pytest.param(both(at("spec.method", {"type": "prefix"}), at("spec.output.mergeAdapter", True)), "spec.output.mergeAdapter", "spec.output.mergeAdapter: Invalid value: prefix and prompt tuning cannot be merged", id="merge-prefix"),
    pytest.param(both(at("spec.method", {"type": "prompt"}), at("spec.output.mergeAdapter", True)), "spec.output.mergeAdapter", "spec.output.mergeAdapter: Invalid value: prefix and prompt tuning cannot be merged", id="merge-prompt"),
    pytest.param(at("spec.method.quantization", {"bits": 4}), "spec.method.quantization", "spec.method.quantization: Invalid value: quantization applies only to type qlora", id="quantization-on-lora"),
    pytest.param(at("spec.method", {"type": "ia3", "lora": {"r": 8}}), "spec.method.lora", "spec.method.lora: Invalid value: lora settings apply only", id="lora-on-ia3"),
    pytest.param(at("spec.method", {"type": "prefix", "promptInit": "Answer:"}), "spec.method.promptInit", "spec.method.promptInit: Invalid value: promptInit applies only to type prompt", id="prompt-init-on-prefix"),
    pytest.param(at("spec.method.virtualTokens", 20), "spec.method.virtualTokens", "spec.method.virtualTokens: Invalid value: virtualTokens applies only", id="virtual-tokens-on-lora"),
    pytest.param(both(at("spec.method", {"type": "prompt"}), at("spec.dataset.packing", True)), "spec.dataset.packing", "spec.dataset.packing: Invalid value: packing cannot be used with prefix or prompt", id="packing-prompt-tuning"),
    pytest.param(both(at("spec.dataset.validationSplit", 0), at("spec.hyperparameters.earlyStoppingPatience", 3)), "spec.hyperparameters.earlyStoppingPatience", "spec.hyperparameters.earlyStoppingPatience: Invalid value: earlyStoppingPatience needs validation data", id="early-stopping-without-validation"),
    pytest.param(at("spec.model.uri", "ftp://models/llama"), "spec.model.uri", "spec.model.uri: 'ftp://models/llama' does not match", id="model-scheme"),
    pytest.param(at("spec.model.uri", "hf://just-a-name"), "spec.model.uri", "spec.model.uri: 'hf://just-a-name' does not match", id="model-hf-without-org"),
    pytest.param(at("spec.model.uri", "file://relative/dir"), "spec.model.uri", "spec.model.uri: 'file://relative/dir' does not match", id="model-relative-file"),
    pytest.param(at("spec.dataset.uri", "s3://data/sql/train.txt"), "spec.dataset.uri", "spec.dataset.uri: 's3://data/sql/train.txt' does not match", id="dataset-extension"),
    pytest.param(at("spec.dataset.uri", "http://data.example.com/train.jsonl"), "spec.dataset.uri", "spec.dataset.uri: 'http://data.example.com/train.jsonl' does not match", id="dataset-plain-http"),
    pytest.param(at("spec.output.uri", "https://models.example.com/sql"), "spec.output.uri", "spec.output.uri: 'https://models.example.com/sql' does not match", id="output-scheme"),
    pytest.param(at("spec.output.uri", "s3://Models/sql"), "spec.output.uri", "spec.output.uri: 's3://Models/sql' does not match", id="output-uppercase-bucket"),
    pytest.param(at("spec.output.credentialsSecret", "My_Secret"), "spec.output.credentialsSecret", "spec.output.credentialsSecret: 'My_Secret' does not match", id="secret-name"),
    pytest.param(at("spec.resources", {"memory": "lots"}), "spec.resources.memory", "spec.resources.memory: 'lots' does not match", id="bad-quantity"),
    pytest.param(at("spec.resources", {"tolerations": [{"operator": "Maybe"}]}), "spec.resources.tolerations[0].operator", "spec.resources.tolerations[0].operator: 'Maybe'", id="toleration-operator"),
    pytest.param(at("spec.queueName", "Team_Queue"), "spec.queueName", "spec.queueName: 'Team_Queue' does not match", id="queue-name"),
    pytest.param(at("spec.learningRate", 1e-4), "spec.learningRate", "unknown field \"spec.learningRate\"", id="unknown-field-in-spec"),
    pytest.param(at("spec.hyperparameters.lr", 1e-4), "spec.hyperparameters.lr", "unknown field \"spec.hyperparameters.lr\"", id="unknown-nested-field"),
    pytest.param(drop("spec.model.uri"), "spec.model.uri", "spec.model: 'uri' is a required property", id="missing-model-uri"),
    pytest.param(drop("spec.output"), "spec.output", "spec: 'output' is a required property", id="missing-output"),
    pytest.param(at("metadata.name", "x" * (MAX_NAME_LENGTH + 1)), "metadata.name", "<root>: Invalid value: metadata.name must be at most", id="name-too-long-for-child-names"),
    pytest.param(at("spec.model.credentialsSecret", "store"), "spec.model.credentialsSecret", "spec.model.credentialsSecret: Invalid value: credentialsSecret is for s3://, gs:// and az:// models", id="model-secret-for-a-hub-model"),
    pytest.param(both(at("spec.dataset.uri", "https://example.com/train.jsonl"), at("spec.dataset.credentialsSecret", "store")), "spec.dataset.credentialsSecret", "spec.dataset.credentialsSecret: Invalid value: credentialsSecret is for data files at s3://", id="dataset-secret-for-local-data"),
    pytest.param(both(at("spec.resources", {"gpus": 2}), at("spec.distributed", {"nprocPerNode": 4})), "spec.distributed.nprocPerNode", "spec.distributed.nprocPerNode: Invalid value: a pod with GPUs runs one process per GPU", id="nproc-beside-gpus"),
    pytest.param(at("spec.distributed", {"strategy": "fsdp"}), "spec.distributed.strategy", "spec.distributed.strategy: Invalid value: fsdp is for method full", id="fsdp-lora"),
    pytest.param(at("spec.distributed", {"strategy": "ddpp"}), "spec.distributed.strategy", "spec.distributed.strategy: 'ddpp'", id="strategy-enum"),
    pytest.param(at("spec.resources", {"gpus": 3}), "spec.hyperparameters.batchSize", "spec.hyperparameters.batchSize: Invalid value: batchSize is global", id="batch-not-shared-by-gpus"),
    pytest.param(both(at("spec.resources", {"nodes": 2, "gpus": 2}), at("spec.hyperparameters.microBatchSize", 4)), "spec.hyperparameters.batchSize", "spec.hyperparameters.batchSize: Invalid value: batchSize is global", id="batch-not-shared-by-micro-batches"),
    pytest.param(at("spec.resources", {"nodes": 65}), "spec.resources.nodes", "spec.resources.nodes: 65", id="too-many-nodes"),
    pytest.param(both(at("spec.resources", {"nodes": 2, "gpus": 0}), at("metadata.name", "9-lives")), "metadata.name", "<root>: Invalid value: metadata.name of a run with resources.nodes over 1", id="distributed-name-not-a-dns-label"),
    pytest.param(both(at("spec.resources", {"nodes": 2, "gpus": 0}), at("metadata.name", "x" * MAX_NAME_LENGTH)), "metadata.name", "<root>: Invalid value: metadata.name of a run with resources.nodes over 1", id="distributed-name-too-long"),
]
# fmt: on

# Valid edge cases: both sides must accept them.
VALID = [
    pytest.param(lambda job: None, id="base"),
    pytest.param(drop("spec.hyperparameters"), id="no-hyperparameters"),
    pytest.param(
        both(at("spec.dataset.chatTemplate", "chatml"), at("spec.dataset.systemPrompt", "")),
        id="chat-template-and-empty-system-prompt",
    ),
    pytest.param(
        both(drop("spec.hyperparameters.epochs"), at("spec.hyperparameters.maxSteps", 50)),
        id="max-steps-only",
    ),
    pytest.param(
        both(
            at("spec.dataset.testSplit", 0), at("spec.dataset.testUri", "s3://data/sql/test.jsonl")
        ),
        id="test-uri-instead-of-split",
    ),
    pytest.param(
        at("spec.method", {"type": "qlora", "quantization": {"bits": 8}, "lora": {"r": 8}}),
        id="qlora-8bit",
    ),
    pytest.param(
        at("spec.method", {"type": "prompt", "virtualTokens": 8, "promptInit": "SQL:"}),
        id="prompt-tuning",
    ),
    pytest.param(at("spec.method", {"type": "full"}), id="full"),
    pytest.param(
        at(
            "spec.gates",
            [{"metric": "loss", "minImprovement": 0.05}, {"metric": "exactMatch", "max": 1}],
        ),
        id="improvement-gate",
    ),
    pytest.param(
        at("spec.resources", {"cpu": 8, "memory": "32Gi", "gpus": 0}), id="integer-quantity"
    ),
    pytest.param(at("metadata.name", "x" * MAX_NAME_LENGTH), id="longest-name"),
    pytest.param(at("spec.resources", {"nodes": 2, "gpus": 4}), id="two-pods-of-four-gpus"),
    pytest.param(
        both(
            at("spec.method", {"type": "full"}),
            at("spec.resources", {"nodes": 2, "gpus": 0}),
            at("spec.distributed", {"strategy": "fsdp", "nprocPerNode": 2}),
        ),
        id="fsdp-on-cpu-pods",
    ),
    pytest.param(at("spec.hyperparameters.learningRate", None), id="null-is-unset"),
    pytest.param(at("spec.dataset.uri", "hf://datasets/b-mc2/sql-create-context"), id="hf-dataset"),
    pytest.param(at("spec.model.uri", "s3://models/smollm2/model.q4.gguf"), id="gguf-model"),
    pytest.param(
        at(
            "spec.notify",
            {
                "webhook": {
                    "url": "https://deploy.example.com/hooks/kubetune",
                    "signingSecret": {"name": "hook", "key": "key"},
                }
            },
        ),
        id="webhook-url",
    ),
    pytest.param(
        at("spec.notify", {"webhook": {"urlSecret": {"name": "hook", "key": "url"}}}),
        id="webhook-url-secret",
    ),
    pytest.param(
        both(
            at("spec.evaluation.compareWithBase", False),
            at(
                "spec.gates",
                [
                    {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"},
                    {"metric": "exactMatch", "maxRegression": 0.02, "compareWith": "promoted"},
                ],
            ),
        ),
        id="champion-gates-without-base",
    ),
    pytest.param(
        both(
            at("spec.evaluation.regressionUri", "s3://d/general.jsonl"),
            at(
                "spec.gates",
                [
                    {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"},
                    {"metric": "loss", "maxRegression": 0.05, "evalSet": "regression"},
                    {
                        "metric": "loss",
                        "maxRegression": 0.0,
                        "compareWith": "promoted",
                        "evalSet": "regression",
                    },
                ],
            ),
        ),
        id="regression-guard",
    ),
    pytest.param(at("spec.dataset.uri", "s3://data/reviews/"), id="dataset-newest-under-prefix"),
    pytest.param(
        both(
            at("spec.model", {"uri": "s3://models/base", "credentialsSecret": "m"}),
            at("spec.dataset.testUri", "gs://d/test.jsonl"),
            at("spec.dataset.credentialsSecret", "d"),
        ),
        id="a-secret-per-source",
    ),
]


def model_problems(model: type[BaseModel], doc: dict[str, Any]) -> list[str]:
    """What kubetune validate says of doc read as model (by the JSON names, as the API server)."""
    try:
        model.model_validate(doc, by_name=False)
    except ValidationError as exc:
        return describe_errors(exc, model)
    return []


def pydantic_problems(job: dict[str, Any]) -> list[str]:
    return model_problems(FineTuneJob, job)


def untested_rules(server: ApiServer, table: list[Any]) -> list[str]:
    """The CEL rules of the server's CRD that no `Invalid value` row of the table triggers."""
    tested = [
        p.values[2].split("Invalid value: ", 1)[1]
        for p in table
        if "Invalid value: " in p.values[2]
    ]
    return [m for m in server.rule_messages() if not any(m.startswith(t) for t in tested)]


@pytest.mark.parametrize(("edit", "path", "server_says"), INVALID)
def test_invalid_manifest_is_rejected_by_both(
    apiserver: ApiServer, edit: Edit, path: str, server_says: str
) -> None:
    job = valid_job()
    edit(job)

    problems = pydantic_problems(job)
    assert any(p.startswith(f"{path}: ") for p in problems), problems

    _, errors = apiserver.admit(job)
    assert any(server_says in e for e in errors), errors


@pytest.mark.parametrize("edit", VALID)
def test_valid_manifest_is_accepted_by_both(apiserver: ApiServer, edit: Edit) -> None:
    job = valid_job()
    edit(job)
    assert pydantic_problems(job) == []
    assert apiserver.admit(job)[1] == []


def test_table_is_large_enough_and_covers_every_rule(apiserver: ApiServer) -> None:
    assert len(INVALID) >= 20
    assert untested_rules(apiserver, INVALID) == []


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


SCHEDULE_API = ApiServer(
    yaml.safe_load((ROOT / "crds/kubetune.dev_finetuneschedules.yaml").read_text())
)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_accepted_by_both(apiserver: ApiServer, path: Path) -> None:
    for doc in yaml.load_all(path.read_text(), Loader=Loader):
        if doc and doc.get("kind") == "FineTuneJob":
            assert pydantic_problems(doc) == []
            assert apiserver.admit(doc)[1] == []
        if doc and doc.get("kind") == "FineTuneSchedule":
            FineTuneSchedule.model_validate(doc, by_name=False)
            assert SCHEDULE_API.admit(doc)[1] == []
            # The FineTuneJob it stamps is admitted too.
            stamped = {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": doc["metadata"]["name"] + "-29923380"},
                "spec": doc["spec"]["jobTemplate"]["spec"],
            }
            assert pydantic_problems(stamped) == []
            assert apiserver.admit(stamped)[1] == []


def test_defaults_agree(apiserver: ApiServer) -> None:
    """What the API server stores after defaulting equals what pydantic fills in."""
    job = valid_job()
    stored, errors = apiserver.admit(job)
    assert errors == []
    parsed = FineTuneJob.model_validate(job).model_dump(mode="json", exclude_none=True)
    assert stored["spec"] == parsed["spec"]
