"""The chart's ValidatingAdmissionPolicies on the real API server: `helm upgrade` turns them on
(the rest of the suite runs with them off, to exercise the operator's own check), and `kubectl
apply --dry-run=server` of a FineTuneJob gets the verdict the operator would give as
PolicyViolation, from the real CEL, at admission: over the named profile's limits, an image,
a ServiceAccount or an output prefix it does not allow, into its model cache, or over the
chart's GPUs per job. What the policies cannot see (a default profile, a profile's
namespaceSelector) stays the operator's; a job that names no profile, or a profile that does not
exist yet, is let through to it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Kubectl
from tests.support.control_plane import ControlPlane
from tests.support.platform import ALLOWED_IMAGE, MAX_GPUS, RELEASE, SYSTEM, Platform
from tests.support.tools import helm

PROFILE = "vap-pool"
NS = "vap"


def _upgrade(plane: ControlPlane, enabled: bool) -> None:
    done = subprocess.run(
        [str(helm()), "upgrade", RELEASE, str(ROOT / "helm" / "kubetune"),
         f"--kubeconfig={plane.admin}", "--namespace", SYSTEM, "--reuse-values",
         "--set", f"admissionPolicy.enabled={str(enabled).lower()}", "--wait=hookOnly"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def policies(plane: ControlPlane, kubectl: Kubectl, platform: Platform) -> Iterator[None]:
    _upgrade(plane, True)
    platform.ensure_namespace(NS)
    platform.profile(
        PROFILE,
        limits={"gpus": 1, "nodes": 2, "totalGpus": 2, "memory": "8Gi"},
        resources={"memory": "4Gi"},
        serviceAccountName="tuner",
        allowedServiceAccounts=["tuner", "trainer-b"],
        allowedImages=["registry.example.com/team/trainer:v2"],
        allowedOutputPrefixes=["s3://models/{namespace}/"],
        modelCache={"uri": "s3://models/vap/cache/"},
    )
    platform.api.create("serviceaccounts", NS, {"metadata": {"name": "tuner"}})
    over = _job(resources={"gpus": 2})
    platform.wait_for(  # in force once the API server has compiled it and seen the profile
        "the policies to refuse", lambda: _verdict(kubectl, over).returncode != 0, 30, 0.5
    )
    try:
        yield
    finally:
        kubectl("delete", "finetuneprofile", PROFILE)
        _upgrade(plane, False)


def _job(**spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "checked", "namespace": NS},
        "spec": {
            "profile": PROFILE,
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": f"s3://data/{NS}/train.jsonl"},
            "method": {"type": "lora"},
            "output": {"uri": f"s3://models/{NS}/checked"},
        },
    }
    doc["spec"].update(spec)
    return doc


def _verdict(kubectl: Kubectl, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "--dry-run=server", "-f", "-", stdin_json=doc)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        pytest.param({"resources": {"gpus": 2}}, "spec.resources.gpus: 2 is more than "
                     f"FineTuneProfile {PROFILE} allows (limits.gpus: 1)", id="gpus"),
        pytest.param({"resources": {"gpus": 0, "nodes": 3},
                      "hyperparameters": {"batchSize": 3, "microBatchSize": 1}},
                     "spec.resources.nodes: 3 is more", id="nodes"),
        pytest.param({"resources": {"memory": "16Gi"}}, "spec.resources.memory: 16Gi is more",
                     id="memory"),
        pytest.param({"image": "docker.io/someone/trainer:latest"},
                     "spec.image: docker.io/someone/trainer:latest is not allowed", id="image"),
        pytest.param({"serviceAccountName": "cluster-admin"},
                     "spec.serviceAccountName: cluster-admin is not one", id="service-account"),
        pytest.param({"output": {"uri": "s3://models/other-team/x"}},
                     "spec.output.uri: s3://models/other-team/x is outside what "
                     f"FineTuneProfile {PROFILE} allows (allowedOutputPrefixes: "
                     f"s3://models/{NS}/)", id="output-prefix"),
        pytest.param({"output": {"uri": f"s3://models/{NS}/cache/mine"}},
                     "lies in the model cache", id="into-the-model-cache"),
    ],
)  # fmt: skip
def test_a_job_over_its_profile_is_refused_at_apply(
    kubectl: Kubectl, policies: None, spec: dict[str, Any], says: str
) -> None:
    done = _verdict(kubectl, _job(**spec))
    assert done.returncode != 0, done.stdout
    assert says in done.stderr, done.stderr
    assert f"{RELEASE}-profile-limits" in done.stderr  # the API server names the policy


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param({"resources": {"gpus": 1, "nodes": 2}}, id="at-the-limits"),
        pytest.param({"image": "registry.example.com/team/trainer:v2"}, id="the-profiles-image"),
        pytest.param({"image": ALLOWED_IMAGE}, id="the-charts-image"),
        pytest.param({"serviceAccountName": "trainer-b"}, id="an-allowed-account"),
        pytest.param({"serviceAccountName": "tuner"}, id="the-profiles-account"),
        pytest.param({"profile": "not-there-yet", "resources": {"gpus": 2}}, id="missing-profile"),
    ],
)
def test_a_job_within_its_profile_is_admitted(
    kubectl: Kubectl, policies: None, spec: dict[str, Any]
) -> None:
    done = _verdict(kubectl, _job(**spec))
    assert done.returncode == 0, done.stderr


def test_the_charts_gpu_limit_holds_for_every_job(kubectl: Kubectl, policies: None) -> None:
    doc = _job(resources={"gpus": 2, "nodes": 2})
    del doc["spec"]["profile"]
    done = _verdict(kubectl, doc)
    assert done.returncode != 0
    assert (
        f"spec.resources: 4 GPUs in all is more than this cluster allows per job ({MAX_GPUS})"
        in done.stderr
    )
    doc["spec"]["resources"] = {"gpus": 2}
    assert _verdict(kubectl, doc).returncode == 0, "at the limit"


def test_a_job_admitted_before_its_profile_tightened_is_left_alone(
    kubectl: Kubectl, platform: Platform, policies: None
) -> None:
    """Only a change of a field the policies check is checked: a label, a suspension and the
    operator's status writes are admitted after the profile tightened, and the started run goes
    on under the profile it pinned; a change of its resources is checked against the profile as
    it is now."""
    doc = platform.job(NS, "pinned", profile=PROFILE, resources={"gpus": 1})
    platform.apply(doc)
    try:
        platform.wait_phase(NS, "pinned", ("Pending", "Running"), timeout=30)
        platform.api.patch("finetuneprofiles", "", PROFILE, {"spec": {"limits": {"gpus": 0}}})
        over = _job(resources={"gpus": 1})
        platform.wait_for(
            "the tightened profile", lambda: _verdict(kubectl, over).returncode != 0, 30, 0.5
        )
        labelled = kubectl("label", "finetunejob", "pinned", "-n", NS, "team=a")
        assert labelled.returncode == 0, labelled.stderr
        status = platform.wait_phase(NS, "pinned", ("Running", "Evaluating", "Succeeded"), 120)
        assert status["profile"]["generation"] == 1
        for suspend in ("true", "false"):
            paused = kubectl("patch", "finetunejob", "pinned", "-n", NS, "--type=merge", "-p",
                             f'{{"spec": {{"suspend": {suspend}}}}}')  # fmt: skip
            assert paused.returncode == 0, paused.stderr
        changed = kubectl("patch", "finetunejob", "pinned", "-n", NS, "--type=merge", "-p",
                          '{"spec": {"resources": {"gpus": 1, "memory": "2Gi"}}}')  # fmt: skip
        assert changed.returncode != 0 and "limits.gpus: 0" in changed.stderr, changed.stderr
    finally:
        platform.api.patch("finetuneprofiles", "", PROFILE, {"spec": {"limits": {"gpus": 1}}})
        platform.api.delete("finetunejobs", NS, "pinned")
