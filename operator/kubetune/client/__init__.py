"""kubetune's Python client: submit a FineTuneJob, follow it, read its log, fetch its artifacts,
roll a promotion back. The same verbs as the `kubetune` command line, as functions that return
the API's pydantic types.

    from kubetune.client import Client

    client = Client()                       # the kubeconfig's current context and namespace
    job = client.submit("job.yaml")         # a path, a dict or a FineTuneJob
    for job in client.watch(job.metadata.name):
        print(job.status.phase, job.status.progress)
    client.pull(job.metadata.name, to="out/")

It talks to the cluster as its user (kubeconfig, `context=`, `namespace=`; a pod's ServiceAccount
in a pod) and to object storage with the credentials of the Secret the run names (read as that
user), else the user's own environment. It needs the core dependencies, the kubernetes client
and obstore (`pip install 'kubetune[client]'`), not torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from kubetune.api import (
    EXIT_CODES,
    FINAL_PHASES,
    KIND,
    SCHEDULE_KIND,
    SCHEDULE_PLURAL,
    ExitCode,
    FineTuneJob,
    FineTuneJobStatus,
    FineTuneSchedule,
    describe_errors,
)
from kubetune.api.wire import COMPLETION_INDEX, CONTAINER, JOB_LABEL, RUN_LABEL
from kubetune.client.kube import ClientError, Conflict, Gone, Kube, NotFound, Target, connect

if TYPE_CHECKING:
    from kubetune.client.artifacts import Pulled, RolledBack

__all__ = [
    "Client",
    "ClientError",
    "Conflict",
    "Description",
    "Ended",
    "Invalid",
    "NotFound",
    "PodState",
    "exit_code",
]

WATCH_SECONDS = 60  # one watch request; the next resumes from the last resourceVersion


class Invalid(ClientError):
    """A manifest the API would refuse: one `file:line: field: problem` per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Ended(ClientError):
    """The run finished in a phase other than the one waited for: it will not change."""

    def __init__(self, message: str, job: FineTuneJob) -> None:
        super().__init__(message)
        self.job = job


def exit_code(status: FineTuneJobStatus | None) -> ExitCode:
    """The exit code `kubetune run` gives the same outcome: 0 promoted, 4 gates failed, 2 the
    spec refused (by the operator's validation, policy or profile), 3 data, 5 diverged, 1 the
    rest."""
    if status is None or status.phase == "Succeeded":
        return ExitCode.SUCCEEDED
    failed = next((c for c in status.conditions if c.type == "Failed"), None)
    reason = failed.reason if failed is not None else ""
    for code, meaning in EXIT_CODES.items():
        if meaning.reason == reason and code != ExitCode.SUCCEEDED:
            return code
    if reason in ("PolicyViolation", "AdmissionDenied"):
        return ExitCode.INVALID_SPEC
    return ExitCode.RUNTIME_ERROR


def parse_job(raw: dict[str, Any]) -> FineTuneJob:
    """A FineTuneJob as the API server returned it, status included."""
    status = FineTuneJobStatus.model_validate(raw.get("status") or {})
    body = {k: v for k, v in raw.items() if k != "status"}
    try:
        job = FineTuneJob.model_validate(body, by_name=False)
    except ValidationError as exc:  # a CRD older than this client: say what, keep the status
        raise ClientError(
            f"FineTuneJob {raw.get('metadata', {}).get('name')} cannot be read by this client: "
            f"{'; '.join(describe_errors(exc, FineTuneJob))} (client and operator versions "
            "differ?)"
        ) from exc
    return job.model_copy(update={"status": status})


@dataclass(frozen=True)
class PodState:
    """A trainer pod as its status says: why it waits, runs or ended."""

    name: str
    index: int
    phase: str
    node: str | None
    state: str  # waiting, running, terminated, or "" before its container exists
    reason: str = ""
    message: str = ""
    restarts: int = 0
    exit_code: int | None = None


@dataclass(frozen=True)
class Description:
    """What `kubetune describe` shows: the job, its Events (oldest first) and its pods."""

    job: FineTuneJob
    events: list[dict[str, Any]] = field(default_factory=list)
    pods: list[PodState] = field(default_factory=list)


def _pod_state(pod: dict[str, Any]) -> PodState:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    mine = next((c for c in containers if c.get("name") == CONTAINER), None)
    state, reason, message, code = "", "", "", None
    if mine is not None:
        for name, value in (mine.get("state") or {}).items():
            if value:
                state = name
                reason = value.get("reason") or ""
                message = value.get("message") or ""
                code = value.get("exitCode")
    if not state:  # no container yet: the scheduler's word, if any
        scheduled = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
        )
        if scheduled.get("status") == "False":
            reason, message = scheduled.get("reason") or "", scheduled.get("message") or ""
    return PodState(
        name=meta.get("name", ""),
        index=int(
            (meta.get("annotations") or {}).get(COMPLETION_INDEX)
            or (meta.get("labels") or {}).get(COMPLETION_INDEX)
            or 0
        ),
        phase=status.get("phase") or "Pending",
        node=(pod.get("spec") or {}).get("nodeName"),
        state=state,
        reason=reason,
        message=message,
        restarts=int(mine.get("restartCount") or 0) if mine else 0,
        exit_code=code,
    )


