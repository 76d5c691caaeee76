"""FineTuneProfiles: their own validation (pydantic and the CRD's CEL, as the API server applies
it, agree), which profile a job gets, its defaults and limits applied to a job, and the run
pinned to the profile it started with."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from kubernetes.utils.quantity import parse_quantity as client_parse_quantity

from kubetune.admission.policy import policy_problems
from kubetune.admission.profiles import apply_profile, pinned_profile, select_profile
from kubetune.api import (
    FineTuneJob,
    FineTuneProfile,
    ProfileRef,
    credential_routes,
)
from kubetune.api.spec import TokenSecret
from kubetune.api.types import parse_quantity
from kubetune.codegen.crd import PROFILE, crd
from kubetune.controller.build import NO_PROFILE, build_configmap, build_job
from kubetune.controller.settings import OperatorSettings
from kubetune.manifests import Loader
from tests.conftest import ROOT, valid_job
from tests.support.apiserver import ApiServer
from tests.unit.test_validation_table import Edit, at, both, drop, model_problems, untested_rules

SETTINGS = OperatorSettings(trainer_image="registry.example.com/kubetune/trainer:0.1.0")
EXAMPLE = ROOT / "examples" / "profiles" / "a100-pool.yaml"


@pytest.fixture(scope="module")
def profile_server() -> ApiServer:
    return ApiServer(crd(PROFILE))


def profile_doc(name: str = "pool", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneProfile",
        "metadata": {"name": name},
        "spec": spec,
    }


def profile(name: str = "pool", generation: int = 1, created: str = "", **spec: Any) -> Any:
    doc = profile_doc(name, **spec)
    doc["metadata"].update(generation=generation, creationTimestamp=created or None)
    return FineTuneProfile.model_validate(doc, by_name=False)


def job(namespace: str = "team-a", **spec: Any) -> FineTuneJob:
    doc = valid_job()
    doc["metadata"].update(namespace=namespace, uid="uid-1", generation=1)
    doc["spec"].pop("resources", None)
    doc["spec"].update(spec)
    return FineTuneJob.model_validate(doc, by_name=False)


# -- a profile's own rules -------------------------------------------------------------------

MOUNT = {"volumes": [{"name": "cache", "nfs": {"server": "nfs", "path": "/x"}}]}
# (edit, path pydantic names, text the API server's error must contain)
# fmt: off
INVALID = [
    pytest.param(at("spec", {"resources": {"gpus": 4}, "limits": {"gpus": 2}}), "spec.resources.gpus", "spec.resources.gpus: Invalid value: resources.gpus (a default) must not exceed limits.gpus", id="default-gpus-over-limit"),
    pytest.param(at("spec", {"resources": {"nodes": 4}, "limits": {"nodes": 2}}), "spec.resources.nodes", "spec.resources.nodes: Invalid value: resources.nodes (a default)", id="default-nodes-over-limit"),
    pytest.param(at("spec", {"resources": {"memory": "1Ti"}, "limits": {"memory": "900Gi"}}), "spec.resources.memory", "spec.resources.memory: Invalid value: resources.memory (a default)", id="default-memory-over-limit"),
    pytest.param(at("spec", {"resources": {"cpu": 16}, "limits": {"cpu": "8000m"}}), "spec.resources.cpu", "spec.resources.cpu: Invalid value: resources.cpu (a default)", id="default-cpu-over-limit"),
    pytest.param(at("spec", {"resources": {"memory": "lots"}}), "spec.resources.memory", "spec.resources.memory", id="not-a-quantity"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "other", "mountPath": "/models"}]}), "spec.volumeMounts", "spec.volumeMounts: Invalid value: every volumeMount names one of volumes", id="mount-of-no-volume"),
    pytest.param(at("spec", {**MOUNT, "modelCache": {"path": "/models/cache"}}), "spec.modelCache.path", "spec.modelCache.path: Invalid value: modelCache.path must lie on one of volumeMounts", id="cache-on-no-mount"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "cache", "mountPath": "/models", "readOnly": True}], "modelCache": {"path": "/models/c"}}), "spec.modelCache.path", "spec.modelCache.path: Invalid value: modelCache.path must lie on one of volumeMounts", id="cache-on-a-read-only-mount"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "cache", "mountPath": "/models"}], "modelCache": {"path": "/modelsx"}}), "spec.modelCache.path", "spec.modelCache.path: Invalid value", id="cache-beside-not-under-a-mount"),
    pytest.param(at("spec.modelCache", {"path": "/models", "uri": "s3://cache/models"}), "spec.modelCache", "spec.modelCache: Invalid value: set exactly one of path", id="cache-path-and-uri"),
    pytest.param(at("spec.modelCache", {}), "spec.modelCache", "spec.modelCache: Invalid value: set exactly one of path", id="cache-neither"),
    pytest.param(at("spec.modelCache", {"uri": "ftp://cache/models"}), "spec.modelCache.uri", "spec.modelCache.uri", id="cache-uri-scheme"),
    pytest.param(at("spec", {"serviceAccountName": "root", "allowedServiceAccounts": ["trainer"]}), "spec.serviceAccountName", "spec.serviceAccountName: Invalid value: serviceAccountName, when allowedServiceAccounts", id="account-not-allowed"),
    pytest.param(at("spec.env", [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]), "spec.env[0]", "spec.env[0]: Invalid value: set exactly one of value or valueFrom", id="env-value-and-secret"),
    pytest.param(at("spec.env", [{"name": "KUBETUNE_WORKDIR", "value": "/"}]), "spec.env[0].name", "spec.env[0].name: Invalid value: HOME, HF_HOME, PYTHONUNBUFFERED and names starting with KUBETUNE_ or PET_ are the operator's", id="env-operators-prefix"),
    pytest.param(at("spec.env", [{"name": "HF_HOME", "value": "/"}]), "spec.env[0].name", "spec.env[0].name: Invalid value: HOME, HF_HOME", id="env-operators-name"),
    pytest.param(at("spec.env", [{"name": "1BAD", "value": "x"}]), "spec.env[0].name", "spec.env[0].name", id="env-bad-name"),
    pytest.param(at("spec.env", [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "S3", "key": "k"}}}]), "spec.env[0].valueFrom.secretKeyRef.name", "spec.env[0].valueFrom.secretKeyRef.name", id="env-secret-name"),
    pytest.param(at("spec.volumes", [{"name": "v", "nfs": {"server": "a", "path": "/"}, "persistentVolumeClaim": {"claimName": "c"}}]), "spec.volumes[0]", "spec.volumes[0]: Invalid value: a volume sets exactly one of", id="volume-two-sources"),
    pytest.param(at("spec.volumes", [{"name": "v"}]), "spec.volumes[0]", "spec.volumes[0]: Invalid value: a volume sets exactly one of", id="volume-no-source"),
    pytest.param(at("spec.volumes", [{"name": "v", "hostPath": {"path": "/"}}]), "spec.volumes[0].hostPath", "unknown field", id="no-host-path"),
    pytest.param(at("spec.volumes", [{"name": "work", "nfs": {"server": "a", "path": "/"}}]), "spec.volumes[0].name", "spec.volumes[0].name: Invalid value: config, work, tmp, shm, credentials are the operator's volumes", id="volume-operators-name"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "cache", "mountPath": "/work/cache"}]}), "spec.volumeMounts[0].mountPath", "spec.volumeMounts[0].mountPath: Invalid value: /etc/kubetune, /work, /tmp, /dev/shm, /var/run/secrets are the operator's mounts", id="mount-in-operators-path"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "cache", "mountPath": "models"}]}), "spec.volumeMounts[0].mountPath", "spec.volumeMounts[0].mountPath", id="mount-not-absolute"),
    pytest.param(at("spec.namespaceSelector", {"matchExpressions": [{"key": "team", "operator": "In"}]}), "spec.namespaceSelector.matchExpressions[0].values", "spec.namespaceSelector.matchExpressions[0].values: Invalid value: In and NotIn need values", id="selector-in-without-values"),
    pytest.param(at("spec.namespaceSelector", {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]}), "spec.namespaceSelector.matchExpressions[0].values", "spec.namespaceSelector.matchExpressions[0].values: Invalid value", id="selector-exists-with-values"),
    pytest.param(at("spec.namespaceSelector", {"matchExpressions": [{"key": "team", "operator": "Has"}]}), "spec.namespaceSelector.matchExpressions[0].operator", "spec.namespaceSelector.matchExpressions[0].operator", id="selector-operator"),
    pytest.param(at("spec.allowedOutputPrefixes", ["ftp://models/"]), "spec.allowedOutputPrefixes[0]", "spec.allowedOutputPrefixes[0]", id="output-prefix-scheme"),
    pytest.param(at("spec.podLabels", {"kubetune.dev/run-id": "x"}), "spec.podLabels", "spec.podLabels: Invalid value: podLabels and podAnnotations may not use kubetune.dev/", id="reserved-pod-label"),
    pytest.param(at("spec.podAnnotations", {"batch.kubernetes.io/job-completion-index": "0"}), "spec.podLabels", "spec.podLabels: Invalid value: podLabels and podAnnotations", id="reserved-pod-annotation"),
    pytest.param(at("spec.limits.gpus", 17), "spec.limits.gpus", "spec.limits.gpus", id="limit-gpus-range"),
    pytest.param(at("spec.default", "yes"), "spec.default", "spec.default", id="default-not-a-boolean"),
    pytest.param(at("metadata.name", "a100.pool"), "metadata.name", "<root>: Invalid value: metadata.name of a FineTuneProfile is a DNS label", id="name-not-a-label"),
]
VALID = [
    pytest.param(lambda d: None, id="empty"),
    pytest.param(at("spec", {"resources": {"cpu": "500m", "memory": "16Gi"}, "limits": {"cpu": 1, "memory": "16Gi"}}), id="defaults-equal-to-limits"),
    pytest.param(at("spec", {**MOUNT, "volumeMounts": [{"name": "cache", "mountPath": "/models", "subPath": "team-a"}], "modelCache": {"path": "/models"}}), id="cache-at-the-mount"),
    pytest.param(at("spec.modelCache", {"uri": "s3://cache/models", "credentialsSecret": "cache-creds"}), id="cache-in-object-storage"),
    pytest.param(at("spec", {"serviceAccountName": "trainer", "allowedServiceAccounts": ["trainer", "gcs"]}), id="account-among-allowed"),
    pytest.param(at("spec.namespaceSelector", {}), id="empty-selector-matches-all"),
    pytest.param(at("spec", {"podLabels": {"azure.workload.identity/use": "true"}, "podAnnotations": {"sidecar.istio.io/inject": "false"}}), id="identity-label-and-mesh-annotation"),
    pytest.param(both(at("spec.default", True), drop("spec")), id="no-spec-at-all"),
]
# fmt: on


def profile_problems(doc: dict[str, Any]) -> list[str]:
    return model_problems(FineTuneProfile, doc)


@pytest.mark.parametrize(("edit", "path", "server_says"), INVALID)
def test_invalid_profile_is_rejected_by_both(
    profile_server: ApiServer, edit: Edit, path: str, server_says: str
) -> None:
    doc = profile_doc()
    edit(doc)
    problems = profile_problems(doc)
    assert any(p.startswith(f"{path}: ") for p in problems), problems
    _, errors = profile_server.admit(doc)
    assert any(server_says in e for e in errors), errors


@pytest.mark.parametrize("edit", VALID)
def test_valid_profile_is_accepted_by_both(profile_server: ApiServer, edit: Edit) -> None:
    doc = profile_doc()
    edit(doc)
    assert profile_problems(doc) == []
    assert profile_server.admit(doc)[1] == []


def test_every_profile_rule_is_in_the_table(profile_server: ApiServer) -> None:
    assert untested_rules(profile_server, INVALID) == []


def test_the_example_profile_is_accepted_by_both(profile_server: ApiServer) -> None:
    doc = yaml.load(EXAMPLE.read_text(), Loader=Loader)
    assert profile_problems(doc) == []
    stored, errors = profile_server.admit(doc)
    assert errors == []
    # What the API server stores after defaulting is what pydantic fills in.
    parsed = FineTuneProfile.model_validate(doc, by_name=False)
    assert stored["spec"] == parsed.spec.model_dump(mode="json", by_alias=True, exclude_none=True)


@pytest.mark.parametrize(
    "text", ["500m", "8", "1.5", "32Gi", "900Gi", "1Ti", "2e3", "1E3", ".5Ki", "100M", "7k", "3n"]
)
def test_quantities_compare_as_the_kubernetes_client_parses_them(text: str) -> None:
    assert parse_quantity(text) == client_parse_quantity(text)


# -- which profile ---------------------------------------------------------------------------

GPU_TEAMS = {"matchLabels": {"gpu": "yes"}}


# fmt: off
CHOICES = [
    pytest.param("a", [profile("a"), profile("b")], {}, False, "a", None, id="named"),
    pytest.param("c", [profile("a")], {}, False, None, ("ProfileNotFound", "spec.profile: FineTuneProfile 'c' does not exist (yet)"), id="named-missing-waits"),
    pytest.param("a", [profile("a", namespaceSelector=GPU_TEAMS)], {"gpu": "no"}, False, None, ("PolicyViolation", "spec.profile: FineTuneProfile 'a' is not offered to namespace team-a"), id="named-not-offered"),
    pytest.param("a", [profile("a", namespaceSelector=GPU_TEAMS)], {"gpu": "yes", "x": "y"}, False, "a", None, id="named-offered"),
    pytest.param(None, [profile("a"), profile("d", default=True)], {}, False, "d", None, id="the-default"),
    pytest.param(None, [profile("old", default=True, created="2026-01-01T00:00:00Z"), profile("new", default=True, created="2026-06-01T00:00:00Z")], {}, False, "new", None, id="newest-default"),
    pytest.param(None, [profile("d", default=True, namespaceSelector=GPU_TEAMS)], {}, False, None, None, id="default-not-offered-here"),
    pytest.param(None, [profile("a"), profile("b", namespaceSelector=GPU_TEAMS)], {}, True, None, ("PolicyViolation", "this cluster runs FineTuneJobs only under a FineTuneProfile; name one of: a"), id="required"),
    pytest.param(None, [], {}, False, None, None, id="none"),
    pytest.param("a", [profile("a", namespaceSelector={"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["free"]}, {"key": "team", "operator": "Exists"}]})], {"team": "x", "tier": "paid"}, False, "a", None, id="expressions-match"),
    pytest.param("a", [profile("a", namespaceSelector={"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]})], {"tier": "paid"}, False, None, ("PolicyViolation", "not offered"), id="does-not-exist"),
    pytest.param("a", [profile("a", namespaceSelector={"matchExpressions": [{"key": "tier", "operator": "In", "values": ["paid"]}]})], {}, False, None, ("PolicyViolation", "not offered"), id="in-needs-the-label"),
]
# fmt: on


@pytest.mark.parametrize(("wanted", "profiles", "labels", "require", "chosen", "refused"), CHOICES)
def test_which_profile_a_job_gets(
    wanted: str | None,
    profiles: list[Any],
    labels: dict[str, str],
    require: bool,
    chosen: str | None,
    refused: tuple[str, str] | None,
) -> None:
    settings = SETTINGS.model_copy(update={"require_profile": require})
    found, refusal = select_profile(job(profile=wanted), profiles, labels, settings)
    assert (found.metadata.name if found else None) == chosen
    if refused is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.reason == refused[0]
        assert refused[1] in refusal.message, refusal.message


# -- defaults and limits ---------------------------------------------------------------------

POOL = {
    "resources": {"gpus": 2, "cpu": 8, "memory": "64Gi", "gpuResourceName": "amd.com/gpu"},
    "limits": {"gpus": 4, "nodes": 2, "totalGpus": 6, "cpu": "16", "memory": "128Gi"},
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "batch",
    "queueName": "a100",
    "image": "registry.example.com/kubetune/trainer:pool",
    "allowedServiceAccounts": ["trainer"],
    "allowedOutputPrefixes": ["s3://models/team-a/"],
}
OUT = {"uri": "s3://models/team-a/run"}


# fmt: off
VIOLATIONS = [
    pytest.param({"resources": {"gpus": 8}}, "spec.resources.gpus: 8 is more than FineTuneProfile 'pool' allows (limits.gpus: 4)", id="gpus-over"),
    pytest.param({"resources": {"gpus": 2, "nodes": 3}, "hyperparameters": {"batchSize": 12}}, "spec.resources.nodes: 3 is more than FineTuneProfile 'pool' allows (limits.nodes: 2)", id="nodes-over"),
    pytest.param({"resources": {"gpus": 4, "nodes": 2}}, "spec.resources: 8 GPUs in all is more than FineTuneProfile 'pool' allows (limits.totalGpus: 6)", id="total-gpus-over"),
    pytest.param({"resources": {"memory": "129Gi"}}, "spec.resources.memory: 129Gi is more than FineTuneProfile 'pool' allows (limits.memory: 128Gi)", id="memory-over"),
    pytest.param({"resources": {"cpu": "16001m"}}, "spec.resources.cpu: 16001m is more than", id="cpu-over-in-millicores"),
    pytest.param({"resources": {"nodeSelector": {"pool": "t4"}}}, "spec.resources.nodeSelector.pool: FineTuneProfile 'pool' places its pods on pool=a100", id="node-selector-changed"),
    pytest.param({"resources": {"priorityClassName": "urgent"}}, "spec.resources.priorityClassName: FineTuneProfile 'pool' runs at batch", id="priority-changed"),
    pytest.param({"serviceAccountName": "admin"}, "spec.serviceAccountName: 'admin' is not one FineTuneProfile 'pool' allows (allowedServiceAccounts: trainer)", id="account-not-allowed"),
    pytest.param({"output": {"uri": "s3://models/team-b/run"}}, "spec.output.uri: s3://models/team-b/run is outside what FineTuneProfile 'pool' allows (allowedOutputPrefixes: s3://models/team-a/)", id="output-elsewhere"),
    pytest.param({"output": {"uri": "s3://models/team-a-evil/run"}}, "spec.output.uri", id="output-prefix-is-a-path-not-a-string"),
    pytest.param({"hyperparameters": {"batchSize": 3}}, "spec.hyperparameters.batchSize: batchSize is global: it must be a multiple of microBatchSize times the world size (resources.nodes times the processes per pod: resources.gpus, or distributed.nprocPerNode) (here: batchSize 3, microBatchSize unset (each process takes batchSize / world size), world size 2) (with the defaults of FineTuneProfile 'pool')", id="batch-the-default-gpus-cannot-share"),
]
# fmt: on


@pytest.mark.parametrize(("gates", "refused"), [(0, True), (1, False), (2, False)])
def test_a_profile_can_require_gates(gates: int, refused: bool) -> None:
    """A job without gates is promoted whatever its evaluation says; minGates: 1 refuses it."""
    wanted = [{"metric": "exactMatch", "min": 0.5}, {"metric": "loss", "max": 5.0}][:gates]
    resolution = apply_profile(job(output=OUT, gates=wanted), profile(minGates=1))
    if not refused:
        assert resolution.refusal is None, resolution.refusal
        return
    assert resolution.refusal is not None and resolution.refusal.reason == "PolicyViolation"
    assert resolution.refusal.message == (
        "spec.gates: 0 gate(s) is fewer than FineTuneProfile 'pool' allows (minGates: 1); add a "
        "gate, e.g. {metric: exactMatch, min: 0.5}, that the tuned model must pass to be promoted"
    )
    # without the field, as before: no gate is required
    assert apply_profile(job(output=OUT, gates=wanted), profile()).refusal is None


def test_a_cpu_only_profile_refuses_a_job_that_leaves_its_gpus_unset() -> None:
    """Neither the job nor the profile sets resources.gpus: the pod gets one GPU, which a
    profile with limits.gpus 0 does not allow (a CPU pool lent no GPU by omission)."""
    resolution = apply_profile(job(output=OUT), profile(limits={"gpus": 0}))
    assert resolution.refusal is not None and resolution.refusal.reason == "PolicyViolation"
    assert "spec.resources.gpus: 1 is more than FineTuneProfile 'pool' allows (limits.gpus: 0)" in (
        resolution.refusal.message
    )


def test_a_profile_default_of_no_gpus_counts_as_none() -> None:
    """A profile whose default is 0 GPUs: a job that leaves gpus unset asks for 0 GPUs in all,
    which limits.totalGpus 0 allows (not 1 for the default 0)."""
    resolution = apply_profile(
        job(output=OUT), profile(resources={"gpus": 0}, limits={"gpus": 0, "totalGpus": 0})
    )
    assert resolution.refusal is None, resolution.refusal


@pytest.mark.parametrize(("spec", "violation"), VIOLATIONS)
def test_a_job_outside_the_profiles_limits_is_a_policy_violation(
    spec: dict[str, Any], violation: str
) -> None:
    fields = {"output": OUT, **spec}
    resolution = apply_profile(job(**fields), profile(**POOL))
    assert resolution.refusal is not None and resolution.refusal.reason == "PolicyViolation"
    assert violation in resolution.refusal.message, resolution.refusal.message


# A shared bucket: each namespace writes under its own name; inputs from its own data prefix.
SHARED = {
    "allowedOutputPrefixes": ["s3://ml-models/{namespace}/"],
    "allowedInputPrefixes": ["s3://datasets/{namespace}/", "s3://base-models/"],
    "modelCache": {"uri": "s3://ml-models/cache/"},
}
DATA = {"uri": "s3://datasets/team-a/train.jsonl"}


# fmt: off
STORAGE = [
    pytest.param({}, None, id="all-in-bounds"),
    pytest.param({"output": {"uri": "s3://ml-models/team-b/run"}}, "spec.output.uri: s3://ml-models/team-b/run is outside what FineTuneProfile 'pool' allows (allowedOutputPrefixes: s3://ml-models/team-a/)", id="another-namespaces-output"),
    pytest.param({"output": {"uri": "s3://ml-models/cache/team-a"}}, "spec.output.uri: s3://ml-models/cache/team-a lies in the model cache of FineTuneProfile 'pool' (s3://ml-models/cache/)", id="output-in-the-cache"),
    pytest.param({"dataset": {"uri": "s3://datasets/team-b/train.jsonl"}}, "spec.dataset.uri: s3://datasets/team-b/train.jsonl is outside what FineTuneProfile 'pool' allows (allowedInputPrefixes: s3://datasets/team-a/, s3://base-models/)", id="another-namespaces-data"),
    pytest.param({"dataset": {**DATA, "testUri": "s3://secret/test.jsonl"}}, "spec.dataset.testUri: s3://secret/test.jsonl is outside", id="test-set-elsewhere"),
    pytest.param({"dataset": {**DATA, "validationUri": "file:///etc/shadow.csv"}}, "spec.dataset.validationUri: file:///etc/shadow.csv is outside", id="a-local-file"),
    pytest.param({"evaluation": {**valid_job()["spec"]["evaluation"], "regressionUri": "s3://other/r.jsonl"}}, "spec.evaluation.regressionUri: s3://other/r.jsonl is outside", id="regression-set-elsewhere"),
    pytest.param({"model": {"uri": "s3://team-b-models/llama"}}, "spec.model.uri: s3://team-b-models/llama is outside", id="a-model-elsewhere"),
    pytest.param({"model": {"uri": "s3://base-models/llama"}}, None, id="a-shared-base-model"),
    pytest.param({"dataset": {"uri": "s3://ml-models/team-a/data.jsonl"}}, None, id="reading-its-own-outputs"),
]
# fmt: on


@pytest.mark.parametrize(("spec", "violation"), STORAGE)
def test_a_profile_bounds_where_a_job_reads_and_writes_per_namespace(
    spec: dict[str, Any], violation: str | None
) -> None:
    """Issue 25, finding 6: with one prefix for all, team A could overwrite team B's
    latest.json with the profile's identity, and read any input."""
    fields = {"output": {"uri": "s3://ml-models/team-a/run"}, "dataset": DATA, **spec}
    resolution = apply_profile(job(**fields), profile(**SHARED))
    if violation is None:
        assert resolution.refusal is None, resolution.refusal
    else:
        assert resolution.refusal is not None and resolution.refusal.reason == "PolicyViolation"
        assert violation in resolution.refusal.message, resolution.refusal.message


