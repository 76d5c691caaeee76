"""The `FineTuneProfile` resource (cluster-scoped): what a platform team offers, written once.

A profile holds what each FineTuneJob would otherwise spell out itself (trainer image, placement
on a GPU pool, priority, queue, service account, pull secrets, extra environment and volumes, a
shared model cache) and the limits within which a job may change the defaults (GPUs, pods, CPU,
memory, images, output prefixes, service accounts). A job names one in `spec.profile`; a job that
names none gets the default profile offered to its namespace, if there is one. Resolving a job
against its profile is the operator's (admission/profiles.py); these are only the types.

Like Kubeflow Trainer's ClusterTrainingRuntime, a profile is cluster-scoped and platform-owned:
users reference it and cannot change it. Which namespaces may use it is a label selector on
namespaces, as NetworkPolicy's namespaceSelector.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field

from kubetune.api.base import ApiModel, Rule
from kubetune.api.compute import MAX_NODES, Toleration
from kubetune.api.resource import ObjectMeta
from kubetune.api.types import (
    DNS_LABEL,
    DnsLabel,
    DnsSubdomain,
    EnvVarName,
    OutputUri,
    Quantity,
    ResourceName,
    parse_quantity,
)
from kubetune.api.wire import CONFIG_DIR, POD_WORK_DIR

PROFILE_KIND = "FineTuneProfile"
PROFILE_PLURAL = "finetuneprofiles"
PROFILE_SINGULAR = "finetuneprofile"
PROFILE_SHORT_NAMES = ("ftp",)

# What the operator puts in every trainer pod: a profile may not replace it.
RESERVED_VOLUMES = ("config", "work", "tmp", "shm", "credentials")
RESERVED_MOUNT_PATHS = (CONFIG_DIR, POD_WORK_DIR, "/tmp", "/dev/shm", "/var/run/secrets")
RESERVED_ENV = ("HOME", "HF_HOME", "PYTHONUNBUFFERED")
RESERVED_ENV_PREFIXES = ("KUBETUNE_", "PET_")
# Label and annotation prefixes the operator, the Job controller and Kueue set on the pods.
RESERVED_METADATA_PREFIXES = (
    "kubetune.dev/",
    "app.kubernetes.io/",
    "batch.kubernetes.io/",
    "kueue.x-k8s.io/",
)

__all__ = [
    "PROFILE_KIND",
    "PROFILE_PLURAL",
    "PROFILE_SHORT_NAMES",
    "PROFILE_SINGULAR",
    "RESERVED_ENV",
    "RESERVED_ENV_PREFIXES",
    "RESERVED_MOUNT_PATHS",
    "RESERVED_VOLUMES",
    "EnvVar",
    "FineTuneProfile",
    "FineTuneProfileSpec",
    "LabelSelector",
    "ModelCacheSpec",
    "ProfileLimits",
    "ProfileResources",
    "Volume",
    "VolumeMount",
]


_CEL_NOT_RESERVED = " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_METADATA_PREFIXES)


def _cel_in(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


class SelectorRequirement(ApiModel):
    """A label selector requirement (metav1.LabelSelectorRequirement)."""

    __rules__ = (
        Rule(
            cel=(
                "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)"
            ),
            check=lambda s: (s.operator in ("In", "NotIn")) == bool(s.values),
            message="In and NotIn need values; Exists and DoesNotExist take none",
            field=".values",
        ),
    )

    key: str = Field(min_length=1, max_length=317, description="key is the label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="operator is In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="values for In and NotIn.",
    )


class LabelSelector(ApiModel):
    """A label selector (metav1.LabelSelector): every term must match; empty matches all."""

    match_labels: dict[str, str] = Field(
        default_factory=dict, max_length=32, description="matchLabels: each key has this value."
    )
    match_expressions: list[SelectorRequirement] = Field(
        default_factory=list, max_length=32, description="matchExpressions: each must hold."
    )

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
            if req.operator == "In" and labels.get(req.key) not in req.values:
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
        return True


class ProfileResources(ApiModel):
    """Default compute of a job's trainer pods: what a job that sets none gets."""

    gpus: int | None = Field(
        default=None, ge=0, le=16, description="gpus is the default GPUs of each trainer pod."
    )
    nodes: int | None = Field(
        default=None, ge=1, le=MAX_NODES, description="nodes is the default number of pods."
    )
    cpu: Quantity | None = Field(default=None, description="cpu is the default CPU request.")
    memory: Quantity | None = Field(
        default=None, description="memory is the default memory request and limit."
    )
    gpu_resource_name: ResourceName | None = Field(
        default=None,
        description="gpuResourceName is the extended resource that counts this pool's GPUs.",
    )


