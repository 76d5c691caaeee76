"""Pure builders of a run's children: the ConfigMap with the resolved trainer config, the
batch/v1 Job that runs the trainer and, for a run of several pods, the headless Service through
which they meet. Same input, same manifest; no I/O, no environment.

A distributed run (resources.nodes pods, one process per GPU) is an Indexed Job: completions =
parallelism = nodes, pod i is node rank i (its completion index) and is reachable as
`<job>-<i>.<service>` (an Indexed Job's pods get the hostname `<job>-<index>`; the Service,
headless and publishing pods before they are ready, gives them DNS names under the pod's
subdomain). Each pod runs the trainer's launcher (torch's elastic agent) with torchrun's
environment (PET_*), as Kubeflow Trainer's torch runtime sets it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubetune.admission.template import NO_PROFILE, PROFILE_FILE, RunTemplate
from kubetune.api import (
    API_VERSION,
    CREDENTIAL_ENV,
    KIND,
    PERMANENT_EXIT_CODES,
    FineTuneJob,
    TrainerConfig,
    child_name,
    spec_hash,
)
from kubetune.api.wire import (
    COMPLETION_INDEX,
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    CONTAINER,
    JOB_LABEL,
    MANAGED_BY,
    POD_WORK_DIR,
    PROFILE_ANNOTATION,
    PROFILE_LABEL,
    RENDEZVOUS_PORT,
    RUN_LABEL,
    SPEC_HASH_ANNOTATION,
    TERMINATION_LOG,
    Env,
)
from kubetune.controller.settings import OperatorSettings

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
RUN_AS = 1000
HF_TOKEN = "HF_TOKEN"  # what huggingface_hub reads


def labels(job: FineTuneJob, run_id: str, template: RunTemplate = NO_PROFILE) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job.metadata.name,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        JOB_LABEL: job.metadata.name,
        RUN_LABEL: run_id,
    }
    if template.profile is not None:
        out[PROFILE_LABEL] = template.profile.name
    return out


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
    job: FineTuneJob,
    run_id: str,
    template: RunTemplate,
    extra_labels: dict[str, str] | None = None,
    extra_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every child carries the run's spec hash (of the job's own spec, not the profile's
    defaults), so the run survives its Job (observe.py)."""
    return {
        "name": child_name(job.metadata.name, run_id),
        "namespace": job.metadata.namespace,
        "labels": {**labels(job, run_id, template), **(extra_labels or {})},
        "annotations": {
            SPEC_HASH_ANNOTATION: template.spec_hash or spec_hash(job),
            **(extra_annotations or {}),
        },
        "ownerReferences": [owner_reference(job)],
    }


def trainer_config(
    job: FineTuneJob, run_id: str, settings: OperatorSettings, template: RunTemplate = NO_PROFILE
) -> TrainerConfig:
    return TrainerConfig.for_job(
        job,
        run_id,
        metrics_port=settings.trainer_metrics_port,
        termination_message_path=TERMINATION_LOG,
        model_cache=template.model_cache,
        pricing=template.pricing,
        spec_hash=template.spec_hash or spec_hash(job),
    )


def build_configmap(
    job: FineTuneJob, run_id: str, settings: OperatorSettings, template: RunTemplate = NO_PROFILE
) -> dict[str, Any]:
    """The resolved trainer config; it names the credentials Secret but never holds a credential.
    It records the profile the run was resolved against (name@generation and its spec)."""
    config = trainer_config(job, run_id, settings, template)
    data = {CONFIG_FILE: config.model_dump_json(indent=2, exclude_none=True)}
    pinned = {}
    if template.profile is not None and template.profile_spec is not None:
        pinned = {PROFILE_ANNOTATION: f"{template.profile.name}@{template.profile.generation}"}
        data[PROFILE_FILE] = json.dumps(
            {
                "name": template.profile.name,
                "generation": template.profile.generation,
                "spec": json.loads(template.profile_spec),
            },
            sort_keys=True,
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, run_id, template, extra_annotations=pinned),
        "data": data,
        "immutable": True,
    }


def data_hash(obj: dict[str, Any]) -> str:
    """sha256 of a ConfigMap's contents (data and binaryData: every key becomes a file in the
    trainer's config volume), the same for the object built and the object read back."""
    contents = {"data": obj.get("data") or {}, "binaryData": obj.get("binaryData") or {}}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


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
    if gpus := res.gpus_per_pod():
        limits[res.gpu_resource()] = str(gpus)
    if limits:
        out["limits"] = limits
    return out


def distributed(job: FineTuneJob) -> bool:
    """Whether the run has more than one trainer process (the launcher starts them)."""
    return job.spec.world_size() > 1


def service_name(job: FineTuneJob, run_id: str) -> str:
    return child_name(job.metadata.name, run_id)


def _launch_env(job: FineTuneJob, run_id: str) -> list[dict[str, Any]]:
    """torchrun's environment: pods, processes per pod, this pod's rank, rank 0's address."""
    spec = job.spec
    env: list[dict[str, Any]] = [
        {"name": Env.NNODES.value, "value": str(spec.nodes())},
        {"name": Env.NPROC_PER_NODE.value, "value": str(spec.procs_per_node())},
    ]
    if spec.nodes() > 1:
        name = child_name(job.metadata.name, run_id)
        host = f"{name}-0.{service_name(job, run_id)}.{job.metadata.namespace}.svc"
        index = f"metadata.annotations['{COMPLETION_INDEX}']"
        env += [
            {"name": Env.NODE_RANK.value, "valueFrom": {"fieldRef": {"fieldPath": index}}},
            {"name": Env.MASTER_ADDR.value, "value": host},
            {"name": Env.MASTER_PORT.value, "value": str(RENDEZVOUS_PORT)},
        ]
    return env


