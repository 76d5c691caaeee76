"""What `submit` sends: FineTuneJobs and FineTuneSchedules checked as `kubetune validate` checks
them, as the plain manifests they were written as (a generateName stays for the API server)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kubetune.admission import ClusterPolicy
from kubetune.api import KIND, SCHEDULE_KIND, FineTuneJob
from kubetune.client.kube import ClientError
from kubetune.manifests import Document, check_against_cluster, read_documents, validate_document

SUBMITTED = (KIND, SCHEDULE_KIND)


def bodies(
    job: FineTuneJob | dict[str, Any] | str | Path, policy: ClusterPolicy | None = None
) -> list[dict[str, Any]]:
    """The FineTuneJobs and FineTuneSchedules of job (a model, a manifest, or a YAML file:
    `-` reads standard input), checked against the API's schema and rules (what the API server
    refuses), each problem with the file's line. With a policy (the cluster's chart values,
    --settings), also as `kubetune validate --settings` checks them: the operator's policy and
    a profile given beside; without it those are the operator's to judge (its settings are not
    the chart's defaults in every cluster), and its verdict comes back on the run's status.
    Invalid lists every problem."""
    from kubetune.client import Invalid

    if isinstance(job, FineTuneJob):
        body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
        body.pop("status", None)
        meta = body.get("metadata") or {}
        for server_set in ("uid", "resourceVersion", "creationTimestamp", "generation",
                           "managedFields", "selfLink"):  # fmt: skip
            meta.pop(server_set, None)
        return [body]
    if isinstance(job, dict):
        raws = [(copy.deepcopy(job), None, Document("<dict>", 0, 0))]
    else:
        read = read_documents(job)
        if isinstance(read, Document):
            raise Invalid([str(p) for p in read.problems])
        raws = [(r.data, r.node, r.doc) for r in read]
    docs = [validate_document(copy.deepcopy(data), node, doc) for data, node, doc in raws]
    if policy is not None:
        check_against_cluster(docs, policy)
    problems = [str(p) for d in docs for p in d.problems]
    if problems:
        raise Invalid(problems)
    out = [
        data
        for (data, _, _), d in zip(raws, docs, strict=True)
        if d.kind in SUBMITTED and not d.skipped_kind
    ]
    if not out:
        where = job if isinstance(job, str | Path) else "the manifest"
        raise ClientError(f"{where}: no FineTuneJob or FineTuneSchedule to submit")
    return out
