"""The trainer's Prometheus endpoint, scraped over real HTTP on 127.0.0.1 after a run."""

from __future__ import annotations

import socket
import urllib.request
from contextlib import closing
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import ExitCode
from kubetune_trainer.pipeline import run
from kubetune_trainer.telemetry import PrometheusReporter, Reporters, TrainerMetrics
from tests.trainer.conftest import Recorder, config_for, job_manifest


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_served_during_and_after_a_run(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    port = _free_port()
    prometheus = PrometheusReporter(TrainerMetrics())
    prometheus.serve(port, addr="127.0.0.1")
    recorder = Recorder()
    doc = job_manifest(
        tiny_model,
        task_file,
        (tmp_path / "out").as_uri(),
        "lora",
        hyperparameters__evalEverySteps=20,
    )
    result = run(config_for(doc), Reporters(prometheus, recorder), tmp_path / "work")
    assert result.exit_code == ExitCode.SUCCEEDED

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(body)
        for s in f.samples
    }
    assert samples["kubetune_trainer_step[]"] == 60
    assert samples["kubetune_trainer_total_steps[]"] == 60
    assert samples["kubetune_trainer_tokens_per_second[]"] > 0
    assert samples["kubetune_trainer_eval_loss[]"] == recorder.eval_losses[-1]
    assert samples["kubetune_trainer_train_loss[]"] == recorder.steps[-1].loss
    assert samples["kubetune_trainer_stage[('kubetune_trainer_stage', 'done')]"] == 1
    assert samples["kubetune_trainer_eta_seconds[]"] == 0
    assert samples["kubetune_trainer_world_size[]"] == 1
    assert samples["kubetune_trainer_rank_memory_bytes[('kind', 'rss'), ('rank', '0')]"] > 2**20