def _extra_env(job: FineTuneJob, template: RunTemplate) -> list[dict[str, Any]]:
    """The profile's env, then HF_TOKEN from spec.model.tokenSecret (which replaces a profile's
    HF_TOKEN: the job names the token it needs)."""
    token = job.spec.model.token_secret
    env = [e for e in template.env if not (token and e["name"] == HF_TOKEN)]
    if token:
        ref = {"name": token.name, "key": token.key}
        env.append({"name": HF_TOKEN, "valueFrom": {"secretKeyRef": ref}})
    return env


def _container(
    job: FineTuneJob, run_id: str, settings: OperatorSettings, template: RunTemplate
) -> dict[str, Any]:
    spec = job.spec
    module = "kubetune_trainer.launch" if distributed(job) else "kubetune_trainer"
    ports = [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}]
    if spec.nodes() > 1:
        ports.append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": ["python", "-m", module, CONFIG_PATH],
        "env": [
            {"name": Env.WORKDIR.value, "value": POD_WORK_DIR},
            {"name": "HOME", "value": f"{POD_WORK_DIR}/home"},
            {"name": "HF_HOME", "value": f"{POD_WORK_DIR}/huggingface"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *(_launch_env(job, run_id) if distributed(job) else []),
            *_extra_env(job, template),
        ],
        "ports": ports,
        "resources": _resources(job, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "work", "mountPath": POD_WORK_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
            *template.volume_mounts,
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # Only Secrets in the job's own namespace can be named: the fields have no namespace. Each
    # storage source's keys come under its own prefix (KUBETUNE_MODEL_AWS_ACCESS_KEY_ID, ...), so
    # that the trainer uses them for that source only (api.credential_routes).
    if env_from := [
        {"secretRef": {"name": name}, **({"prefix": prefix} if prefix else {})}
        for name, _, prefix in secret_sources(job, template)
    ]:
        container["envFrom"] = env_from
    return container


def secret_sources(
    job: FineTuneJob, template: RunTemplate = NO_PROFILE
) -> list[tuple[str, str, str | None]]:
    """(Secret, the field that names it, its keys' prefix) of every Secret the pod loads."""
    sources = list(job.spec.secrets())
    cache = template.model_cache
    if cache is not None and cache.credentials_secret:
        sources.append(
            (cache.credentials_secret, "the profile's modelCache.credentialsSecret",
             CREDENTIAL_ENV["cache"])
        )  # fmt: skip
    return sources


def build_service(
    job: FineTuneJob, run_id: str, template: RunTemplate = NO_PROFILE
) -> dict[str, Any]:
    """The headless Service of a run of several pods: DNS names for its pods (rank 0's is the
    rendezvous address), published before the pods are ready, as they must meet to become so."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, run_id, template),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.metadata.name, RUN_LABEL: run_id},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": RENDEZVOUS_PORT,
                    "targetPort": RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def _pod_metadata(
    own: dict[str, str], queue: dict[str, str], template: RunTemplate
) -> dict[str, Any]:
    """The pod's labels (the profile's, then the operator's, which win) and annotations."""
    meta: dict[str, Any] = {"labels": {**dict(template.pod_labels), **own, **queue}}
    if template.pod_annotations:
        meta["annotations"] = dict(template.pod_annotations)
    return meta


def build_job(
    job: FineTuneJob, run_id: str, settings: OperatorSettings, template: RunTemplate = NO_PROFILE
) -> dict[str, Any]:
    """The batch/v1 Job of one run: one pod, or an Indexed Job of resources.nodes pods; pods are
    never restarted in place."""
    spec = job.spec
    queue = {QUEUE_LABEL: spec.queue_name} if spec.queue_name else {}
    pod_labels = labels(job, run_id, template)
    account = spec.service_account_name
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # A token only for a chosen ServiceAccount (a cloud identity: IRSA and Azure Workload
        # Identity exchange it); without one, the namespace's default account and no token.
        **({"serviceAccountName": account} if account else {}),
        "automountServiceAccountToken": bool(account),
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, run_id, settings, template)],
        "volumes": [
            {"name": "config", "configMap": {"name": child_name(job.metadata.name, run_id)}},
            {"name": "work", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            *template.volumes,
        ],
    }
    # The chart's pull Secrets for every trainer pod, then the profile's.
    pulls = dict.fromkeys([*settings.trainer_image_pull_secrets, *template.image_pull_secrets])
    if pulls:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in pulls]
    if template.affinity:
        pod_spec["affinity"] = template.affinity
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(exclude_none=True) for t in spec.resources.tolerations
        ]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    nodes = spec.nodes()
    if nodes > 1:
        pod_spec["subdomain"] = service_name(job, run_id)
    job_spec: dict[str, Any] = {
        # A failed group fails each of its pods once (the others lose their peer), and the Job
        # replaces every failed pod: backoffLimit counts group restarts, as the spec means it.
        "backoffLimit": (spec.backoff_limit + 1) * nodes - 1,
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
        "template": {"metadata": _pod_metadata(pod_labels, queue, template), "spec": pod_spec},
    }
    if nodes > 1:
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    metadata = _metadata(job, run_id, template, queue)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": job_spec,
    }
