"""The security model (docs/security.md) as tests: each fails when the protection it names is
lost. The end-to-end checks (no credential in ConfigMaps, statuses, Events or logs; policy
violations refused) run on the real control plane in tests/e2e (test_lifecycle.py,
test_correctness.py, test_tenancy.py, test_admission_policy.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune.admission.policy import policy_problems
from kubetune.api import FineTuneJob, FineTuneSchedule, describe_errors
from kubetune.controller.build import build_configmap, build_job
from kubetune.controller.settings import OperatorSettings
from kubetune.manifests import Loader, stamped_job
from tests.conftest import ROOT, valid_job

SETTINGS = OperatorSettings(
    trainer_image="registry.example.com/kubetune/trainer:0.1.0", max_gpus_per_job=4
)
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def example(path: Path) -> FineTuneJob:
    """The example's FineTuneJob, or the one a FineTuneSchedule example stamps."""
    doc = yaml.load(path.read_text(), Loader=Loader)
    doc["metadata"].update(
        namespace=doc["metadata"].get("namespace", "ml"), uid="uid-x", generation=1
    )
    if doc["kind"] == "FineTuneSchedule":
        job = stamped_job(FineTuneSchedule.model_validate(doc))
        job.metadata.uid, job.metadata.generation = "uid-x", 1
        return job
    return FineTuneJob.model_validate(doc)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_trainer_pod_is_locked_down(path: Path) -> None:
    job = build_job(example(path), "0123abcd", SETTINGS)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False, "no service-account token"
    assert pod["enableServiceLinks"] is False
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True, "read-only root filesystem"
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}, "no capability added, all dropped"
    assert "privileged" not in security
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/work", "/tmp", "/dev/shm"}
    assert all("hostPath" not in v for v in pod["volumes"])


def test_credentials_reach_the_pod_only_by_secret_reference() -> None:
    job = example(ROOT / "examples" / "lora-s3.yaml")
    (container,) = build_job(job, "0123abcd", SETTINGS)["spec"]["template"]["spec"]["containers"]
    (source,) = container["envFrom"]
    # Under the output's prefix: the trainer uses these keys for the output (and, having no
    # Secret of their own, the model and the data), nothing else.
    assert source == {
        "secretRef": {"name": job.spec.output.credentials_secret},
        "prefix": "KUBETUNE_OUTPUT_",
    }
    assert not any("valueFrom" in e for e in container["env"])
    config = build_configmap(job, "0123abcd", SETTINGS)["data"]["config.json"]
    assert "AWS_SECRET_ACCESS_KEY" not in config and "secretKey" not in config


@pytest.mark.parametrize("name", ["other-namespace/s3-credentials", "../s3", "S3_Credentials"])
def test_a_secret_in_another_namespace_cannot_be_named(name: str) -> None:
    doc = valid_job()
    doc["spec"]["output"]["credentialsSecret"] = name
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.model_validate(doc)
    (problem,) = describe_errors(caught.value, FineTuneJob)
    assert problem.startswith("spec.output.credentialsSecret: ")


def _with(**spec: Any) -> FineTuneJob:
    doc = copy.deepcopy(valid_job())
    doc["metadata"]["uid"] = "uid-1"
    doc["spec"].update(spec)
    return FineTuneJob.model_validate(doc)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"image": "docker.io/attacker/trainer:latest"}, "spec.image"),
        ({"resources": {"gpus": 8}}, "spec.resources.gpus"),
        ({"resources": {"gpus": 4, "nodes": 2}}, "spec.resources"),
        ({"output": {"uri": "file:///etc"}}, "spec.output.uri"),
    ],
)
def test_policy_refuses_what_the_cluster_does_not_allow(spec: dict[str, Any], field: str) -> None:
    problems = policy_problems(_with(**spec), SETTINGS)
    assert problems and problems[0].startswith(f"{field}:")


def test_the_trainer_image_cannot_be_swapped_through_the_spec_unless_allowed() -> None:
    assert policy_problems(_with(image=SETTINGS.trainer_image), SETTINGS) == []
    allowed = SETTINGS.model_copy(update={"allowed_images": ["registry.example.com/ml/trainer:2"]})
    assert policy_problems(_with(image="registry.example.com/ml/trainer:2"), allowed) == []
    assert policy_problems(_with(image="registry.example.com/ml/trainer:3"), allowed)
