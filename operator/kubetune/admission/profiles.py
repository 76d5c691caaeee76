"""A FineTuneJob resolved against its FineTuneProfile. Pure.

Three steps, before anything is decided (decide.py never learns what a profile is):
1. Which profile: the one the run was started with, pinned in the run's ConfigMap (a later
   change of the profile never changes a run that exists) when its contents are the ones the
   operator wrote (status.configHash: a tenant can write ConfigMaps, not status); else the one
   `spec.profile` names, offered to the job's namespace by the profile's namespaceSelector;
   else the default profile offered to the namespace (the newest, when several are: what
   Kubernetes does with several default StorageClasses); else none, unless the operator
   requires one.
2. The profile's defaults fill what the job leaves unset; the job's own values must lie within
   the profile's limits. Each violation is one line naming the field, the value, the profile and
   the fix (a PolicyViolation).
3. What the pods get beyond the spec (service account, pull secrets, env, volumes, affinity, the
   model cache) goes into a RunTemplate for the builders, with the profile's name and generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.admission.policy import ClusterPolicy, Refusal
from kubetune.admission.template import PROFILE_FILE, RunTemplate
from kubetune.api import FineTuneJob, FineTuneProfile, ProfileRef, describe_errors, spec_hash
from kubetune.api.types import parse_quantity


@dataclass(frozen=True)
class Resolution:
    """The job as it will run, what its pods get beyond the spec, and why it may not start."""

    job: FineTuneJob
    template: RunTemplate = field(default_factory=RunTemplate)
    refusal: Refusal | None = None  # PolicyViolation, or ProfileNotFound (waits, not final)
    allowed_images: tuple[str, ...] = ()  # images the profile allows, beside the operator's
    problems: tuple[str, ...] = ()  # the violations, one 'field: problem and fix' each


def pinned_profile(configmap: dict[str, Any]) -> FineTuneProfile | None:
    """The profile a run was started with, as its ConfigMap recorded it (None: it started under
    no profile). Only for a ConfigMap whose contents the operator vouches for (its hash is the
    job's status.configHash)."""
    pinned = (configmap.get("data") or {}).get(PROFILE_FILE)
    if not pinned:
        return None
    record = json.loads(pinned)
    return FineTuneProfile.model_validate(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneProfile",
            "metadata": {"name": record["name"], "generation": int(record["generation"])},
            "spec": record["spec"],
        }
    )


def unreadable_refusal(job: FineTuneJob, unreadable: dict[str, bool]) -> Refusal | None:
    """Fail closed on a FineTuneProfile this operator cannot parse (a CRD or an operator of
    another version): a job naming it, or (naming none) any job while one marked `default` is
    unreadable, waits instead of running without the profile's limits. unreadable: name ->
    whether its raw spec says default."""
    name = job.spec.profile
    if name and name in unreadable:
        return Refusal(
            "ProfileUnreadable",
            f"spec.profile: FineTuneProfile {name!r} cannot be read by this operator (an "
            "operator or CRD of another version); the run starts once it can be read",
        )
    defaults = sorted(n for n, default in unreadable.items() if default)
    if not name and defaults:
        return Refusal(
            "ProfileUnreadable",
            f"spec.profile: the default FineTuneProfile {defaults[0]!r} cannot be read by this "
            "operator (an operator or CRD of another version), so its limits cannot be applied; "
            "the run starts once it can be read",
        )
    return None


def _offered(profile: FineTuneProfile, namespace_labels: dict[str, str]) -> bool:
    selector = profile.spec.namespace_selector
    return selector is None or selector.matches(namespace_labels)


def select_profile(
    job: FineTuneJob,
    profiles: Iterable[FineTuneProfile],
    namespace_labels: dict[str, str],
    policy: ClusterPolicy,
) -> tuple[FineTuneProfile | None, Refusal | None]:
    """The profile a new run of job resolves against, or why there is none to use."""
    namespace = job.metadata.namespace
    profiles = list(profiles)
    name = job.spec.profile
    if name:
        found = next((p for p in profiles if p.metadata.name == name), None)
        if found is None:
            return None, Refusal(
                "ProfileNotFound",
                f"spec.profile: FineTuneProfile {name!r} does not exist (yet); the run starts "
                "when it does (kubectl get finetuneprofiles lists those there are)",
            )
        if not _offered(found, namespace_labels):
            return None, Refusal(
                "PolicyViolation",
                f"spec.profile: FineTuneProfile {name!r} is not offered to namespace "
                f"{namespace} (its namespaceSelector does not match the namespace's labels); "
                "name a profile offered here",
            )
        return found, None
    defaults = [p for p in profiles if p.spec.default and _offered(p, namespace_labels)]
    if defaults:
        # The newest default wins; names break ties so that every replica picks the same one.
        newest = max(
            defaults,
            key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name),
        )
        return newest, None
    if policy.require_profile:
        offered = sorted(p.metadata.name for p in profiles if _offered(p, namespace_labels))
        choice = f"one of: {', '.join(offered)}" if offered else "none is offered here yet"
        return None, Refusal(
            "PolicyViolation",
            f"spec.profile: this cluster runs FineTuneJobs only under a FineTuneProfile; name "
            f"{choice}",
        )
    return None, None


