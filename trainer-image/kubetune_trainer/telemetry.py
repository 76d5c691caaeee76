"""Progress reporting: every trainer metric is declared here, and reporters receive events.

The trainer serves these on a port as Prometheus metrics (the operator reads them into
`status.progress`); `kubetune run` also draws a progress bar from the same events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Enum, Gauge, Info, start_http_server

from kubetune.api.wire import Stage, TrainerMetric

log = logging.getLogger("kubetune_trainer")

STAGES = [stage.value for stage in Stage]


@dataclass
class StepInfo:
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None  # of the whole run, every rank's tokens
    tokens: int | None = None  # real tokens trained so far, every rank's (from the checkpoint on)
    eta_seconds: float | None = None
    # Each rank's (peak resident memory, peak GPU memory or None), by rank.
    rank_memory: list[tuple[int, int | None]] | None = None


class Reporter(Protocol):
    def stage(self, name: str, detail: str = "") -> None: ...
    def step(self, info: StepInfo) -> None: ...
    def eval_loss(self, step: int, loss: float) -> None: ...


class TrainerMetrics:
    """The trainer's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info(TrainerMetric.INFO, "The run this trainer serves.", registry=r)
        self.stage = Enum(TrainerMetric.STAGE, "Pipeline stage.", states=STAGES, registry=r)
        self.step = Gauge(TrainerMetric.STEP, "Optimizer steps done.", registry=r)
        self.total_steps = Gauge(
            TrainerMetric.TOTAL_STEPS, "Optimizer steps the run will take.", registry=r
        )
        self.epoch = Gauge(TrainerMetric.EPOCH, "Fractional epoch reached.", registry=r)
        self.train_loss = Gauge(TrainerMetric.TRAIN_LOSS, "Latest training loss.", registry=r)
        self.eval_loss = Gauge(TrainerMetric.EVAL_LOSS, "Latest validation loss.", registry=r)
        self.learning_rate = Gauge(
            TrainerMetric.LEARNING_RATE, "Current learning rate.", registry=r
        )
        self.tokens_per_second = Gauge(
            TrainerMetric.TOKENS_PER_SECOND,
            "Training throughput in tokens per second.",
            registry=r,
        )
        self.tokens = Gauge(
            TrainerMetric.TOKENS,
            "Real (not padding) tokens trained so far, every process's; a resumed run counts "
            "from its checkpoint.",
            registry=r,
        )
        self.eta_seconds = Gauge(
            TrainerMetric.ETA_SECONDS, "Estimated seconds left in training.", registry=r
        )
        self.gpu_memory_bytes = Gauge(
            TrainerMetric.GPU_MEMORY_BYTES,
            "Peak GPU memory allocated by the trainer.",
            registry=r,
        )
        self.rank_memory_bytes = Gauge(
            TrainerMetric.RANK_MEMORY_BYTES,
            "Peak memory of each process of a distributed run (kind: rss or gpu).",
            ["rank", "kind"],
            registry=r,
        )
        self.world_size = Gauge(
            TrainerMetric.WORLD_SIZE, "Trainer processes of the run.", registry=r
        )
        self.world_size.set(1)


class PrometheusReporter:
    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.metrics.registry)

    def stage(self, name: str, detail: str = "") -> None:
        self.metrics.stage.state(name)

    def step(self, info: StepInfo) -> None:
        m = self.metrics
        m.step.set(info.step)
        m.total_steps.set(info.total_steps)
        m.epoch.set(info.epoch)
        for gauge, value in (
            (m.train_loss, info.loss),
            (m.learning_rate, info.learning_rate),
            (m.tokens_per_second, info.tokens_per_second),
            (m.eta_seconds, info.eta_seconds),
            (m.tokens, info.tokens),
        ):
            if value is not None:
                gauge.set(value)
        _record_gpu_memory(m)
        for rank, (rss, gpu) in enumerate(info.rank_memory or ()):
            m.rank_memory_bytes.labels(str(rank), "rss").set(rss)
            if gpu is not None:
                m.rank_memory_bytes.labels(str(rank), "gpu").set(gpu)

    def eval_loss(self, step: int, loss: float) -> None:
        self.metrics.eval_loss.set(loss)


def _record_gpu_memory(metrics: TrainerMetrics) -> None:
    import torch

    if torch.cuda.is_available():
        metrics.gpu_memory_bytes.set(torch.cuda.max_memory_allocated())


class LogReporter:
    """Log lines for the pod log: one per stage and one every few percent of training."""

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every = every_seconds
        self.last = 0.0

    def stage(self, name: str, detail: str = "") -> None:
        log.info("Stage %s %s", name, detail)

    def step(self, info: StepInfo) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or info.step == info.total_steps:
            self.last = now
            log.info(
                "Step step=%d total=%d epoch=%.2f loss=%s tokens_per_second=%s eta_seconds=%s",
                info.step,
                info.total_steps,
                info.epoch,
                _fmt(info.loss),
                _fmt(info.tokens_per_second),
                _fmt(info.eta_seconds),
            )

    def eval_loss(self, step: int, loss: float) -> None:
        log.info("Evaluated step=%d eval_loss=%.4f", step, loss)


class Reporters:
    """Fans every event out to several reporters."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def stage(self, name: str, detail: str = "") -> None:
        for r in self.reporters:
            r.stage(name, detail)

    def step(self, info: StepInfo) -> None:
        for r in self.reporters:
            r.step(info)

    def eval_loss(self, step: int, loss: float) -> None:
        for r in self.reporters:
            r.eval_loss(step, loss)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
