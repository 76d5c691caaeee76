"""The operator's Prometheus metrics: every one is declared here (docs/metrics.md lists them).

The trainer's metrics are declared in kubetune_trainer/telemetry.py; both sides prefix `kubetune_`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.api import FINAL_PHASES, PHASES, FineTuneJobStatus
from kubetune.controller.usage import added

WAITING = ("Pending", "Queued")


class Trigger(StrEnum):
    """What queued a reconcile first (the `trigger` label of the reconcile duration)."""

    ADDED = "added"  # a FineTuneJob seen for the first time (or the operator's own create)
    FINETUNEJOB = "finetunejob"  # a FineTuneJob changed
    CHILD = "child"  # one of its Jobs, pods, ConfigMaps or Services changed
    POLL = "poll"  # its trainer's metrics say something new
    RESYNC = "resync"  # the periodic look at every run that is not final
    RESUME = "resume"  # the operator started (or became leader): every object once
    RESUME_FINAL = "resume-final"  # the same, for a run that is final
    RETRY = "retry"  # a reconcile asked to be retried (backoff, or a time it waits for)
    PROFILE = "finetuneprofile"  # a FineTuneProfile changed: the runs that wait on it
    NAMESPACE = "namespace"  # a namespace's labels changed: the runs that wait on them
    SCHEDULE = "schedule"  # a FineTuneSchedule changed
    STAMPED = "stamped"  # a FineTuneJob a schedule stamped came, went, finished or was promoted
    TIMER = "timer"  # a schedule's next time came


# Fine-tuning runs last minutes to days.
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200)


class _PhaseCollector(Collector):
    """kubetune_operator_finetunejobs{namespace, phase}: every phase reported, 0 included."""

    def __init__(
        self,
        phases: dict[tuple[str, str], tuple[str, float]],
        lock: threading.Lock,
    ) -> None:
        self._phases = phases
        self._lock = lock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetune_operator_finetunejobs",
            "FineTuneJobs this operator manages, by namespace and phase.",
            labels=["namespace", "phase"],
        )
        oldest = GaugeMetricFamily(
            "kubetune_operator_oldest_in_phase_seconds",
            "How long the longest-waiting FineTuneJob has been Pending or Queued, by namespace.",
            labels=["namespace", "phase"],
        )
        now = time.monotonic()
        with self._lock:
            items = list(self._phases.items())
        counts = Tally((ns, phase) for (ns, _), (phase, _) in items)
        ages: dict[tuple[str, str], float] = {}
        for (ns, _), (phase, since) in items:
            if phase in WAITING:
                ages[ns, phase] = max(ages.get((ns, phase), 0.0), now - since)
        for namespace in sorted({ns for (ns, _), _ in items}):
            for phase in PHASES:
                family.add_metric([namespace, phase], counts[namespace, phase])
            for phase in WAITING:
                oldest.add_metric([namespace, phase], ages.get((namespace, phase), 0.0))
        yield family
        yield oldest


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # (namespace, name) -> (phase, time.monotonic() when that phase was first seen)
        self._phases: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        r.register(_PhaseCollector(self._phases, self._lock))
        self.transitions = Counter(
            "kubetune_operator_phase_transitions_total",
            "FineTuneJob phase changes written by the operator.",
            ["namespace", "from_phase", "to_phase"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "kubetune_operator_reconcile_duration_seconds",
            "Time to reconcile one FineTuneJob, by what triggered it.",
            ["trigger"],
            registry=r,
        )
        self.job_duration = Histogram(
            "kubetune_operator_job_duration_seconds",
            "Run time of finished runs (Job start to completion), by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.gate_results = Counter(
            "kubetune_operator_gate_results_total",
            "Evaluation gate verdicts of finished runs, by metric and outcome.",
            ["metric", "outcome"],
            registry=r,
        )
        self.api_errors = Counter(
            "kubetune_operator_api_errors_total",
            "Kubernetes API calls that failed, by operation and HTTP status (0: no response).",
            ["operation", "code"],
            registry=r,
        )

        self.reconcile_errors = Counter(
            "kubetune_operator_reconcile_errors_total",
            "Reconciles that could not act for a reason that is not the user's, by reason "
            "(OperatorForbidden: the operator's RBAC; ResourceMissing: an API or namespace it "
            "needs; QuotaExceeded).",
            ["reason"],
            registry=r,
        )

        # Usage for chargeback: what each written status.usage adds to the one before it, so a
        # restart of the operator neither loses nor counts twice what its runs used.
        usage_labels = ["namespace", "profile"]
        self.usage_gpu_seconds = Counter(
            "kubetune_operator_usage_gpu_seconds",
            "GPU-seconds used by trainer pods (GPUs times trainer run time), by namespace and "
            "profile (empty: none).",
            usage_labels,
            registry=r,
        )
        self.usage_cpu_seconds = Counter(
            "kubetune_operator_usage_cpu_seconds",
            "CPU-seconds used by trainer pods (requested cores times trainer run time).",
            usage_labels,
            registry=r,
        )
        self.usage_tokens = Counter(
            "kubetune_operator_usage_tokens",
            "Real (not padding) tokens trained.",
            usage_labels,
            registry=r,
        )
        self.usage_cost = Counter(
            "kubetune_operator_usage_estimated_cost",
            "Estimated cost of the usage, at the prices of the runs' profiles.",
            [*usage_labels, "currency"],
            registry=r,
        )

    def serve(self, port: int, address: str) -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def api_error(self, operation: str, code: int) -> None:
        self.api_errors.labels(operation, str(code)).inc()

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def observe(
        self,
        namespace: str,
        name: str,
        before: FineTuneJobStatus,
        after: FineTuneJobStatus,
        written: bool,
    ) -> None:
        """Record one reconcile's result: the phase table, and a transition when one was written."""
        phase = after.phase or "Pending"
        with self._lock:
            known = self._phases.get((namespace, name))
            if known is None or known[0] != phase:
                self._phases[namespace, name] = (phase, time.monotonic())
        if written:
            self._usage(namespace, before, after)
        if not written or before.phase == after.phase:
            return
        self.transitions.labels(namespace, before.phase or "", phase).inc()
        if phase in FINAL_PHASES and after.start_time and after.completion_time:
            seconds = (after.completion_time - after.start_time).total_seconds()
            self.job_duration.labels(phase).observe(max(0.0, seconds))
        if phase in FINAL_PHASES:
            for gate in after.gates:
                self.gate_results.labels(gate.metric, "passed" if gate.passed else "failed").inc()

    def _usage(self, namespace: str, before: FineTuneJobStatus, after: FineTuneJobStatus) -> None:
        kept = before.usage if before.run_id == after.run_id else None  # a new run: all of it
        gpu, cpu, tokens, cost = added(kept, after.usage)
        profile = after.profile.name if after.profile else ""
        if gpu:
            self.usage_gpu_seconds.labels(namespace, profile).inc(gpu)
        if cpu:
            self.usage_cpu_seconds.labels(namespace, profile).inc(cpu)
        if tokens:
            self.usage_tokens.labels(namespace, profile).inc(tokens)
        if cost and after.usage and after.usage.currency:
            self.usage_cost.labels(namespace, profile, after.usage.currency).inc(cost)