class ProfileLimits(ApiModel):
    """The most a job of this profile may ask for."""

    gpus: int | None = Field(
        default=None, ge=0, le=16, description="gpus is the most GPUs of each trainer pod."
    )
    nodes: int | None = Field(
        default=None, ge=1, le=MAX_NODES, description="nodes is the most trainer pods of a job."
    )
    total_gpus: int | None = Field(
        default=None, ge=0, description="totalGpus is the most GPUs of a job, all pods together."
    )
    cpu: Quantity | None = Field(default=None, description="cpu is the most CPU of each pod.")
    memory: Quantity | None = Field(
        default=None, description="memory is the most memory of each pod."
    )


def _quantity_rule(field: str) -> Rule:
    """A default no larger than the limit, compared as quantities (Kubernetes' CEL quantity
    library, in every API server the chart supports)."""
    return Rule(
        cel=(
            f"!has(self.resources) || !has(self.limits) || "
            f"!has(self.resources.{field}) || !has(self.limits.{field}) || "
            f"quantity(string(self.resources.{field})).compareTo("
            f"quantity(string(self.limits.{field}))) <= 0"
        ),
        check=lambda s: (
            getattr(s.resources, field) is None
            or getattr(s.limits, field) is None
            or parse_quantity(getattr(s.resources, field))
            <= parse_quantity(getattr(s.limits, field))
        ),
        message=f"resources.{field} (a default) must not exceed limits.{field}",
        field=f".resources.{field}",
    )


def _int_rule(field: str) -> Rule:
    return Rule(
        cel=(
            f"!has(self.resources) || !has(self.limits) || "
            f"!has(self.resources.{field}) || !has(self.limits.{field}) || "
            f"self.resources.{field} <= self.limits.{field}"
        ),
        check=lambda s: (
            getattr(s.resources, field) is None
            or getattr(s.limits, field) is None
            or getattr(s.resources, field) <= getattr(s.limits, field)
        ),
        message=f"resources.{field} (a default) must not exceed limits.{field}",
        field=f".resources.{field}",
    )


class SecretKeyRef(ApiModel):
    """One key of a Secret in the job's own namespace."""

    name: DnsSubdomain = Field(description="name of the Secret.")
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="key in the Secret.",
    )


