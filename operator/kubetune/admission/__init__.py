"""Admission: whether a FineTuneJob may run on this cluster, and as what. Pure, and outside
the controller: the operator, `kubetune validate` and `kubetune run` ask the same questions.

`admit(job, profiles, namespace_labels, policy)` answers "why didn't my run start?" in one
place: the FineTuneProfile it resolves against (profiles.py: named, or the default offered to
its namespace; one that cannot be read fails closed), the profile's defaults and limits, the
cluster's policy (policy.py: trainer images, GPUs per job, file:// outputs), and the merge of
their refusals into one. A run that started keeps the profile pinned on its ConfigMap:
`admit_pinned` checks it under that one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kubetune.admission.policy import ClusterPolicy, Refusal, policy_problems
from kubetune.admission.profiles import (
    Resolution,
    apply_profile,
    pinned_profile,
    select_profile,
    unreadable_refusal,
)
from kubetune.admission.template import NO_PROFILE, PROFILE_FILE, RunTemplate
from kubetune.api import FineTuneJob, FineTuneProfile, spec_hash

__all__ = [
    "NO_PROFILE",
    "PROFILE_FILE",
    "Admission",
    "ClusterPolicy",
    "Refusal",
    "RunTemplate",
    "admit",
    "admit_pinned",
    "pinned_profile",
]


@dataclass(frozen=True)
class Admission:
    """The job as it will run (its profile's defaults filled in), what its pods get beyond the
    spec, and why it may not start (None: it may)."""

    job: FineTuneJob
    template: RunTemplate = field(default_factory=RunTemplate)
    refusal: Refusal | None = None
    # Each 'field: problem and fix' line: the profile's, then the cluster policy's.
    profile_problems: tuple[str, ...] = ()
    policy_problems: tuple[str, ...] = ()


def admit(
    job: FineTuneJob,
    profiles: Iterable[FineTuneProfile],
    namespace_labels: dict[str, str],
    policy: ClusterPolicy,
    unreadable: dict[str, bool] | None = None,
) -> Admission:
    """A new run of `job` in a namespace with these labels, among these FineTuneProfiles
    (`unreadable`: those that could not be parsed, by name, with whether they may say
    default), under the cluster's policy."""
    refusal = unreadable_refusal(job, unreadable or {})
    if refusal is None:
        profile, refusal = select_profile(job, profiles, namespace_labels, policy)
        if refusal is None:
            return _under(apply_profile(job, profile), policy)
    return _under(Resolution(job, RunTemplate(spec_hash=spec_hash(job)), refusal), policy)


def admit_pinned(
    job: FineTuneJob, profile: FineTuneProfile | None, policy: ClusterPolicy
) -> Admission:
    """A run under the profile it started with (None: it started under none)."""
    return _under(apply_profile(job, profile), policy)


def _under(resolution: Resolution, policy: ClusterPolicy) -> Admission:
    """The cluster's policy on top of the profile's answer, their refusals merged: policy
    problems join a PolicyViolation of the profile, and become one if there was no refusal; a
    refusal of another reason (the profile missing or unreadable) stands alone."""
    problems = policy_problems(resolution.job, policy, resolution.allowed_images)
    refusal = resolution.refusal
    if problems and (refusal is None or refusal.reason == "PolicyViolation"):
        lines = [refusal.message, *problems] if refusal is not None else problems
        refusal = Refusal("PolicyViolation", "; ".join(lines))
    admission = Admission(
        resolution.job,
        resolution.template,
        refusal,
        resolution.problems,
        tuple(problems),
    )
    return admission
