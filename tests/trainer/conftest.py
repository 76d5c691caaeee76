"""Fixtures for trainer tests: the tiny model, the toy task, a real S3 server, a job runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, TrainerConfig, TrainerResult
from kubetune_trainer.pipeline import run
from kubetune_trainer.telemetry import StepInfo
from kubetune_trainer.training import complete_checkpoints
from tests.support.specs import override

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Learning rates that teach the tiny model the toy task in 60 steps, per method.
LEARNING_RATE = {
    "lora": 5e-3,
    "qlora": 5e-3,
    "dora": 5e-3,
    "ia3": 3e-2,
    "prefix": 3e-2,
    "prompt": 3e-2,
    "full": 1e-3,
}


class Recorder:
    """A reporter that keeps what it was told."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.steps: list[StepInfo] = []
        self.eval_losses: list[float] = []

    def stage(self, name: str, detail: str = "") -> None:
        self.stages.append(name)

    def step(self, info: StepInfo) -> None:
        self.steps.append(info)

    def eval_loss(self, step: int, loss: float) -> None:
        self.eval_losses.append(loss)


def job_manifest(
    model: Path, data: Path, output: str, method: str = "lora", **spec: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny", "namespace": "test", "uid": "uid-tiny", "generation": 1},
        "spec": {
            "model": {"uri": model.as_uri()},
            "dataset": {"uri": data.as_uri(), "testSplit": 0.1, "validationSplit": 0.05},
            "method": {"type": method},
            "hyperparameters": {
                "maxSteps": 60,
                "batchSize": 16,
                "learningRate": LEARNING_RATE[method],
            },
            "evaluation": {"metrics": ["loss", "perplexity", "exactMatch"], "maxNewTokens": 4},
            "gates": [],
            "output": {"uri": output},
        },
    }
    override(doc["spec"], **spec)
    return doc


def config_for(doc: dict[str, Any], run_id: str = "0123abcd") -> TrainerConfig:
    return TrainerConfig.for_job(FineTuneJob.model_validate(doc), run_id, metrics_port=0)


def run_job(
    doc: dict[str, Any], workdir: Path, run_id: str = "0123abcd"
) -> tuple[TrainerResult, Recorder]:
    recorder = Recorder()
    result = run(config_for(doc, run_id), recorder, workdir)
    return result, recorder


def start_trainer(config_path: Path, workdir: Path, log: Path) -> subprocess.Popen[bytes]:
    """The trainer as its pod runs it: `python -m kubetune_trainer CONFIG`, output to log."""
    env = {**os.environ, "KUBETUNE_WORKDIR": str(workdir), "OMP_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", str(config_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def preempt_after_first_checkpoint(
    trainer: subprocess.Popen[bytes], checkpoints: str, log: Path, timeout: float = 180
) -> int:
    """Kills the trainer with SIGKILL (a preemption: no clean shutdown) once a checkpoint is
    complete; returns the newest complete checkpoint's step."""
    deadline = time.monotonic() + timeout
    while not complete_checkpoints(checkpoints):
        assert trainer.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint within {timeout} s"
        time.sleep(0.05)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    return complete_checkpoints(checkpoints)[-1]