def _over(value: Any, limit: Any) -> bool:
    if value is None or limit is None:
        return False
    if isinstance(value, int) and isinstance(limit, int):
        return value > limit
    return parse_quantity(value) > parse_quantity(limit)


def _under_prefix(uri: str, prefix: str) -> bool:
    base = prefix.rstrip("/")
    return uri.rstrip("/") == base or uri.startswith(base + "/")


NAMESPACE_PLACEHOLDER = "{namespace}"
BOUNDED_INPUTS = ("s3://", "gs://", "az://", "file://")


def _prefixes(prefixes: Iterable[str], namespace: str) -> list[str]:
    """A profile's prefixes for one namespace: {namespace} replaced by its name."""
    return [p.replace(NAMESPACE_PLACEHOLDER, namespace) for p in prefixes]


def _inputs(job: FineTuneJob) -> list[tuple[str, str]]:
    """(field, URI) of the job's inputs a profile's allowedInputPrefixes bounds."""
    spec = job.spec
    data = spec.dataset
    named = [
        ("spec.model.uri", spec.model.uri),
        ("spec.dataset.uri", data.uri),
        ("spec.dataset.validationUri", data.validation_uri),
        ("spec.dataset.testUri", data.test_uri),
        ("spec.evaluation.regressionUri", spec.evaluation.regression_uri),
    ]
    return [(f, uri) for f, uri in named if uri and uri.startswith(BOUNDED_INPUTS)]


def _storage_problems(job: FineTuneJob, profile: FineTuneProfile) -> list[str]:
    """Where the job reads and writes, against the profile's prefixes and its model cache."""
    name, ps = profile.metadata.name, profile.spec
    namespace = job.metadata.namespace or ""
    of = f"FineTuneProfile {name!r} allows"
    output = job.spec.output.uri
    problems = []
    writes = _prefixes(ps.allowed_output_prefixes, namespace)
    if writes and not any(_under_prefix(output, p) for p in writes):
        problems.append(
            f"spec.output.uri: {output} is outside what {of} (allowedOutputPrefixes: "
            f"{', '.join(writes)}); write under one of them"
        )
    cache = ps.model_cache.uri if ps.model_cache else None
    if cache and _under_prefix(output, cache):
        problems.append(
            f"spec.output.uri: {output} lies in the model cache of FineTuneProfile {name!r} "
            f"({cache}), which is written with the cache's credentials; write elsewhere"
        )
    reads = _prefixes(ps.allowed_input_prefixes, namespace)
    if reads:
        allowed = [*reads, *writes]
        for field_name, uri in _inputs(job):
            if not any(_under_prefix(uri, p) for p in allowed):
                problems.append(
                    f"{field_name}: {uri} is outside what {of} (allowedInputPrefixes: "
                    f"{', '.join(reads)}); read from under one of them"
                )
    return problems


def _problems(job: FineTuneJob, profile: FineTuneProfile | None) -> list[str]:
    """What the job's own values break of the profile's limits."""
    spec = job.spec
    if profile is None:
        if spec.service_account_name:
            return [
                f"spec.serviceAccountName: {spec.service_account_name!r} may be chosen only "
                "under a FineTuneProfile whose allowedServiceAccounts lists it; name such a "
                "profile or remove the field"
            ]
        return []
    name = profile.metadata.name
    ps = profile.spec
    res, limits = spec.resources, ps.limits
    of = f"FineTuneProfile {name!r} allows"
    problems = []
    for key in ("gpus", "nodes", "cpu", "memory"):
        value = getattr(res, key) if getattr(res, key) is not None else getattr(ps.resources, key)
        if key == "gpus" and value is None:
            value = res.gpus_per_pod()  # neither sets it: the pod gets one GPU
        if _over(value, getattr(limits, key)):
            problems.append(
                f"spec.resources.{key}: {value} is more than {of} (limits.{key}: "
                f"{getattr(limits, key)}); ask for less or use another profile"
            )
    per_pod = res.gpus if res.gpus is not None else ps.resources.gpus
    gpus = (res.gpus_per_pod() if per_pod is None else per_pod) * (
        res.nodes or ps.resources.nodes or 1
    )
    if _over(gpus, limits.total_gpus):
        problems.append(
            f"spec.resources: {gpus} GPUs in all is more than {of} (limits.totalGpus: "
            f"{limits.total_gpus}); lower resources.nodes or resources.gpus"
        )
    for key, value in res.node_selector.items():
        if key in ps.node_selector and ps.node_selector[key] != value:
            problems.append(
                f"spec.resources.nodeSelector.{key}: FineTuneProfile {name!r} places its pods "
                f"on {key}={ps.node_selector[key]}; remove the key or use another profile"
            )
    if (
        res.priority_class_name
        and ps.priority_class_name
        and res.priority_class_name != ps.priority_class_name
    ):
        problems.append(
            f"spec.resources.priorityClassName: FineTuneProfile {name!r} runs at "
            f"{ps.priority_class_name}; remove the field or use another profile"
        )
    if len(spec.gates) < ps.min_gates:
        problems.append(
            f"spec.gates: {len(spec.gates)} gate(s) is fewer than {of} (minGates: "
            f"{ps.min_gates}); add a gate, e.g. {{metric: exactMatch, min: 0.5}}, that the "
            "tuned model must pass to be promoted"
        )
    account = spec.service_account_name
    if (
        account
        and account != ps.service_account_name
        and account not in ps.allowed_service_accounts
    ):
        allowed = ", ".join(ps.allowed_service_accounts) or "none"
        problems.append(
            f"spec.serviceAccountName: {account!r} is not one {of} (allowedServiceAccounts: "
            f"{allowed})"
        )
    return problems + _storage_problems(job, profile)