def test_the_profiles_defaults_fill_what_the_job_leaves_unset() -> None:
    resolution = apply_profile(job(output=OUT), profile(**POOL))
    assert resolution.refusal is None
    spec = resolution.job.spec
    res = spec.resources
    assert (res.gpus, res.cpu, res.memory, res.gpu_resource_name) == (2, "8", "64Gi", "amd.com/gpu")
    assert res.node_selector == {"pool": "a100"} and res.priority_class_name == "batch"
    assert [t.key for t in res.tolerations] == ["gpu"]
    assert (spec.queue_name, spec.image) == ("a100", POOL["image"])
    assert spec.world_size() == 2  # the profile's GPUs, one process each
    assert resolution.template.profile == ProfileRef(name="pool", generation=1)
    assert resolution.allowed_images == (POOL["image"],)


def test_what_the_job_sets_within_the_limits_wins() -> None:
    own = {
        "resources": {
            "gpus": 4,
            "memory": "128Gi",
            "nodeSelector": {"zone": "b"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
        },
        "queueName": "team-a",
        "serviceAccountName": "trainer",
        "output": OUT,
    }
    resolution = apply_profile(job(**own), profile(**POOL))
    assert resolution.refusal is None
    spec = resolution.job.spec
    assert (spec.resources.gpus, spec.resources.memory, spec.resources.cpu) == (4, "128Gi", "8")
    assert spec.resources.node_selector == {"pool": "a100", "zone": "b"}
    assert [t.key for t in spec.resources.tolerations] == ["gpu", "spot"]
    assert (spec.queue_name, spec.service_account_name) == ("team-a", "trainer")


def test_without_a_profile_the_job_is_as_written_and_may_not_choose_an_account() -> None:
    plain = job()
    resolution = apply_profile(plain, None)
    assert resolution.job is plain and resolution.refusal is None
    assert resolution.template.profile is None
    refused = apply_profile(job(serviceAccountName="admin"), None).refusal
    assert refused is not None and refused.message.startswith(
        "spec.serviceAccountName: 'admin' may be chosen only under a FineTuneProfile"
    )


def test_an_image_is_allowed_by_the_operator_or_the_profile() -> None:
    settings = SETTINGS.model_copy(update={"allowed_images": ["registry.example.com/global:1"]})
    pool = profile(**{**POOL, "allowedImages": ["registry.example.com/team:2"]})
    for image, allowed in [
        (None, True),  # the profile's own image
        ("registry.example.com/team:2", True),
        ("registry.example.com/global:1", True),
        (SETTINGS.trainer_image, True),
        ("docker.io/someone/trainer:latest", False),
    ]:
        resolution = apply_profile(job(output=OUT, image=image), pool)
        problems = policy_problems(resolution.job, settings, resolution.allowed_images)
        assert (problems == []) == allowed, (image, problems)


# -- the built pod ---------------------------------------------------------------------------


def _example_run() -> tuple[FineTuneJob, Any]:
    doc = yaml.load((ROOT / "examples" / "lora-on-a100-pool.yaml").read_text(), Loader=Loader)
    doc["metadata"].update(namespace="team-nlp", uid="uid-pool", generation=1)
    pool = FineTuneProfile.model_validate(
        {**yaml.load(EXAMPLE.read_text(), Loader=Loader), "metadata": {"name": "a100-pool",
                                                                       "generation": 3}},
        by_name=False,
    )  # fmt: skip
    resolution = apply_profile(FineTuneJob.model_validate(doc, by_name=False), pool)
    assert resolution.refusal is None, resolution.refusal
    return resolution.job, resolution.template


def test_the_pod_gets_the_profiles_account_secrets_volumes_and_placement() -> None:
    import kubernetes_validate

    resolved, template = _example_run()
    built = build_job(resolved, "0123abcd", SETTINGS, template)
    kubernetes_validate.validate(built, "1.32.0", strict=True)
    pod = built["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # A chosen ServiceAccount and its token (a cloud identity needs it); none without one.
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("fine-tuning", True)
    plain = build_job(job(), "0123abcd", SETTINGS, NO_PROFILE)["spec"]["template"]["spec"]
    assert "serviceAccountName" not in plain and plain["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert pod["affinity"]["nodeAffinity"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
    assert pod["priorityClassName"] == "batch-training"
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "model-cache",
                                                              "readOnly": False}} in pod["volumes"]  # fmt: skip
    assert {"name": "model-cache", "mountPath": "/models", "readOnly": False} in container[
        "volumeMounts"
    ]
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    assert built["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "a100"
    assert built["metadata"]["labels"]["kubetune.dev/profile"] == "a100-pool"


def test_the_run_is_pinned_to_the_profile_it_started_with() -> None:
    resolved, template = _example_run()
    configmap = build_configmap(resolved, "0123abcd", SETTINGS, template)
    config = yaml.safe_load(configmap["data"]["config.json"])
    assert config["modelCache"] == {"path": "/models/cache"}
    pinned = pinned_profile(configmap)
    assert pinned is not None
    assert (pinned.metadata.name, pinned.metadata.generation) == ("a100-pool", 3)
    original = FineTuneProfile.model_validate(yaml.load(EXAMPLE.read_text(), Loader=Loader))
    assert pinned.spec == original.spec
    # Resolved again against the pinned profile: the same pod, whatever the live profile says.
    again = apply_profile(FineTuneJob.model_validate(_job_doc()), pinned)
    assert build_job(again.job, "0123abcd", SETTINGS, again.template) == build_job(
        resolved, "0123abcd", SETTINGS, template
    )
    plain = build_configmap(job(), "0123abcd", SETTINGS, NO_PROFILE)
    assert pinned_profile(plain) is None


def _job_doc() -> dict[str, Any]:
    doc = yaml.load((ROOT / "examples" / "lora-on-a100-pool.yaml").read_text(), Loader=Loader)
    doc["metadata"].update(namespace="team-nlp", uid="uid-pool", generation=1)
    return copy.deepcopy(doc)


def test_the_run_keeps_the_hash_of_the_jobs_own_spec() -> None:
    """The profile's defaults are not the job's spec: a profile change never makes a new run,
    and the run is found again by the hash of what the user wrote."""
    from kubetune.api.wire import SPEC_HASH_ANNOTATION
    from kubetune.controller.build import spec_hash

    resolved, template = _example_run()
    written = FineTuneJob.model_validate(_job_doc())
    built = build_job(resolved, "0123abcd", SETTINGS, template)
    assert built["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(written)
    assert spec_hash(resolved) != spec_hash(written)


def test_the_jobs_token_secret_replaces_the_profiles_hf_token() -> None:
    resolved, template = _example_run()  # the profile gives HF_TOKEN from Secret hf-token
    mine = resolved.model_copy(
        update={
            "spec": resolved.spec.model_copy(
                update={
                    "model": resolved.spec.model.model_copy(
                        update={"token_secret": TokenSecret(name="my-token", key="token")}
                    )
                }
            )
        }
    )
    for built, secret in ((resolved, "hf-token"), (mine, "my-token")):
        (container,) = build_job(built, "0123abcd", SETTINGS, template)["spec"]["template"]["spec"][
            "containers"
        ]
        tokens = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
        assert len(tokens) == 1 and tokens[0]["valueFrom"]["secretKeyRef"]["name"] == secret


def test_a_model_cache_in_object_storage_brings_its_own_secret() -> None:
    pool = profile(
        modelCache={"uri": "s3://platform-cache/models", "credentialsSecret": "cache-store"}
    )
    resolution = apply_profile(
        job(output={"uri": "s3://models/x", "credentialsSecret": "s3"}), pool
    )
    (container,) = build_job(resolution.job, "0123abcd", SETTINGS, resolution.template)["spec"][
        "template"
    ]["spec"]["containers"]
    assert container["envFrom"] == [
        {"secretRef": {"name": "s3"}, "prefix": "KUBETUNE_OUTPUT_"},
        {"secretRef": {"name": "cache-store"}, "prefix": "KUBETUNE_CACHE_"},
    ]
    config = yaml.safe_load(
        build_configmap(resolution.job, "0123abcd", SETTINGS, resolution.template)["data"][
            "config.json"
        ]
    )
    assert config["modelCache"] == {
        "uri": "s3://platform-cache/models",
        "credentialsSecret": "cache-store",
    }
    routes = credential_routes(resolution.job.spec, resolution.template.model_cache)
    assert ("s3://platform-cache/models", "KUBETUNE_CACHE_") in routes
    assert ("s3://models/x", "KUBETUNE_OUTPUT_") in routes


def test_the_profiles_pod_labels_and_annotations_reach_the_pods_not_the_job() -> None:
    pool = profile(
        podLabels={"azure.workload.identity/use": "true"},
        podAnnotations={"sidecar.istio.io/inject": "false"},
    )
    resolution = apply_profile(job(), pool)
    built = build_job(resolution.job, "0123abcd", SETTINGS, resolution.template)
    meta = built["spec"]["template"]["metadata"]
    assert meta["labels"]["azure.workload.identity/use"] == "true"
    assert meta["labels"]["kubetune.dev/profile"] == "pool"
    assert meta["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert "azure.workload.identity/use" not in built["metadata"]["labels"]


def test_pull_secrets_come_from_the_chart_and_the_profile() -> None:
    settings = SETTINGS.model_copy(update={"trainer_image_pull_secrets": ["platform-registry"]})
    resolution = apply_profile(
        job(), profile(imagePullSecrets=["team-registry", "platform-registry"])
    )
    pod = build_job(resolution.job, "0123abcd", settings, resolution.template)["spec"]["template"][
        "spec"
    ]
    assert pod["imagePullSecrets"] == [{"name": "platform-registry"}, {"name": "team-registry"}]
    plain = build_job(job(), "0123abcd", SETTINGS, NO_PROFILE)["spec"]["template"]["spec"]
    assert "imagePullSecrets" not in plain


# -- admission: profile and policy in one answer -----------------------------------------------


def test_admit_merges_the_profiles_and_the_policys_refusals_into_one() -> None:
    from kubetune.admission import admit

    limited = profile(default=True, limits={"gpus": 1})
    wanting = job(resources={"gpus": 2}, image="evil.example.com/miner:1")
    admitted = admit(wanting, [limited], {}, SETTINGS)
    assert admitted.refusal is not None and admitted.refusal.reason == "PolicyViolation"
    lines = admitted.refusal.message.split("; ")
    assert any(line.startswith("spec.resources.gpus: 2") for line in lines)  # the profile's
    assert any(line.startswith("spec.image:") for line in lines)  # the cluster's
    assert admitted.profile_problems and admitted.policy_problems


def test_admit_keeps_a_missing_profile_apart_from_policy_problems() -> None:
    from kubetune.admission import admit

    admitted = admit(job(profile="gone", image="evil.example.com/miner:1"), [], {}, SETTINGS)
    assert admitted.refusal is not None and admitted.refusal.reason == "ProfileNotFound"
    assert "spec.image" not in admitted.refusal.message
    assert admitted.policy_problems  # still known, for the log of a run that had started


def test_admit_fails_closed_on_an_unreadable_default_profile() -> None:
    from kubetune.admission import admit

    admitted = admit(job(), [], {}, SETTINGS, unreadable={"broken": True})
    assert admitted.refusal is not None and admitted.refusal.reason == "ProfileUnreadable"
    assert admit(job(), [], {}, SETTINGS).refusal is None
