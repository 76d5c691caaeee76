"""The pure builders: golden manifests, valid Kubernetes objects, least privilege, policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.admission.policy import policy_problems
from kubetune.api import PERMANENT_EXIT_CODES, FineTuneJob, TrainerConfig, make_run_id
from kubetune.controller.build import build_configmap, build_job, build_service
from kubetune.controller.settings import OperatorSettings
from kubetune.manifests import Loader
from tests.conftest import ROOT, valid_job

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = OperatorSettings(
    trainer_image="registry.example.com/kubetune/trainer:0.1.0", default_memory="16Gi"
)


def example(name: str) -> FineTuneJob:
    doc = yaml.load((ROOT / "examples" / f"{name}.yaml").read_text(), Loader=Loader)
    doc["metadata"].update(
        namespace=doc["metadata"].get("namespace", "ml"), uid=f"uid-{name}", generation=1
    )
    return FineTuneJob.model_validate(doc)


def children(job: FineTuneJob) -> dict[str, dict[str, Any]]:
    run_id = make_run_id(job.metadata.uid or "", job.metadata.generation or 1)
    built = {
        "job": build_job(job, run_id, SETTINGS),
        "configmap": build_configmap(job, run_id, SETTINGS),
    }
    if job.spec.nodes() > 1:
        built["service"] = build_service(job, run_id)
    return built


@pytest.mark.parametrize("name", ["lora-s3", "qlora-kueue", "prompt-tuning", "multi-node"])
def test_children_match_golden_manifests(name: str) -> None:
    built = children(example(name))
    for kind, manifest in built.items():
        path = GOLDEN / f"{name}-{kind}.yaml"
        text = yaml.safe_dump(manifest, sort_keys=False, width=100)
        if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text(), (
            f"{path.name} differs: rerun with KUBETUNE_UPDATE_GOLDEN=1 and review"
        )
    assert built == children(example(name)), "builders must be deterministic"


@pytest.mark.parametrize(
    "name", ["lora-s3", "qlora-kueue", "prompt-tuning", "full-finetune", "multi-gpu", "multi-node"]
)
def test_children_are_valid_kubernetes_objects(name: str) -> None:
    import kubernetes_validate

    for manifest in children(example(name)).values():
        kubernetes_validate.validate(manifest, "1.32.0", strict=True)


def test_job_shape_follows_the_spec() -> None:
    job = children(example("qlora-kueue"))["job"]
    spec = job["spec"]
    assert len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert spec["suspend"] is True  # created suspended so that Kueue admits it
    assert (
        spec["backoffLimit"],
        spec["activeDeadlineSeconds"],
        spec["ttlSecondsAfterFinished"],
    ) == (4, 86400, 604800)
    [fail_fast, ignore_disruption] = spec["podFailurePolicy"]["rules"]
    assert fail_fast["onExitCodes"]["values"] == list(PERMANENT_EXIT_CODES) == [2, 3, 4, 5]
    assert ignore_disruption == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["priorityClassName"] == "batch-low"
    assert pod["containers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"},
    }
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "FineTuneJob",
        "uid-qlora-kueue",
        True,
    )


def test_configmap_holds_the_resolved_config_and_no_credentials() -> None:
    job = example("lora-s3")
    cm = children(job)["configmap"]
    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.spec.hyperparameters.learning_rate == 2e-4 and config.spec.method.lora is not None
    assert config.termination_message_path == "/dev/termination-log"
    assert config.output_prefix == f"s3://models/text-to-sql/runs/{config.run_id}"
    assert cm["metadata"]["name"] == children(job)["job"]["metadata"]["name"]
    text = json.dumps(cm)
    assert "AWS_SECRET_ACCESS_KEY" not in text and "secretRef" not in text


def test_each_secret_comes_under_its_sources_prefix() -> None:
    doc = valid_job()
    doc["metadata"]["uid"] = "uid-tracked"
    doc["spec"]["output"]["credentialsSecret"] = "s3"
    doc["spec"]["tracking"] = {
        "mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "credentialsSecret": "mlflow"},
        "wandb": {"project": "sql", "credentialsSecret": "wandb"},
    }
    container = children(FineTuneJob.model_validate(doc))["job"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    # A tracker's keys as they are (MLFLOW_*, WANDB_*); storage keys each under their
    # source's prefix, so that no Secret's AWS_* keys reach another source or a tracker.
    assert container["envFrom"] == [
        {"secretRef": {"name": "mlflow"}},
        {"secretRef": {"name": "wandb"}},
        {"secretRef": {"name": "s3"}, "prefix": "KUBETUNE_OUTPUT_"},
    ]
    doc["spec"]["model"] = {"uri": "s3://models/base", "credentialsSecret": "model-store"}
    doc["spec"]["dataset"]["credentialsSecret"] = "data-store"
    doc["spec"]["dataset"]["uri"] = "gs://datasets/train.jsonl"
    container = children(FineTuneJob.model_validate(doc))["job"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert [(e["secretRef"]["name"], e.get("prefix")) for e in container["envFrom"]] == [
        ("mlflow", None),
        ("wandb", None),
        ("model-store", "KUBETUNE_MODEL_"),
        ("data-store", "KUBETUNE_DATASET_"),
        ("s3", "KUBETUNE_OUTPUT_"),
    ]
    doc["spec"]["tracking"] = {"mlflow": {"trackingUri": "http://mlflow.mlflow:5000"}}
    del doc["spec"]["output"]["credentialsSecret"]
    del doc["spec"]["model"]["credentialsSecret"]
    del doc["spec"]["dataset"]["credentialsSecret"]
    container = children(FineTuneJob.model_validate(doc))["job"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert "envFrom" not in container


# fmt: off
POLICY_CASES = [
    pytest.param({"spec.image": "evil/miner:latest"}, "spec.image: 'evil/miner:latest' is not allowed here", id="image-not-allowed"),
    pytest.param({"spec.resources": {"gpus": 16}, "spec.hyperparameters": {"batchSize": 16}}, "spec.resources.gpus: 16 is more than this cluster allows per job (8)", id="too-many-gpus"),
    pytest.param({"spec.resources": {"gpus": 4, "nodes": 3}, "spec.hyperparameters": {"batchSize": 12}}, "spec.resources: 3 pods x 4 GPUs = 12 GPUs is more than this cluster allows per job (8)", id="too-many-gpus-over-pods"),
    pytest.param({"spec.output": {"uri": "file:///data/out"}}, "spec.output.uri: file:// would write inside the trainer pod", id="file-output"),
]
# fmt: on


@pytest.mark.parametrize(("changes", "problem"), POLICY_CASES)
def test_policy_violations_name_the_field(changes: dict[str, Any], problem: str) -> None:
    doc = valid_job()
    for path, value in changes.items():
        doc["spec"][path.split(".", 1)[1]] = value
    problems = policy_problems(FineTuneJob.model_validate(doc), SETTINGS)
    assert len(problems) == 1 and problems[0].startswith(problem)


def test_policy_allows_listed_images_and_the_default() -> None:
    settings = SETTINGS.model_copy(
        update={"allowed_images": ["registry.example.com/kubetune/trainer:0.2.0-rc1"]}
    )
    for image in (None, SETTINGS.trainer_image, "registry.example.com/kubetune/trainer:0.2.0-rc1"):
        doc = valid_job()
        if image:
            doc["spec"]["image"] = image
        assert policy_problems(FineTuneJob.model_validate(doc), settings) == []


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_NAMESPACES", '["ml", "research"]')
    monkeypatch.setenv("KUBETUNE_MAX_GPUS_PER_JOB", "2")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "example.com/trainer:1")
    settings = OperatorSettings()
    assert (settings.namespaces, settings.max_gpus_per_job, settings.trainer_image) == (
        ["ml", "research"],
        2,
        "example.com/trainer:1",
    )


def test_a_new_optional_field_left_unset_keeps_every_runs_hash() -> None:
    """An operator upgrade that adds an optional spec field must not change the hash of specs
    that do not set it: a changed hash is a new run, so every finished job would train again."""
    from pydantic import Field, create_model

    from kubetune.api import DatasetSpec, FineTuneJobSpec
    from kubetune.controller.build import spec_hash

    job = example("lora-s3")
    future_dataset = create_model(
        "FutureDatasetSpec",
        __base__=DatasetSpec,
        futureOption=(str | None, Field(default=None)),
    )
    future_spec = create_model(
        "FutureSpec", __base__=FineTuneJobSpec, dataset=(future_dataset, ...)
    )
    spec = future_spec.model_validate(job.spec.model_dump(by_alias=True))
    future = job.model_copy(update={"spec": spec})
    assert "futureOption" in spec.model_dump_json(by_alias=True)
    assert spec_hash(future) == spec_hash(job)
