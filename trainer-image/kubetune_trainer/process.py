"""A trainer process: its logging, its config read, its part of the run with the metrics it
serves, and the pod's command around it (the result written to the termination message, the exit
code returned). `python -m kubetune_trainer` runs one process (`__main__.py`);
`python -m kubetune_trainer.launch` starts several, each of which runs `run_process`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from kubetune.api import ExitCode, TrainerConfig, TrainerResult, describe_errors
from kubetune.api.wire import CONFIG_PATH, DEFAULT_WORK_DIR, Env
from kubetune_trainer import distributed
from kubetune_trainer.pipeline import run
from kubetune_trainer.telemetry import (
    LogReporter,
    PrometheusReporter,
    Reporter,
    Reporters,
    TrainerMetrics,
)

log = logging.getLogger("kubetune_trainer")


def config_path(argv: list[str]) -> Path:
    return Path(argv[0] if argv else os.environ.get(Env.CONFIG, CONFIG_PATH))


def setup_logging(rank: distributed.Rank) -> None:
    prefix = f"[rank {rank.rank}] " if rank.distributed else ""
    level = os.environ.get(Env.LOG_LEVEL, "INFO")
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s {prefix}%(message)s", force=True
    )
    for handler in logging.getLogger().handlers:  # the pipeline's own logger says INFO
        handler.setLevel(level)


def load_config(path: Path) -> TrainerConfig | None:
    """The config, or None after logging why it cannot be read."""
    try:
        return TrainerConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        lines = (
            describe_errors(exc, TrainerConfig) if isinstance(exc, ValidationError) else [str(exc)]
        )
        for line in lines:
            log.error("Invalid config %s: %s", path, line)
        return None


def run_process(config: TrainerConfig) -> TrainerResult:
    """This process's part of the run. Rank 0 serves the metrics (the run's progress, its
    throughput over every rank, each rank's memory) and logs progress; the others log only
    what they do themselves."""
    rank = distributed.current()
    reporters: list[Reporter] = []
    if rank.main:
        metrics = TrainerMetrics()
        metrics.info.info(
            {
                "job": config.job_name,
                "namespace": config.namespace or "",
                "run_id": config.run_id,
                "method": config.spec.method.type,
            }
        )
        metrics.world_size.set(rank.world_size)
        prometheus = PrometheusReporter(metrics)
        if config.metrics_port:
            # 0.0.0.0 in a pod (its own network namespace); tests listen on 127.0.0.1 only.
            prometheus.serve(config.metrics_port, os.environ.get(Env.METRICS_ADDR, "0.0.0.0"))
        reporters += [prometheus, LogReporter()]
    workdir = Path(os.environ.get(Env.WORKDIR, DEFAULT_WORK_DIR))
    cache = os.environ.get(Env.CACHE)
    result = run(config, Reporters(*reporters), workdir, Path(cache) if cache else None)
    log.info(
        "Result outcome=%s exit_code=%d message=%s",
        result.outcome,
        result.exit_code,
        result.message,
    )
    return result


def entry(argv: list[str] | None, runner: Callable[[TrainerConfig, Path], TrainerResult]) -> int:
    """A pod's command: the config read, the run (one process, or the launcher's), the result
    written to the termination message, its exit code returned."""
    argv = sys.argv[1:] if argv is None else argv
    setup_logging(distributed.current())
    path = config_path(argv)
    config = load_config(path)
    if config is None:
        return int(ExitCode.INVALID_SPEC)
    result = runner(config, path)
    if config.termination_message_path:
        Path(config.termination_message_path).write_text(result.to_termination_message())
    return int(result.exit_code)


def main(argv: list[str] | None = None) -> int:
    return entry(argv, lambda config, _: run_process(config))