class EnvSource(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: SecretKeyRef = Field(
        description="secretKeyRef is a key of a Secret in the job's namespace (e.g. HF_TOKEN)."
    )


class EnvVar(ApiModel):
    """An environment variable of the trainer: a value, or a Secret's key."""

    __rules__ = (
        Rule(
            cel="has(self.value) != has(self.valueFrom)",
            check=lambda s: (s.value is None) != (s.value_from is None),
            message="set exactly one of value or valueFrom",
        ),
        Rule(
            cel=(
                f"!(self.name in {_cel_in(RESERVED_ENV)}) && "
                + " && ".join(f"!self.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
            ),
            check=lambda s: (
                s.name not in RESERVED_ENV and not s.name.startswith(RESERVED_ENV_PREFIXES)
            ),
            message=(
                f"{', '.join(RESERVED_ENV)} and names starting with "
                f"{' or '.join(RESERVED_ENV_PREFIXES)} are the operator's; choose another name"
            ),
            field=".name",
        ),
    )

    name: EnvVarName = Field(description="name of the variable.")
    value: str | None = Field(default=None, max_length=4096, description="value, written here.")
    value_from: EnvSource | None = Field(
        default=None, description="valueFrom reads the value from a Secret of the job's namespace."
    )


class PvcSource(ApiModel):
    """A PersistentVolumeClaim in the job's namespace."""

    claim_name: DnsSubdomain = Field(description="claimName is the PersistentVolumeClaim's name.")
    read_only: bool = Field(default=False, description="readOnly mounts it read-only.")


class NfsSource(ApiModel):
    """An NFS export."""

    server: str = Field(min_length=1, max_length=253, description="server is the NFS server.")
    path: str = Field(min_length=1, max_length=4096, description="path is the exported path.")
    read_only: bool = Field(default=False, description="readOnly mounts it read-only.")


class CsiSource(ApiModel):
    """An inline CSI volume (e.g. a Secrets Store CSI driver or an object-storage FUSE mount)."""

    driver: DnsSubdomain = Field(description="driver is the CSI driver's name.")
    read_only: bool = Field(default=True, description="readOnly mounts it read-only.")
    volume_attributes: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="volumeAttributes for the driver."
    )


class Volume(ApiModel):
    """A volume for the trainer pods: a PersistentVolumeClaim, NFS or CSI (no hostPath)."""

    __rules__ = (
        Rule(
            cel=(
                "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.nfs) ? 1 : 0) + "
                "(has(self.csi) ? 1 : 0) == 1"
            ),
            check=lambda s: [s.persistent_volume_claim, s.nfs, s.csi].count(None) == 2,
            message="a volume sets exactly one of persistentVolumeClaim, nfs or csi",
        ),
        Rule(
            cel=f"!(self.name in {_cel_in(RESERVED_VOLUMES)})",
            check=lambda s: s.name not in RESERVED_VOLUMES,
            message=(
                f"{', '.join(RESERVED_VOLUMES)} are the operator's volumes; choose another name"
            ),
            field=".name",
        ),
    )

    name: DnsLabel = Field(description="name of the volume, used by volumeMounts.")
    persistent_volume_claim: PvcSource | None = Field(
        default=None, description="persistentVolumeClaim in the job's namespace."
    )
    nfs: NfsSource | None = Field(default=None, description="nfs export.")
    csi: CsiSource | None = Field(default=None, description="csi inline volume.")


class VolumeMount(ApiModel):
    """Where a profile's volume appears in the trainer container."""

    __rules__ = (
        Rule(
            cel=" && ".join(
                f"self.mountPath != '{p}' && !self.mountPath.startsWith('{p}/')"
                for p in RESERVED_MOUNT_PATHS
            ),
            check=lambda s: (
                not any(
                    s.mount_path == p or s.mount_path.startswith(p + "/")
                    for p in RESERVED_MOUNT_PATHS
                )
            ),
            message=(
                f"{', '.join(RESERVED_MOUNT_PATHS)} are the operator's mounts; mount elsewhere "
                "(e.g. /models)"
            ),
            field=".mountPath",
        ),
    )

    name: DnsLabel = Field(description="name of one of the profile's volumes.")
    mount_path: str = Field(
        min_length=2,
        max_length=1024,
        pattern=r"^/[^:]*[^/:]$",
        description="mountPath is an absolute path, without a trailing slash.",
    )
    read_only: bool = Field(default=False, description="readOnly mounts it read-only.")
    sub_path: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^[^/.][^:]*$",
        description="subPath mounts a directory of the volume instead of its root.",
    )


class ModelCacheSpec(ApiModel):
    """A shared cache of base models: a run stages its model there once, later runs load it."""

    __rules__ = (
        Rule(
            cel="has(self.path) != has(self.uri)",
            check=lambda s: (s.path is None) != (s.uri is None),
            message="set exactly one of path (a mounted volume) or uri (object storage)",
        ),
    )

    path: str | None = Field(
        default=None,
        min_length=2,
        max_length=1024,
        pattern=r"^/[^:]*[^/:]$",
        description=(
            "path is a directory in the trainer pod on one of the profile's volumeMounts (e.g. a "
            "ReadWriteMany PersistentVolumeClaim mounted at /models): models go under it."
        ),
    )
    uri: OutputUri | None = Field(
        default=None,
        description=(
            "uri is an object-storage prefix (s3://, gs://, az://): models go under it, read "
            "and written with the credentials of credentialsSecret or the pod's identity."
        ),
    )
    credentials_secret: DnsSubdomain | None = Field(
        default=None,
        description=(
            "credentialsSecret is a Secret, in each job's namespace, with the storage "
            "credentials for uri (the keys of spec.output.credentialsSecret)."
        ),
    )


def _mounts_name_volumes(s: FineTuneProfileSpec) -> bool:
    names = {v.name for v in s.volumes}
    return all(m.name in names for m in s.volume_mounts)


def _cache_on_a_mount(s: FineTuneProfileSpec) -> bool:
    cache = s.model_cache
    if cache is None or cache.path is None:
        return True
    return any(
        cache.path == m.mount_path or cache.path.startswith(m.mount_path + "/")
        for m in s.volume_mounts
        if not m.read_only
    )


PRICE = r"^(0|[1-9][0-9]{0,8})(\.[0-9]{1,6})?$"