class Client:
    """FineTuneJobs of one cluster, as its user. namespace: default for every call (else the
    context's, as kubectl's); context, kubeconfig: as kubectl's --context and --kubeconfig."""

    def __init__(
        self,
        namespace: str | None = None,
        *,
        context: str | None = None,
        kubeconfig: str | None = None,
    ) -> None:
        api, target = connect(kubeconfig, context)
        self.kube = Kube(api, target)
        self.target: Target = target
        self.namespace = namespace or target.namespace

    def _ns(self, namespace: str | None) -> str:
        return namespace or self.namespace

    # Creating
    def submit(
        self, job: FineTuneJob | dict[str, Any] | str | Path, namespace: str | None = None
    ) -> FineTuneJob:
        """Creates one FineTuneJob: a FineTuneJob, its manifest as a dict, or a YAML file with
        one FineTuneJob in it. Checked first as `kubetune validate` checks it (Invalid: the
        problems, with the file's lines); generateName is left to the API server."""
        from kubetune.client import manifests

        created = self.create_all(manifests.bodies(job), namespace)
        jobs = [c for c in created if isinstance(c, FineTuneJob)]
        if len(jobs) != 1:
            raise ClientError(f"expected one FineTuneJob, created {len(jobs)}")
        return jobs[0]

    def create_all(
        self, bodies: list[dict[str, Any]], namespace: str | None = None
    ) -> list[FineTuneJob | FineTuneSchedule]:
        """Creates checked manifests (manifests.bodies) in order; returns what was created."""
        created: list[FineTuneJob | FineTuneSchedule] = []
        for body in bodies:
            meta = body.setdefault("metadata", {})
            ns = meta.get("namespace") or self._ns(namespace)
            if namespace and meta.get("namespace") and meta["namespace"] != namespace:
                raise ClientError(
                    f"{body['kind']} {meta.get('name') or meta.get('generateName')}: its "
                    f"metadata.namespace is {meta['namespace']}, not -n {namespace}; remove "
                    "one of them"
                )
            meta["namespace"] = ns
            if body["kind"] == SCHEDULE_KIND:
                raw = self.kube.create(ns, body, SCHEDULE_PLURAL)
                created.append(FineTuneSchedule.model_validate(raw, by_name=False, strict=False))
            else:
                created.append(parse_job(self.kube.create(ns, body)))
        return created

    # Reading
    def get(self, name: str, namespace: str | None = None) -> FineTuneJob:
        ns = self._ns(namespace)
        try:
            return parse_job(self.kube.get(ns, name))
        except NotFound:
            raise NotFound(
                f"FineTuneJob {name} not found in namespace {ns} (kubetune get -n {ns} lists them)"
            ) from None

    def list(self, namespace: str | None = None, all_namespaces: bool = False) -> list[FineTuneJob]:
        """The FineTuneJobs of the namespace (or of all), oldest first."""
        answer = self.kube.list(None if all_namespaces else self._ns(namespace))
        jobs = [parse_job(item) for item in answer.get("items") or []]
        return sorted(jobs, key=lambda j: (str(j.metadata.creation_timestamp), j.metadata.name))

    def describe(self, name: str, namespace: str | None = None) -> Description:
        ns = self._ns(namespace)
        job = self.get(name, ns)
        events = self.kube.events(ns, KIND, name)
        events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        run_id = job.status.run_id if job.status else None
        pods = []
        if run_id:
            selector = f"{JOB_LABEL}={name},{RUN_LABEL}={run_id}"
            pods = [_pod_state(p) for p in self.kube.pods(ns, selector)]
            pods.sort(key=lambda p: (p.index, p.name))
        return Description(job, events, pods)

    def watch(
        self, name: str, namespace: str | None = None, timeout: float | None = None
    ) -> Iterator[FineTuneJob]:
        """The job now, then each change of it, until it has finished (Succeeded or Failed:
        the last one yielded) or timeout seconds have passed. Raises NotFound when it is
        deleted meanwhile."""
        ns = self._ns(namespace)
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(name, ns)
        yield job
        version = str(job.metadata.resource_version or "")
        while job.status is None or job.status.phase not in FINAL_PHASES:
            left = WATCH_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return
            try:
                for event in self.kube.watch(ns, name, version, int(min(left, WATCH_SECONDS)) + 1):
                    kind, raw = event["type"], event["object"]
                    if kind == "DELETED":
                        raise NotFound(f"FineTuneJob {ns}/{name} was deleted")
                    if kind not in ("ADDED", "MODIFIED"):
                        continue
                    job = parse_job(raw)
                    version = str(job.metadata.resource_version or version)
                    yield job
                    if job.status is not None and job.status.phase in FINAL_PHASES:
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        return
            except Gone:  # the version is too old to watch from: start again from now
                job = self.get(name, ns)
                version = str(job.metadata.resource_version or "")
                yield job

    def wait(
        self,
        name: str,
        namespace: str | None = None,
        phase: str | tuple[str, ...] = FINAL_PHASES,
        timeout: float | None = None,
    ) -> FineTuneJob:
        """The job once its phase is one of `phase` (default: finished). Ended: it finished
        in another phase; TimeoutError: not within timeout seconds."""
        wanted = (phase,) if isinstance(phase, str) else tuple(phase)
        job = None
        for job in self.watch(name, namespace, timeout):
            current = job.status.phase if job.status else None
            if current in wanted:
                return job
            if current in FINAL_PHASES:
                why = job.status.message if job.status else ""
                raise Ended(
                    f"FineTuneJob {name} ended {current}, not {' or '.join(wanted)}: {why}", job
                )
        shown = job.status.phase if job and job.status else "no phase yet"
        raise TimeoutError(
            f"FineTuneJob {name} is {shown} after {timeout:.0f} s, not {' or '.join(wanted)}"
            if timeout is not None
            else f"FineTuneJob {name}: the watch ended"
        )

    # Changing
    def cancel(self, name: str, namespace: str | None = None, delete: bool = False) -> str:
        """Stops a run: suspends it (spec.suspend; its pods are removed, its checkpoints and
        status kept, nothing is promoted; `resume` continues it), or with delete removes the
        FineTuneJob (its pods with it; what it wrote to object storage stays). A finished run
        has nothing to stop. Returns what was done, in a sentence."""
        ns = self._ns(namespace)
        job = self.get(name, ns)
        phase = job.status.phase if job.status else None
        if delete:
            self.kube.delete(ns, name)
            return f"FineTuneJob {name} deleted (phase was {phase or 'none'})"
        if phase in FINAL_PHASES:
            promoted = " (its promotion stands: kubetune rollback undoes it)" * (
                phase == "Succeeded"
            )
            return f"FineTuneJob {name} already {phase}: nothing to cancel{promoted}"
        if job.spec.suspend:
            return f"FineTuneJob {name} is already suspended"
        self.kube.patch(ns, name, {"spec": {"suspend": True}})
        return (
            f"FineTuneJob {name} suspended: its pods are being removed; nothing is promoted; "
            f"`kubetune resume {name}` continues it from its last checkpoint"
        )

    def resume(self, name: str, namespace: str | None = None) -> str:
        ns = self._ns(namespace)
        job = self.get(name, ns)
        if not job.spec.suspend:
            return f"FineTuneJob {name} is not suspended"
        self.kube.patch(ns, name, {"spec": {"suspend": False}})
        return f"FineTuneJob {name} resumed"

    # The trainer's log and files
    def logs(
        self,
        name: str,
        namespace: str | None = None,
        follow: bool = False,
        rank: int = 0,
    ) -> Iterator[str]:
        """The trainer's log, line by line: from the newest pod of node rank `rank` while it
        is there, else the run's archived trainer.log in object storage (rank 0's)."""
        from kubetune.client import artifacts

        ns = self._ns(namespace)
        job = self.get(name, ns)
        run_id = job.status.run_id if job.status else None
        if not run_id:
            raise NotFound(f"FineTuneJob {name} has no run yet (kubetune describe {name} says why)")
        listed = sorted(
            self.kube.pods(ns, f"{JOB_LABEL}={name},{RUN_LABEL}={run_id}"),
            key=lambda raw: str((raw.get("metadata") or {}).get("creationTimestamp") or ""),
        )
        pods = [p for p in (_pod_state(raw) for raw in listed) if p.index == rank]
        started = [p for p in pods if p.state in ("running", "terminated")]
        if started:
            newest = started[-1]  # pods are sorted oldest first
            try:
                yield from self.kube.pod_log(ns, newest.name, CONTAINER, follow)
                return
            except NotFound:
                pass  # deleted meanwhile: the archive has it
        if pods and not started and pods[-1].phase == "Pending":
            raise NotFound(
                f"the trainer of {name} has not started yet ({pods[-1].reason or pods[-1].phase}"
                f"): kubetune describe {name} says why"
            )
        yield from artifacts.archived_log(self, job, rank)

    def pull(
        self,
        name: str | None = None,
        to: str | Path | None = None,
        *,
        promoted: str | None = None,
        namespace: str | None = None,
    ) -> Pulled:
        """A finished run's adapter (or merged model), report.md, loss.png, metrics.json and
        result.json into `to` (default ./NAME-RUNID, or ./promoted-RUNID), each checked
        against the run's manifest.json (nothing is left there when one does not match);
        promoted=OUTPUT_URI: the run latest.json names."""
        from kubetune.client import artifacts

        return artifacts.pull(self, name, Path(to) if to else None, promoted, self._ns(namespace))

    def rollback(
        self,
        target: str,
        to: str | None = None,
        reason: str | None = None,
        namespace: str | None = None,
    ) -> RolledBack:
        """Makes an earlier run the promoted one again: target is an output URI or a
        FineTuneSchedule's name; to: the run (default: latest.json's previousRunId)."""
        from kubetune.client import artifacts

        return artifacts.rollback(self, target, to, reason, self._ns(namespace))
