"""Pure builders of a run's children: the ConfigMap with the resolved trainer config and the
batch/v1 Job that runs the trainer. Same input, same manifest; no I/O, no environment."""

from __future__ import annotations

import hashlib
from typing import Any

from kubetune.api import (
    API_VERSION,
    KIND,
    PERMANENT_EXIT_CODES,
    FineTuneJob,
    TrainerConfig,
    child_name,
)
from kubetune.controller.settings import OperatorSettings

CONTAINER = "trainer"
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "config.json"
WORK_DIR = "/work"
TERMINATION_LOG = "/dev/termination-log"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RUN_LABEL = "kubetune.dev/run-id"
JOB_LABEL = "kubetune.dev/finetunejob"
MANAGED_BY = "kubetune-operator"  # app.kubernetes.io/managed-by of every child
SPEC_HASH_ANNOTATION = "kubetune.dev/spec-hash"
RUN_AS = 1000


def spec_hash(job: FineTuneJob) -> str:
    """What defines a run: the spec without `suspend` (pausing a run does not make a new one).
    Unset optional fields are left out, so that a release adding one does not change the hash
    of every existing spec (which would start a new run of each finished job)."""
    text = job.spec.model_dump_json(by_alias=True, exclude={"suspend"}, exclude_none=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def labels(job: FineTuneJob, run_id: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_LABEL: job.metadata.name,
        RUN_LABEL: run_id,
    }


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    if not job.metadata.uid:
        raise ValueError(
            "the FineTuneJob has no uid yet; children need one for their owner reference"
        )
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    job: FineTuneJob, run_id: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every child carries the run's spec hash, so the run survives its Job (observe.py)."""
    return {
        "name": child_name(job.metadata.name, run_id),
        "namespace": job.metadata.namespace,
        "labels": {**labels(job, run_id), **(extra_labels or {})},
        "annotations": {SPEC_HASH_ANNOTATION: spec_hash(job)},
        "ownerReferences": [owner_reference(job)],
    }


def trainer_config(job: FineTuneJob, run_id: str, settings: OperatorSettings) -> TrainerConfig:
    return TrainerConfig.for_job(
        job,
        run_id,
        metrics_port=settings.trainer_metrics_port,
        termination_message_path=TERMINATION_LOG,
    )


def build_configmap(job: FineTuneJob, run_id: str, settings: OperatorSettings) -> dict[str, Any]:
    """The resolved trainer config; it names the credentials Secret but never holds a credential."""
    config = trainer_config(job, run_id, settings)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, run_id),
        "data": {CONFIG_FILE: config.model_dump_json(indent=2, exclude_none=True)},
        "immutable": True,
    }


def _resources(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    res = job.spec.resources
    amounts: dict[str, str] = {}
    cpu = res.cpu or settings.default_cpu
    memory = res.memory or settings.default_memory
    if cpu:
        amounts["cpu"] = cpu
    if memory:
        amounts["memory"] = memory
    out: dict[str, Any] = {}
    if amounts:
        out["requests"] = dict(amounts)
    limits = {k: v for k, v in amounts.items() if k == "memory"}  # CPU limits only throttle
    if res.gpus:
        limits[res.gpu_resource_name] = str(res.gpus)
    if limits:
        out["limits"] = limits
    return out


def _container(job: FineTuneJob, settings: OperatorSettings) -> dict[str, Any]:
    spec = job.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": ["python", "-m", "kubetune_trainer", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": [
            {"name": "KUBETUNE_WORKDIR", "value": WORK_DIR},
            {"name": "HOME", "value": f"{WORK_DIR}/home"},
            {"name": "HF_HOME", "value": f"{WORK_DIR}/huggingface"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [
            {"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}
        ],
        "resources": _resources(job, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "work", "mountPath": WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # Only Secrets in the job's own namespace can be named: the fields have no namespace. Where
    # two Secrets set the same key the last one wins (spec.secrets() puts storage last).
    if secrets := spec.secrets():
        container["envFrom"] = [{"secretRef": {"name": name}} for name, _ in secrets]
    return container


def build_job(job: FineTuneJob, run_id: str, settings: OperatorSettings) -> dict[str, Any]:
    """The batch/v1 Job of one run (one pod, never restarted in place)."""
    spec = job.spec
    queue = {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    pod_labels = labels(job, run_id)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, settings)],
        "volumes": [
            {"name": "config", "configMap": {"name": child_name(job.metadata.name, run_id)}},
            {"name": "work", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        # Kueue admits a queued Job by unsuspending it.
        "suspend": spec.suspend or bool(spec.queue_name),
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": list(PERMANENT_EXIT_CODES),
                    },
                },
                # Preemption and node drains do not count against backoffLimit; the run resumes.
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
        "template": {"metadata": {"labels": {**pod_labels, **queue}}, "spec": pod_spec},
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    metadata = _metadata(job, run_id, queue)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": job_spec,
    }