def _filled(job: FineTuneJob, profile: FineTuneProfile) -> dict[str, Any]:
    """The job's spec (JSON) with the profile's defaults in what it leaves unset."""
    ps = profile.spec
    spec = job.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    res = spec.setdefault("resources", {})
    defaults = ps.resources.model_dump(by_alias=True, exclude_none=True, mode="json")
    for key, value in defaults.items():
        res.setdefault(key, value)
    res["nodeSelector"] = {**ps.node_selector, **res.get("nodeSelector", {})}
    res["tolerations"] = [
        *(t.model_dump(by_alias=True, exclude_none=True) for t in ps.tolerations),
        *res.get("tolerations", []),
    ]
    if ps.priority_class_name:
        res.setdefault("priorityClassName", ps.priority_class_name)
    if ps.image:
        spec.setdefault("image", ps.image)
    if ps.queue_name:
        spec.setdefault("queueName", ps.queue_name)
    if ps.service_account_name:
        spec.setdefault("serviceAccountName", ps.service_account_name)
    return spec


def _template(job: FineTuneJob, profile: FineTuneProfile) -> RunTemplate:
    ps = profile.spec
    return RunTemplate(
        spec_hash=spec_hash(job),
        profile=ProfileRef(name=profile.metadata.name, generation=profile.metadata.generation or 0),
        profile_spec=ps.model_dump_json(by_alias=True, exclude_none=True),
        affinity=ps.affinity,
        image_pull_secrets=tuple(ps.image_pull_secrets),
        env=tuple(e.model_dump(by_alias=True, exclude_none=True) for e in ps.env),
        volumes=tuple(v.model_dump(by_alias=True, exclude_none=True) for v in ps.volumes),
        volume_mounts=tuple(
            m.model_dump(by_alias=True, exclude_none=True) for m in ps.volume_mounts
        ),
        model_cache=ps.model_cache,
        pricing=ps.pricing,
        pod_labels=tuple(sorted(ps.pod_labels.items())),
        pod_annotations=tuple(sorted(ps.pod_annotations.items())),
    )


def apply_profile(job: FineTuneJob, profile: FineTuneProfile | None) -> Resolution:
    """The job with the profile's defaults, limits checked; with no profile, the job as it is."""
    problems = _problems(job, profile)
    if profile is None:
        refusal = Refusal("PolicyViolation", "; ".join(problems)) if problems else None
        return Resolution(
            job, RunTemplate(spec_hash=spec_hash(job)), refusal, problems=tuple(problems)
        )
    template = _template(job, profile)
    allowed = tuple(x for x in (profile.spec.image, *profile.spec.allowed_images) if x)
    try:
        spec = type(job.spec).model_validate(_filled(job, profile), by_name=False)
    except ValidationError as exc:
        # The job is valid alone (the API server checked it) but not with the profile's
        # defaults: e.g. a batch the profile's default GPUs cannot share.
        problems += [
            "spec"
            + ("" if line.startswith("(document)") else ".")
            + line.removeprefix("(document)")
            + f" (with the defaults of FineTuneProfile {profile.metadata.name!r})"
            for line in describe_errors(exc, type(job.spec))
        ]
        spec = job.spec
    resolved = job.model_copy(update={"spec": spec})
    refusal = Refusal("PolicyViolation", "; ".join(problems)) if problems else None
    return Resolution(resolved, template, refusal, allowed, tuple(problems))
