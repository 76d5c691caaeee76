"""A tenant with `edit` in its namespace writes ConfigMaps, Jobs and Pods there, with any labels,
annotations and owner references; it cannot write a FineTuneJob's status. So the operator counts
a child only when the FineTuneJob controls it, and trusts a run's ConfigMap (the trainer's
config and the profile the run is pinned to) only when its contents are the ones it wrote:
status.configHash. Each case is an escape a review found or a variation of it (issue 25,
finding 2): a forged ConfigMap that named its own profile made the operator build a Job with any
image, ServiceAccount and volume while the status still named the real profile."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune.api import FineTuneJob, FineTuneProfile
from kubetune.api.wire import CONFIG_FILE, JOB_LABEL, RUN_LABEL, SPEC_HASH_ANNOTATION
from kubetune.controller.build import PROFILE_FILE, data_hash, spec_hash
from tests.controller.test_reconcile import FakeKube, ftj, run

EVIL = {
    "serviceAccountName": "cluster-admin",
    "image": "evil.example.com/miner:latest",
    "allowedImages": ["evil.example.com/miner:latest"],
    "volumes": [{"name": "loot", "nfs": {"server": "10.0.0.9", "path": "/"}}],
    "volumeMounts": [{"name": "loot", "mountPath": "/loot"}],
    "limits": {"gpus": 8},
}


def _pool() -> FineTuneProfile:
    return FineTuneProfile.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneProfile",
            "metadata": {"name": "pool", "generation": 2},
            "spec": {"default": True, "serviceAccountName": "trainer", "limits": {"gpus": 1}},
        },
        by_name=False,
    )


def _kube() -> FakeKube:
    kube = FakeKube(ftj())
    kube.profile_objects = [_pool()]
    return kube


def _run_id_and_hash(kube: FakeKube) -> tuple[str, str]:
    from kubetune.api import make_run_id

    job = FineTuneJob.model_validate(kube.ftj, by_name=False)
    return make_run_id("uid-1", 1), spec_hash(job)


def _forged_configmap(kube: FakeKube, owner: bool = True) -> dict[str, Any]:
    run_id, hashed = _run_id_and_hash(kube)
    name = f"sql-lora-{run_id}"
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "labels": {
            "app.kubernetes.io/managed-by": "kubetune-operator",
            JOB_LABEL: "sql-lora",
            RUN_LABEL: run_id,
        },
        "annotations": {SPEC_HASH_ANNOTATION: hashed, "kubetune.dev/profile": "pool@2"},
    }
    if owner:  # anyone who can read the FineTuneJob knows its uid
        meta["ownerReferences"] = [
            {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "sql-lora",
             "uid": "uid-1", "controller": True}
        ]  # fmt: skip
    forged = {"name": "pool", "generation": 2, "spec": EVIL}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {
            CONFIG_FILE: json.dumps({"forged": True}),
            PROFILE_FILE: json.dumps(forged),
        },
    }


def _pod_spec(kube: FakeKube) -> dict[str, Any]:
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    return kube.objects["Job", name]["spec"]["template"]["spec"]


def _assert_built_under_the_real_profile(kube: FakeKube) -> None:
    pod = _pod_spec(kube)
    assert pod["serviceAccountName"] == "trainer"
    assert "evil" not in json.dumps(pod)
    assert all("nfs" not in v for v in pod.get("volumes", []))
    cms = [o for (k, _), o in kube.objects.items() if k == "ConfigMap"]
    assert len(cms) == 1 and "forged" not in cms[0]["data"][CONFIG_FILE]
    assert kube.ftj["status"]["configHash"] == data_hash(cms[0])
    assert kube.ftj["status"]["profile"] == {"name": "pool", "generation": 2}


@pytest.mark.parametrize(
    "owner",
    [
        pytest.param(True, id="with-a-forged-controller-reference"),
        pytest.param(False, id="labels-only"),
    ],
)
def test_a_configmap_written_before_the_run_neither_pins_its_profile_nor_is_mounted(
    owner: bool,
) -> None:
    kube = _kube()
    forged = _forged_configmap(kube, owner)
    kube.objects["ConfigMap", forged["metadata"]["name"]] = copy.deepcopy(forged)
    writes = run(kube)
    if owner:  # it claims to be the run's: replaced by the operator's own
        assert ("delete", "ConfigMap", forged["metadata"]["name"]) in writes
        assert ("create", "ConfigMap", forged["metadata"]["name"]) in writes
        _assert_built_under_the_real_profile(kube)
    else:  # not a child at all: not trusted, not deleted (the API server's 409 keeps it)
        assert ("delete", "ConfigMap", forged["metadata"]["name"]) not in writes
        assert "cluster-admin" not in json.dumps(_pod_spec(kube))


def test_a_configmap_replaced_during_the_run_is_replaced_again() -> None:
    kube = _kube()
    run(kube)
    _assert_built_under_the_real_profile(kube)
    # The tenant deletes the immutable ConfigMap and writes its own under the same name, with
    # the operator's labels and owner reference; a restarted pod would mount it.
    forged = _forged_configmap(kube)
    kube.objects["ConfigMap", forged["metadata"]["name"]] = copy.deepcopy(forged)
    writes = run(kube)
    assert ("delete", "ConfigMap", forged["metadata"]["name"]) in writes
    assert ("create", "ConfigMap", forged["metadata"]["name"]) in writes
    _assert_built_under_the_real_profile(kube)
    assert run(kube) == []  # the operator's own ConfigMap again: nothing more to do


def test_the_pin_holds_against_a_changed_profile_only_through_the_operators_configmap() -> None:
    kube = _kube()
    run(kube)
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    del kube.objects["Job", name]  # e.g. Kueue took the Job back; the run's ConfigMap stays
    changed = _pool().model_copy(deep=True)
    changed.spec.service_account_name = "another"
    changed.metadata.generation = 3
    kube.profile_objects = [changed]
    run(kube)
    assert _pod_spec(kube)["serviceAccountName"] == "trainer"  # generation 2, as pinned


def test_pods_count_only_under_the_runs_own_job() -> None:
    kube = _kube()
    run(kube)
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    labels = kube.objects["Job", name]["spec"]["template"]["metadata"]["labels"]
    # A tenant's pod with the run's labels, not created by the run's Job, claims success.
    kube.objects["Pod", "fake"] = {
        "metadata": {
            "name": "fake",
            "labels": labels,
            "ownerReferences": [{"kind": "Job", "uid": "uid-of-another-job", "controller": True}],
        },
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 0,
                            "message": '{"runId": "x", "outcome": "Succeeded", "exitCode": 0}',
                        }
                    },
                }
            ],
        },
    }
    run(kube)
    assert kube.ftj["status"]["phase"] == "Pending"
    assert kube.ftj["status"].get("attempts", 0) == 0


def test_a_finished_runs_configmap_is_left_as_it_is() -> None:
    """No pod mounts a finished run's ConfigMap again, and it names the run (after an upgrade,
    one from before status.configHash has contents the operator no longer writes)."""
    kube = _kube()
    run(kube)
    ((_, name),) = [k for k in kube.objects if k[0] == "Job"]
    kube.objects["Job", name]["status"] = {
        "conditions": [
            {"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-22T13:00:00Z"}
        ]
    }
    run(kube)
    assert kube.ftj["status"]["phase"] == "Succeeded"
    del kube.ftj["status"]["configHash"]  # written by an older operator
    old = kube.objects["ConfigMap", name]
    old["data"] = {CONFIG_FILE: '{"an": "older shape"}'}
    writes = run(kube)
    assert ("delete", "ConfigMap", name) not in writes
    assert kube.ftj["status"]["phase"] == "Succeeded"