class Pricing(ApiModel):
    """What the profile's resources cost, for the estimated cost on a run's status.usage and in
    its report. Prices are decimal strings (as Kubernetes keeps non-integers out of specs)."""

    gpu_hour: str | None = Field(
        default=None,
        pattern=PRICE,
        description='gpuHour is the price of one GPU for one hour, e.g. "2.50".',
    )
    cpu_hour: str | None = Field(
        default=None,
        pattern=PRICE,
        description='cpuHour is the price of one requested CPU core for one hour, e.g. "0.04".',
    )
    currency: str = Field(
        default="USD",
        pattern=r"^[A-Z]{3}$",
        description="currency is the ISO 4217 code the prices are in (default USD).",
    )

    def cost(self, gpu_seconds: float, cpu_seconds: float) -> float:
        """The price of that much GPU and CPU time, rounded to the cent's hundredth."""
        gpu = float(self.gpu_hour or 0) * gpu_seconds / 3600
        cpu = float(self.cpu_hour or 0) * cpu_seconds / 3600
        return round(gpu + cpu, 4)


class FineTuneProfileSpec(ApiModel):
    """What the jobs of this profile run with, and what they may change."""

    __rules__ = (
        _int_rule("gpus"),
        _int_rule("nodes"),
        _quantity_rule("cpu"),
        _quantity_rule("memory"),
        Rule(
            cel=(
                "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
                "self.volumes.exists(v, v.name == m.name))"
            ),
            check=_mounts_name_volumes,
            message="every volumeMount names one of volumes",
            field=".volumeMounts",
        ),
        Rule(
            cel=(
                "!has(self.modelCache) || !has(self.modelCache.path) || "
                "has(self.volumeMounts) && "
                "self.volumeMounts.exists(m, !m.readOnly && (self.modelCache.path == "
                "m.mountPath || self.modelCache.path.startsWith(m.mountPath + '/')))"
            ),
            check=_cache_on_a_mount,
            message=(
                "modelCache.path must lie on one of volumeMounts that is not readOnly (the "
                "cache is written), e.g. a ReadWriteMany claim mounted at /models"
            ),
            field=".modelCache.path",
        ),
        Rule(
            cel=" && ".join(
                f"(!has(self.{field}) || self.{field}.all(k, {_CEL_NOT_RESERVED}))"
                for field in ("podLabels", "podAnnotations")
            ),
            check=lambda s: (
                not any(
                    key.startswith(RESERVED_METADATA_PREFIXES)
                    for key in (*s.pod_labels, *s.pod_annotations)
                )
            ),
            message=(
                f"podLabels and podAnnotations may not use {', '.join(RESERVED_METADATA_PREFIXES)}"
                " (the operator's, the Job controller's and Kueue's)"
            ),
            field=".podLabels",
        ),
        Rule(
            cel=(
                "!has(self.serviceAccountName) || !has(self.allowedServiceAccounts) || "
                "self.allowedServiceAccounts.size() == 0 || "
                "self.serviceAccountName in self.allowedServiceAccounts"
            ),
            check=lambda s: (
                s.service_account_name is None
                or not s.allowed_service_accounts
                or s.service_account_name in s.allowed_service_accounts
            ),
            message="serviceAccountName, when allowedServiceAccounts is set, must be one of them",
            field=".serviceAccountName",
        ),
    )

    default: bool = Field(
        default=False,
        description=(
            "default makes this the profile of jobs that name none, in the namespaces it is "
            "offered to. With several default profiles for a namespace, the newest wins (as for "
            "default StorageClasses)."
        ),
    )
    description: str | None = Field(
        default=None, max_length=256, description="description says what the profile is for."
    )
    namespace_selector: LabelSelector | None = Field(
        default=None,
        description=(
            "namespaceSelector selects the namespaces whose jobs may use this profile, by their "
            "labels; omitted: every namespace. {} also matches every namespace."
        ),
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="image is the trainer image of this profile's jobs; default: the operator's.",
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "allowedImages are further images a job may name in spec.image (exact match), "
            "beside the operator's own allowed images."
        ),
    )
    resources: ProfileResources = Field(
        default_factory=ProfileResources,
        description="resources are the defaults for what a job leaves unset in spec.resources.",
    )
    limits: ProfileLimits = Field(
        default_factory=ProfileLimits,
        description="limits are the most a job may ask for; a job over a limit fails with "
        "PolicyViolation naming the field and this profile.",
    )
    min_gates: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "minGates is the fewest gates a job must have (e.g. 1: no run is promoted without "
            "passing an evaluation); a job with fewer fails PolicyViolation. It counts gates; "
            "it does not judge their thresholds."
        ),
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description=(
            "nodeSelector places every pod on this pool; a job may add keys but not change these."
        ),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="tolerations are added to the job's own (e.g. the GPU pool's taint).",
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description=(
            "affinity is the pods' affinity (core/v1 Affinity: nodeAffinity, podAffinity, "
            "podAntiAffinity), passed as written; the API server validates it with the Job."
        ),
    )
    priority_class_name: DnsSubdomain | None = Field(
        default=None,
        description=(
            "priorityClassName of every pod; a job may not name another (use a second profile)."
        ),
    )
    queue_name: DnsLabel | None = Field(
        default=None,
        description=(
            "queueName is the Kueue LocalQueue of jobs that name none (the LocalQueue must exist "
            "in each namespace the profile is offered to)."
        ),
    )
    service_account_name: DnsSubdomain | None = Field(
        default=None,
        description=(
            "serviceAccountName runs the trainer pods as this ServiceAccount of the job's "
            "namespace (with its token mounted), e.g. one bound to a cloud role through IRSA, "
            "GKE or Azure Workload Identity. Unset: no ServiceAccount token at all."
        ),
    )
    allowed_service_accounts: list[DnsSubdomain] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "allowedServiceAccounts are the ServiceAccounts a job may choose in "
            "spec.serviceAccountName; empty: a job may not choose one."
        ),
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description=(
            'podLabels are added to the trainer pods (e.g. azure.workload.identity/use: "true" '
            "for Azure Workload Identity); not under kubetune.dev/, app.kubernetes.io/, "
            "batch.kubernetes.io/ or kueue.x-k8s.io/."
        ),
    )
    pod_annotations: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description=(
            "podAnnotations are added to the trainer pods (e.g. sidecar.istio.io/inject: "
            '"false", so that a mesh sidecar does not keep a finished Job\'s pod running).'
        ),
    )
    image_pull_secrets: list[DnsSubdomain] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "imagePullSecrets are Secrets (in each job's namespace) for pulling the trainer "
            "image from a private registry."
        ),
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="env is added to the trainer's environment (e.g. HF_TOKEN from a Secret).",
    )
    volumes: list[Volume] = Field(
        default_factory=list, max_length=16, description="volumes of the trainer pods."
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=16,
        description="volumeMounts of the trainer container, naming volumes.",
    )
    allowed_output_prefixes: list[OutputUri] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "allowedOutputPrefixes: a job's output.uri must lie under one of these (e.g. "
            "s3://team-models/, or s3://ml-models/{namespace}/: {namespace} stands for the "
            "job's namespace, so that namespaces sharing a bucket cannot write each other's "
            "runs or latest.json); empty allows any. An output under modelCache.uri is never "
            "allowed (it would be written with the cache's credentials)."
        ),
    )
    allowed_input_prefixes: list[OutputUri] = Field(
        default_factory=list,
        max_length=32,
        description=(
            "allowedInputPrefixes: a job's s3://, gs://, az:// and file:// inputs (model.uri, "
            "dataset.uri, validationUri, testUri, evaluation.regressionUri) must lie under one "
            "of these or of allowedOutputPrefixes ({namespace} as there); hf:// and https:// "
            "inputs are not bounded here; empty allows any."
        ),
    )
    model_cache: ModelCacheSpec | None = Field(
        default=None,
        description=(
            "modelCache is a shared cache of base models: each model is fetched once (with a "
            "lock, so two runs do not fetch it twice) and later runs load it from here."
        ),
    )
    pricing: Pricing | None = Field(
        default=None,
        description=(
            "pricing prices GPU and CPU time: runs under this profile show an estimated cost "
            "beside their usage (status.usage, report.md). A change applies to runs that start "
            "after it."
        ),
    )


class ProfileMeta(ObjectMeta):
    """A profile's metadata. Its name is a DNS label: it labels the runs made with it."""

    name: DnsLabel = Field(description="name of the FineTuneProfile, at most 63 characters.")


class FineTuneProfile(ApiModel):
    """What a platform team offers: defaults, limits and placement for FineTuneJobs."""

    __rules__ = (
        Rule(
            cel="self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            check=lambda s: re.match(DNS_LABEL, s.metadata.name) is not None,
            message=(
                "metadata.name of a FineTuneProfile is a DNS label (at most 63 lowercase "
                "letters, digits and '-'): it labels the runs made with it"
            ),
        ),
    )

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(
        alias="apiVersion", description="apiVersion is kubetune.dev/v1alpha1."
    )
    kind: Literal["FineTuneProfile"] = Field(description="kind is FineTuneProfile.")
    metadata: ProfileMeta = Field(description="metadata is the standard object metadata.")
    spec: FineTuneProfileSpec = Field(
        default_factory=FineTuneProfileSpec, description="spec is what the profile offers."
    )
