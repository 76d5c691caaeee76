"""The trainer image's entry point: `python -m kubetune_trainer [CONFIG]`.

Reads the TrainerConfig the operator mounted (default /etc/kubetune/config.json), serves
Prometheus metrics on its port, runs the pipeline, writes the compact result to the termination
message path and exits with the result's code.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from kubetune.api import ExitCode, TrainerConfig, describe_errors
from kubetune_trainer.pipeline import run
from kubetune_trainer.telemetry import LogReporter, PrometheusReporter, Reporters, TrainerMetrics

DEFAULT_CONFIG = "/etc/kubetune/config.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("kubetune_trainer")
    path = Path(argv[0] if argv else os.environ.get("KUBETUNE_CONFIG", DEFAULT_CONFIG))
    try:
        config = TrainerConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        lines = (
            describe_errors(exc, TrainerConfig) if isinstance(exc, ValidationError) else [str(exc)]
        )
        for line in lines:
            log.error("Invalid config %s: %s", path, line)
        return int(ExitCode.INVALID_SPEC)
    metrics = TrainerMetrics()
    metrics.info.info(
        {
            "job": config.job_name,
            "namespace": config.namespace or "",
            "run_id": config.run_id,
            "method": config.spec.method.type,
        }
    )
    prometheus = PrometheusReporter(metrics)
    if config.metrics_port:
        # 0.0.0.0 in a pod (its own network namespace); tests listen on 127.0.0.1 only.
        prometheus.serve(config.metrics_port, os.environ.get("KUBETUNE_METRICS_ADDR", "0.0.0.0"))
    workdir = Path(os.environ.get("KUBETUNE_WORKDIR", "/tmp/kubetune"))
    result = run(config, Reporters(prometheus, LogReporter()), workdir)
    log.info(
        "Result outcome=%s exit_code=%d message=%s",
        result.outcome,
        result.exit_code,
        result.message,
    )
    if config.termination_message_path:
        Path(config.termination_message_path).write_text(result.to_termination_message())
    return int(result.exit_code)


if __name__ == "__main__":
    sys.exit(main())
