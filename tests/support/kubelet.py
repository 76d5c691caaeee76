"""A test "node": the batch/v1 Job controller, the TTL-after-finished controller, a scheduler
and a kubelet, for the emulated API server. Each behaviour is the real one's, cited:

- Job controller (kubernetes.io/docs/concepts/workloads/controllers/job/): creates the pod from
  the template, owned by the Job; `status.active` counts every pod that is not terminal, Pending
  ones included, and `ready` the Running ones. On success it first adds `SuccessCriteriaMet`
  and, only once the pods are terminated and accounted for, `Complete` with `completionTime`; on
  failure `FailureTarget` first, then `Failed` with the same reason (the documented order since
  Kubernetes 1.31, "Terminal Job conditions"); `terminal_delay` is that window. Failures follow
  the podFailurePolicy (FailJob on exit codes, Ignore for DisruptionTarget), then backoffLimit
  (BackoffLimitExceeded); activeDeadlineSeconds gives DeadlineExceeded; a suspended Job's pods
  are deleted. "Failed Pods associated with the Job are recreated by the Job controller with an
  exponential back-off delay (10s, 20s, 40s ...) capped at six minutes" (.../job/#pod-backoff-
  failure-policy): after n counted failures the next pod waits `pod_failure_backoff` x 2^(n-1)
  seconds from the last one (a distributed run's group restart: the old group is gone first).
- Indexed Jobs (.../controllers/job/#completion-mode): `completionMode: Indexed` runs
  `parallelism` pods at a time until each index 0..completions-1 has one succeeded pod (then
  SuccessCriteriaMet and Complete, `completedIndexes`); a pod is named `<job>-<index>-<random>`,
  carries the index as the annotation and (Kubernetes 1.28+) label
  `batch.kubernetes.io/job-completion-index`, gets the env `JOB_COMPLETION_INDEX` and the
  hostname `<job>-<index>`; a failed pod is replaced at its index and counts against
  backoffLimit (failures of all indexes together); when the Job fails, its other pods are
  terminated.
- TTL-after-finished controller (.../controllers/ttlafterfinished/): `ttlSecondsAfterFinished`
  after the Complete or Failed condition, the Job is deleted with its pods (cascading).
- Scheduler: a pod whose nodeSelector the node's labels do not match, or that asks for more of
  an extended resource (nvidia.com/gpu) than the node has, stays Pending with
  `PodScheduled=False`, reason `Unschedulable` and the scheduler's "0/1 nodes are available" text.
- Kubelet: a scheduled pod is Pending (container waiting: ContainerCreating) until its
  container starts; an image under an unpullable prefix waits in ErrImagePull/ImagePullBackOff
  (they alternate, as the kubelet's back-off does); a Secret named by envFrom that does not exist
  waits in CreateContainerConfigError `secret "NAME" not found` and starts once it exists.

It runs no process: each pod "trains" for `fake_seconds` and ends with a valid TrainerResult as
its termination message (the scale benchmark's fast fake trainer). Each pod's `metrics` port is
a free port (or one of `fake_metrics_ports`, servers the caller runs), written into the pod's
spec, where the operator looks for it. The real trainer runs in pods on the real control plane,
whose kubelet is the node agent (tests/support/node.py).
"""

from __future__ import annotations

import base64
import json
import secrets
import signal
import threading
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import TEST_AGENT, Client
from tests.support.node import free_port as _free_port
from tests.support.node import now as _now

TERMINATION_LIMIT = 4096
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def _index_ranges(indexes: set[int]) -> str:
    """completedIndexes as the Job controller writes it: "0-2,4"."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def _condition(kind: str, reason: str, message: str = "", status: str = "True") -> dict[str, Any]:
    now = _now()
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }


@dataclass
class PodRun:
    name: str
    namespace: str
    job_uid: str
    directory: Path
    started: float = field(default_factory=time.monotonic)
    disrupted: bool = False
    killed: bool = False
    fake_result: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # the pod's spec, as created
    running: bool = False  # the container started (the pod is Running)
    waiting: str = ""  # the waiting reason last reported while Pending
    started_at: str = ""
    index: int | None = None  # the completion index of an Indexed Job's pod
    metadata: dict[str, Any] = field(default_factory=dict)  # the pod's, for the downward API


@dataclass
class JobState:
    pods: int = 0
    failed: int = 0
    active: PodRun | None = None
    indexed: dict[int, PodRun] = field(default_factory=dict)  # an Indexed Job's active pods
    succeeded: set[int] = field(default_factory=set)  # an Indexed Job's completed indexes
    started_at: float | None = None
    last_failure: float | None = None  # when the newest counted failure happened
    done: bool = False
    # The terminal window: the condition to add (Complete or Failed) and when.
    terminal: tuple[float, dict[str, Any], dict[str, Any]] | None = None
    finished_at: float | None = None  # when Complete or Failed was added

    def runs(self) -> list[PodRun]:
        return ([self.active] if self.active else []) + list(self.indexed.values())


class Kubelet:
    def __init__(
        self,
        url: str,
        workdir: Path,
        env: dict[str, str] | None = None,
        fake_seconds: float = 0.5,
        interval: float = 0.1,
        terminal_delay: float = 1.0,
        start_delay: float = 0.2,
        node_labels: dict[str, str] | None = None,
        gpus: int = 8,
        unpullable: tuple[str, ...] = ("unreachable.example.com/",),
        watch: bool = False,
        fake_metrics_ports: tuple[int, ...] = (),
        parallel: int = 1,
        pod_failure_backoff: float = 10.0,
    ) -> None:
        self.api = Client(url)
        self.pod_failure_backoff = pod_failure_backoff
        self.terminal_delay = terminal_delay
        self.start_delay = start_delay
        self.node_labels = node_labels or {
            "kubernetes.io/os": "linux",
            "kubernetes.io/hostname": "test-node",
        }
        self.gpus = gpus
        self.unpullable = unpullable
        self.workdir = workdir
        self.env = env or {}
        self.fake_seconds = fake_seconds
        self.interval = interval
        self.jobs: dict[str, JobState] = {}
        # watch: Jobs come from a list+watch cache (as the real Job controller's informer)
        # instead of a list every pass; the scale benchmark needs it at thousands of Jobs.
        self.watch = watch
        self._watched: dict[str, dict[str, Any]] | None = None
        # The fake trainer's metrics: pods get these ports in turn (servers the caller runs).
        self.fake_metrics_ports = fake_metrics_ports
        self._pods_started = 0
        # parallel: Jobs synced at a time in a pass (the real controllers have worker pools).
        self._pool = ThreadPoolExecutor(parallel) if parallel > 1 else None
        self.errors: list[str] = []
        self.pass_seconds: list[float] = []  # how long each pass over every Job took
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)

    # -- control --------------------------------------------------------------------------

    def start(self) -> Kubelet:
        if self.watch:
            threading.Thread(target=self._watch_jobs, name="kubelet-watch", daemon=True).start()
        self._thread.start()
        return self

    def _watch_jobs(self) -> None:
        """List, then watch from the list's resourceVersion; list again after 410 or an error."""
        path = "/apis/batch/v1/jobs"
        while not self._stop.is_set():
            try:
                listing = self.api.request("GET", path)
                jobs = {j["metadata"]["uid"]: j for j in listing["items"]}
                with self._lock:
                    self._watched = jobs
                since = listing["metadata"]["resourceVersion"]
                url = f"{self.api.url}{path}?watch=true&resourceVersion={since}"
                request = urllib.request.Request(url, headers={"User-Agent": TEST_AGENT})
                with urllib.request.urlopen(request, timeout=3600) as stream:
                    for line in stream:
                        if self._stop.is_set():
                            return
                        event = json.loads(line) if line.strip() else {}
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            break
                        uid = (obj.get("metadata") or {}).get("uid")
                        if not uid:
                            continue
                        with self._lock:
                            if event["type"] == "DELETED":
                                jobs.pop(uid, None)
                            else:
                                jobs[uid] = obj
            except Exception:  # the emulator going away at the end, mostly
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        with self._lock:
            for state in self.jobs.values():
                for run in state.runs():
                    self._kill(run)

    def running_pods(self) -> list[PodRun]:
        with self._lock:
            return [run for s in self.jobs.values() for run in s.runs() if run.running]

    def kill(self, pod_name: str, disruption: bool = False) -> None:
        """End a pod as an OOM kill (exit 137, OOMKilled) or, with disruption, a preemption
        (DisruptionTarget) would."""
        with self._lock:
            for state in self.jobs.values():
                for run in state.runs():
                    if run.name == pod_name:
                        run.disrupted = disruption
                        self._kill(run)
                        return
        raise KeyError(pod_name)

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._sync()
            except Exception:  # keep the node alive; tests assert on errors
                self.errors.append(traceback.format_exc())
            self.pass_seconds.append(time.monotonic() - started)  # the scale benchmark's
            self._stop.wait(self.interval)

    def _sync(self) -> None:
        if self.watch:
            with self._lock:
                if self._watched is None:
                    return  # not listed yet
                jobs = dict(self._watched)
        else:
            jobs = {j["metadata"]["uid"]: j for j in self.api.list("jobs")}
        with self._lock:
            for uid in list(self.jobs):
                if uid not in jobs:  # the Job was deleted; its pods went with it
                    for run in self.jobs.pop(uid).runs():
                        self._kill(run)
            pairs = [(self.jobs.setdefault(uid, JobState()), job) for uid, job in jobs.items()]
            if self._pool is None:
                for state, job in pairs:
                    self._sync_job(state, job)
            else:
                for failure in self._pool.map(self._sync_one, pairs):
                    if failure:
                        self.errors.append(failure)

    def _sync_one(self, pair: tuple[JobState, dict[str, Any]]) -> str | None:
        try:
            self._sync_job(*pair)
        except Exception:
            return traceback.format_exc()
        return None

    def _sync_job(self, state: JobState, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        ns = meta["namespace"]
        if state.done:
            self._finish_terminal(state, job)
            ttl = spec.get("ttlSecondsAfterFinished")
            if (
                ttl is not None
                and state.finished_at is not None
                and time.monotonic() - state.finished_at >= float(ttl)
            ):
                # The TTL-after-finished controller deletes the Job cascadingly.
                self.api.delete("jobs", ns, meta["name"], policy="Foreground")
            return
        if spec.get("suspend"):
            for run in state.runs():
                self._kill(run)
                self.api.delete("pods", ns, run.name)
            state.active = None
            state.indexed.clear()
            self._job_status(
                job, {"active": 0, "ready": 0}, _condition("Suspended", "JobSuspended")
            )
            return
        deadline = spec.get("activeDeadlineSeconds")
        started = state.started_at
        if deadline is not None and started is not None and time.monotonic() - started > deadline:
            for run in state.runs():
                self._kill(run)
                self._finish_pod(run, -9, "DeadlineExceeded")
            state.active = None
            state.indexed.clear()
            self._fail(
                state, job, "DeadlineExceeded", "Job was active longer than specified deadline"
            )
            return
        if spec.get("completionMode") == "Indexed":
            self._sync_indexed(state, job)
            return
        if state.active is None:
            if self._backing_off(state):
                return
            self._start_pod(state, job)
            return
        if not state.active.running:
            self._try_to_run(state.active, job)
            return
        exit_code = self._exit_code(state.active)
        if exit_code is None:
            return
        run, state.active = state.active, None
        self._finish_pod(run, exit_code, "Completed" if exit_code == 0 else "Error")
        if exit_code == 0:
            self._job_status(
                job,
                {"active": 0, "ready": 0, "succeeded": 1},
                _condition("SuccessCriteriaMet", "CompletionsReached"),
            )
            self._terminal(
                state,
                {"completionTime": None},
                _condition(
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
                ),
            )
            return
        action, message = self._failure_policy(spec, run, exit_code)
        if action == "FailJob":
            self._fail(state, job, "PodFailurePolicy", message)
            return
        if action == "Ignore":
            self._job_status(job, {"active": 0, "ready": 0})
            return  # not counted: a new pod starts on the next pass
        state.failed += 1
        state.last_failure = time.monotonic()
        self._job_status(job, {"active": 0, "ready": 0, "failed": state.failed})
        if state.failed > int(spec.get("backoffLimit", 6)):
            self._fail(
                state, job, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            )

    def _backing_off(self, state: JobState) -> bool:
        """Whether a failed pod's replacement must still wait (the Job controller's back-off)."""
        if state.last_failure is None or state.failed == 0:
            return False
        delay = min(360.0, self.pod_failure_backoff * 2 ** (state.failed - 1))
        return time.monotonic() < state.last_failure + delay

    def _failure_policy(self, spec: dict[str, Any], run: PodRun, exit_code: int) -> tuple[str, str]:
        """The podFailurePolicy's verdict on a failed pod: FailJob, Ignore or Count."""
        for index, rule in enumerate((spec.get("podFailurePolicy") or {}).get("rules") or []):
            on_codes = rule.get("onExitCodes")
            on_conditions = rule.get("onPodConditions")
            if on_codes and exit_code in on_codes.get("values", []) and rule["action"] == "FailJob":
                return "FailJob", (
                    f"Container trainer for pod {run.namespace}/{run.name} failed with exit code "
                    f"{exit_code} matching FailJob rule at index {index}"
                )
            if on_conditions and run.disrupted and rule["action"] == "Ignore":
                return "Ignore", ""
        return "Count", ""

    def _sync_indexed(self, state: JobState, job: dict[str, Any]) -> None:
        """An Indexed Job: a pod per index, each replaced when it fails, complete when every
        index has succeeded."""
        spec = job["spec"]
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism", completions))
        for index in range(completions):
            if len(state.indexed) >= parallelism or self._backing_off(state):
                break
            if index not in state.succeeded and index not in state.indexed:
                self._start_pod(state, job, index)
        for index, run in sorted(state.indexed.items()):
            if not run.running:
                self._try_to_run(run, job)
                continue
            exit_code = self._exit_code(run)
            if exit_code is None:
                continue
            del state.indexed[index]
            self._finish_pod(run, exit_code, "Completed" if exit_code == 0 else "Error")
            if exit_code == 0:
                state.succeeded.add(index)
                continue
            action, message = self._failure_policy(spec, run, exit_code)
            if action == "Ignore":
                continue
            if action == "Count":
                state.failed += 1
                state.last_failure = time.monotonic()
            if action == "FailJob" or state.failed > int(spec.get("backoffLimit", 6)):
                for other in state.runs():  # the Job controller terminates the rest
                    self._kill(other)
                    self._finish_pod(other, 143, "Error")
                state.indexed.clear()
                if action == "FailJob":
                    self._fail(state, job, "PodFailurePolicy", message)
                else:
                    self._fail(
                        state,
                        job,
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    )
                return
        fields: dict[str, Any] = {
            "active": len(state.indexed),
            "ready": sum(run.running for run in state.indexed.values()),
            "succeeded": len(state.succeeded),
            "failed": state.failed,
            "completedIndexes": _index_ranges(state.succeeded),
        }
        if len(state.succeeded) < completions:
            self._job_status(job, fields)
            return
        self._job_status(job, fields, _condition("SuccessCriteriaMet", "CompletionsReached"))
        self._terminal(
            state,
            {"completionTime": None},
            _condition(
                "Complete", "CompletionsReached", "Reached expected number of succeeded pods"
            ),
        )

    def _fail(self, state: JobState, job: dict[str, Any], reason: str, message: str) -> None:
        self._job_status(
            job,
            {"active": 0, "ready": 0, "failed": max(state.failed, 1)},
            _condition("FailureTarget", reason, message),
        )
        self._terminal(state, {}, _condition("Failed", reason, message))

    def _terminal(self, state: JobState, fields: dict[str, Any], cond: dict[str, Any]) -> None:
        """The terminal condition comes once the pods are accounted for: terminal_delay later."""
        state.done = True
        state.terminal = (time.monotonic() + self.terminal_delay, fields, cond)

    def _finish_terminal(self, state: JobState, job: dict[str, Any]) -> None:
        if state.terminal is None or time.monotonic() < state.terminal[0]:
            return
        _, fields, cond = state.terminal
        state.terminal = None
        now = _now()
        cond = {**cond, "lastProbeTime": now, "lastTransitionTime": now}
        self._job_status(job, {k: v or now for k, v in fields.items()}, cond)
        state.finished_at = time.monotonic()

    def _job_status(
        self, job: dict[str, Any], fields: dict[str, Any], *conds: dict[str, Any]
    ) -> None:
        meta = job["metadata"]
        status = dict(job.get("status") or {})
        status.update(fields)
        if conds:
            kept = [
                c
                for c in status.get("conditions") or []
                if c["type"] not in {x["type"] for x in conds}
            ]
            status["conditions"] = kept + list(conds)
        elif not job["spec"].get("suspend"):
            status["conditions"] = [
                c for c in status.get("conditions") or [] if c["type"] != "Suspended"
            ]
        if status != (job.get("status") or {}):
            job["status"] = status
            try:
                self.api.patch(
                    "jobs", meta["namespace"], meta["name"], {"status": status}, status=True
                )
            except urllib.error.HTTPError as exc:
                # Deleted meanwhile: the Job controller's next sync finds it gone and forgets
                # it ("Job has been deleted", pkg/controller/job/job_controller.go syncJob).
                if exc.code != 404:
                    raise

    # -- pods -----------------------------------------------------------------------------

    def _start_pod(self, state: JobState, job: dict[str, Any], index: int | None = None) -> None:
        """Create the pod; it is Pending (and counted active) until its container starts."""
        meta = job["metadata"]
        ns = meta["namespace"]
        template = job["spec"]["template"]
        state.pods += 1
        pod_name = f"{meta['name']}-{state.pods}"
        spec = json.loads(json.dumps(template["spec"]))
        labels = {**(template.get("metadata") or {}).get("labels", {}), "job-name": meta["name"]}
        annotations: dict[str, str] = {}
        if index is not None:
            pod_name = f"{meta['name']}-{index}-{secrets.token_hex(3)[:5]}"
            labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
            spec["hostname"] = f"{meta['name']}-{index}"
            for container in spec["containers"]:
                container.setdefault("env", []).append(
                    {"name": "JOB_COMPLETION_INDEX", "value": str(index)}
                )
        self._pods_started += 1
        for p in spec["containers"][0].get("ports") or []:
            if p.get("name") == "metrics" and self.fake_metrics_ports:
                ports = self.fake_metrics_ports
                p["containerPort"] = ports[self._pods_started % len(ports)]
            elif p.get("name") == "metrics":
                p["containerPort"] = _free_port()  # a hostPort-like mapping on the shared node
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
        }
        self.api.create("pods", ns, pod)
        run = PodRun(pod_name, ns, meta["uid"], self.workdir / ns / pod_name, spec=spec)
        run.index, run.metadata = index, pod["metadata"]
        run.directory.mkdir(parents=True, exist_ok=True)
        if index is None:
            state.active = run
        else:
            state.indexed[index] = run
        if state.started_at is None:
            state.started_at = time.monotonic()
        self._pod_status(run, {"phase": "Pending"})
        fields: dict[str, Any] = {"active": len(state.runs()), "ready": 0}
        if not (job.get("status") or {}).get("startTime"):
            fields["startTime"] = _now()
        self._job_status(job, fields)

    def _blocker(self, run: PodRun, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The Pending pod status that keeps the container from starting, if any."""
        container = spec["containers"][0]
        selector = spec.get("nodeSelector") or {}
        unschedulable = None
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            unschedulable = "1 node(s) didn't match Pod's node affinity/selector"
        for resource, amount in ((container.get("resources") or {}).get("limits") or {}).items():
            if resource.endswith("/gpu") and int(amount) > self.gpus:
                unschedulable = f"1 Insufficient {resource}"
        if unschedulable:
            message = (
                f"0/1 nodes are available: {unschedulable}. preemption: 0/1 nodes are "
                "available: 1 Preemption is not helpful for scheduling."
            )
            return {
                "phase": "Pending",
                "conditions": [_condition("PodScheduled", "Unschedulable", message, "False")],
            }
        waiting = None
        for volume in spec.get("volumes") or []:
            ref = volume.get("configMap")
            if (
                waiting is None
                and ref
                and not ref.get("optional")
                and self.api.get("configmaps", run.namespace, ref["name"]) is None
            ):
                # The kubelet mounts volumes before it pulls or creates anything
                # (kubelet.syncPod: volumeManager.WaitForAttachAndMount) and retries while the
                # ConfigMap is missing: the pod stays ContainerCreating, with a FailedMount
                # event 'MountVolume.SetUp failed for volume ...: configmap "..." not found'.
                waiting = {"reason": "ContainerCreating"}
        image = container.get("image", "")
        if waiting is None and image.startswith(self.unpullable):
            reason = "ImagePullBackOff" if run.waiting == "ErrImagePull" else "ErrImagePull"
            waiting = {"reason": reason, "message": f'Back-off pulling image "{image}"'}
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if (
                waiting is None
                and ref
                and not ref.get("optional")
                and self.api.get("secrets", run.namespace, ref["name"]) is None
            ):
                message = f'secret "{ref["name"]}" not found'
                waiting = {"reason": "CreateContainerConfigError", "message": message}
        for item in container.get("env") or []:
            key_ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if waiting is None and key_ref and not key_ref.get("optional"):
                problem = self._secret_key(run.namespace, key_ref)[1]
                if problem:
                    waiting = {"reason": "CreateContainerConfigError", "message": problem}
        if waiting is None:
            return None
        return {
            "phase": "Pending",
            "conditions": [_condition("PodScheduled", "Scheduled")],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": waiting},
                }
            ],
        }

    def _try_to_run(self, run: PodRun, job: dict[str, Any]) -> None:
        spec = run.spec
        blocked = self._blocker(run, spec)
        if blocked is not None:
            reason = (
                ((blocked.get("containerStatuses") or [{}])[0].get("state") or {})
                .get("waiting", {})
                .get("reason")
            ) or "Unschedulable"
            if reason != run.waiting:
                run.waiting = reason
                self._pod_status(run, blocked)
            return
        if time.monotonic() - run.started < self.start_delay:
            return
        container = spec["containers"][0]
        run.started = time.monotonic()
        labels = (job["spec"]["template"].get("metadata") or {}).get("labels", {})
        run.fake_result = {
            "runId": labels.get("kubetune.dev/run-id"),
            "outcome": "Succeeded",
            "exitCode": 0,
            "message": "fake trainer: done",
            "steps": 10,
        }
        run.running, run.started_at = True, _now()
        self._pod_status(
            run,
            {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "startTime": run.started_at,
                "conditions": [_condition("PodScheduled", "Scheduled")],
                "containerStatuses": [
                    {
                        "name": container["name"],
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": run.started_at}},
                    }
                ],
            },
        )
        if run.index is None:  # an Indexed Job's counts come from _sync_indexed
            self._job_status(job, {"active": 1, "ready": 1})

    def _pod_status(self, run: PodRun, status: dict[str, Any]) -> None:
        """Write the pod's status. A pod deleted on the server meanwhile (its Job's owner was
        deleted and the garbage collector took the pods) is not an error: the kubelet's status
        manager drops the update ("Pod does not exist on the server",
        pkg/kubelet/status/status_manager.go syncPod), and the next sync stops its run."""
        try:
            self.api.patch("pods", run.namespace, run.name, {"status": status}, status=True)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def _secret_key(self, namespace: str, ref: dict[str, Any]) -> tuple[str, str | None]:
        """A Secret's key for `valueFrom.secretKeyRef`, or the kubelet's error for it
        (kubelet_pods.go makeEnvironmentVariables): `secret "NAME" not found`, or `couldn't
        find key KEY in Secret NAMESPACE/NAME`."""
        secret = self.api.get("secrets", namespace, ref["name"])
        if secret is None:
            return "", f'secret "{ref["name"]}" not found'
        data = secret.get("data") or {}
        if ref["key"] not in data:
            return "", f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
        return base64.b64decode(data[ref["key"]]).decode(), None

    def _exit_code(self, run: PodRun) -> int | None:
        if run.killed:
            return -9
        if time.monotonic() - run.started >= self.fake_seconds:
            return 0
        return None

    def _kill(self, run: PodRun) -> None:
        run.killed = True

    def _finish_pod(self, run: PodRun, exit_code: int, reason: str) -> None:
        message = json.dumps(run.fake_result) if run.fake_result and not run.killed else ""
        conditions = (
            [_condition("DisruptionTarget", "PreemptionByScheduler")] if run.disrupted else []
        )
        self.api.patch(
            "pods",
            run.namespace,
            run.name,
            {
                "status": {
                    "phase": "Succeeded" if exit_code == 0 else "Failed",
                    "conditions": conditions,
                    "containerStatuses": [
                        {
                            "name": "trainer",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "terminated": {
                                    "exitCode": 137 if exit_code < 0 else exit_code,
                                    "reason": "OOMKilled"
                                    if exit_code < 0 and not run.disrupted
                                    else reason,
                                    "message": message,
                                    "startedAt": run.started_at or None,
                                    "finishedAt": _now(),
                                }
                            },
                        }
                    ],
                }
            },
            status=True,
        )


def main() -> None:
    """The test node as a process of its own (the scale benchmark runs it so, apart from the
    emulator): python -m tests.support.kubelet URL WORKDIR [options]."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--fake-seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--metrics-ports", default="")
    parser.add_argument("--stats", type=Path, help="write pass times here on SIGTERM")
    args = parser.parse_args()
    ports = tuple(int(p) for p in args.metrics_ports.split(",") if p)
    kubelet = Kubelet(
        args.url,
        args.workdir,
        fake_seconds=args.fake_seconds,
        interval=args.interval,
        watch=True,
        fake_metrics_ports=ports,
        parallel=args.parallel,
    ).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    kubelet._stop.set()
    if args.stats:
        passes = kubelet.pass_seconds
        args.stats.write_text(json.dumps({"passes": passes, "errors": kubelet.errors[:5]}))


if __name__ == "__main__":
    main()
