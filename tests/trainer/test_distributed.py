"""The trainer as one pod of a distributed run: `python -m kubetune_trainer.launch` with two CPU
processes over gloo (torchrun's environment, as the operator sets it), against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import ExitCode, TrainerConfig, TrainerResult
from kubetune_trainer import storage
from kubetune_trainer.pipeline import run
from kubetune_trainer.training import complete_checkpoints
from tests.support.prometheus import free_port
from tests.trainer.conftest import Recorder, config_for, job_manifest, run_job

# Each step's loss of two processes against one at the same global batch and micro-batch (the
# same examples per step); without dropout, only the order of float additions differs.
LOSS_TOLERANCE = 0.01  # relative, per step


def _launch(
    config: TrainerConfig, tmp_path: Path, nproc: int = 2, wait: bool = True
) -> subprocess.Popen[bytes]:
    """One pod's launcher: its config, workdir and termination message under tmp_path."""
    config = config.model_copy(
        update={"termination_message_path": str(tmp_path / "termination-log")}
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json(exclude_none=True))
    env = {
        **os.environ,
        "PET_NPROC_PER_NODE": str(nproc),
        "KUBETUNE_WORKDIR": str(tmp_path / "work"),
        "KUBETUNE_METRICS_ADDR": "127.0.0.1",
        "OMP_NUM_THREADS": "1",
    }
    with (tmp_path / "pod.log").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer.launch", str(path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if wait:
        process.wait(timeout=600)
    return process


def _termination(tmp_path: Path) -> TrainerResult:
    return TrainerResult.model_validate_json((tmp_path / "termination-log").read_text())


def _losses(output: Path, run_id: str) -> list[float]:
    metrics = json.loads((output / "runs" / run_id / "metrics.json").read_text())
    return [entry["loss"] for entry in metrics["history"] if "loss" in entry]


def _doc(model: Path, data: Path, output: Path, method: str, **spec: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"method__lora": {"dropout": 0.0}} if method == "lora" else {}
    return job_manifest(
        model,
        data,
        output.as_uri(),
        method,
        hyperparameters__maxSteps=12,
        hyperparameters__microBatchSize=8,
        hyperparameters__checkpointEverySteps=6,
        **extra,
        **spec,
    )


@pytest.mark.parametrize(("method", "strategy"), [("lora", "ddp"), ("full", "fsdp")])
def test_two_processes_train_like_one(
    tiny_model: Path, task_file: Path, tmp_path: Path, method: str, strategy: str
) -> None:
    single, pair = tmp_path / "single", tmp_path / "pair"
    one, _ = run_job(_doc(tiny_model, task_file, single / "out", method), single)
    assert one.outcome == "Succeeded", one.message

    doc = _doc(
        tiny_model,
        task_file,
        pair / "out",
        method,
        resources={"gpus": 0},
        distributed={"nprocPerNode": 2},
    )
    config = config_for(doc)
    assert config.world_size == 2 and config.spec.strategy() == strategy
    pair.mkdir()
    process = _launch(config, pair)
    log = (pair / "pod.log").read_text()
    assert process.returncode == 0, log[-3000:]
    two = _termination(pair)
    assert two.outcome == "Succeeded" and two.steps == 12

    # The same curve, the same evaluation: computed once, by rank 0.
    a, b = _losses(single / "out", "0123abcd"), _losses(pair / "out", "0123abcd")
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert abs(x - y) <= LOSS_TOLERANCE * abs(x), (step, a, b)
    assert one.metrics and two.metrics
    assert two.metrics.tuned.loss == pytest.approx(one.metrics.tuned.loss, rel=LOSS_TOLERANCE)
    assert two.metrics.base == one.metrics.base
    assert log.count("Published files=") == 1 and "[rank 1] Stage evaluate" not in log

    # One artifact set; each checkpoint holds both ranks' RNG states (rank 1 uploaded its own).
    keys = storage.list_keys((pair / "out" / "runs" / "0123abcd").as_uri())
    assert keys.count("manifest.json") == 1
    assert {
        "checkpoints/checkpoint-12/rng_state_0.pth",
        "checkpoints/checkpoint-12/rng_state_1.pth",
    } <= set(keys)


def _workers(launcher: int) -> list[int]:
    """The processes the launcher's agent spawned (one per rank)."""
    children = [
        int(child)
        for task in Path(f"/proc/{launcher}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _pair(model: Path, data: Path, tmp_path: Path, **spec: Any) -> dict[str, Any]:
    """A LoRA job of two CPU processes, output under tmp_path."""
    return job_manifest(
        model,
        data,
        (tmp_path / "out").as_uri(),
        "lora",
        resources={"gpus": 0},
        distributed={"nprocPerNode": 2},
        **spec,
    )


def test_a_killed_process_fails_the_pod_naming_its_rank(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    doc = _pair(
        tiny_model,
        task_file,
        tmp_path,
        hyperparameters__maxSteps=2000,
        hyperparameters__checkpointEverySteps=10,
    )
    port = free_port()
    config = config_for(doc).model_copy(update={"metrics_port": port})
    launcher = _launch(config, tmp_path, wait=False)
    checkpoints = f"{config.output_prefix}/checkpoints"
    deadline = time.monotonic() + 180
    while not complete_checkpoints(checkpoints):
        assert launcher.poll() is None, (tmp_path / "pod.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    # Rank 0 serves the run's metrics: the world, and each rank's memory.
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples["kubetune_trainer_world_size[]"] == 2
    for rank in ("0", "1"):
        assert samples[f"kubetune_trainer_rank_memory_bytes[('kind', 'rss'), ('rank', '{rank}')]"]

    workers = _workers(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # as the OOM killer would
    assert launcher.wait(timeout=120) == ExitCode.RUNTIME_ERROR
    result = _termination(tmp_path)
    assert result.rank is not None, result
    assert result.message.startswith(
        f"rank {result.rank} (pod 0, local rank {result.rank}, pid {workers[-1]}) "
    ), result.message


def test_a_permanent_outcome_keeps_its_exit_code_through_the_launcher(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    doc = _pair(
        tiny_model,
        task_file,
        tmp_path,
        hyperparameters__maxSteps=2,
        gates=[{"metric": "exactMatch", "min": 0.99}],
    )
    process = _launch(config_for(doc), tmp_path)
    assert process.returncode == ExitCode.GATES_FAILED  # the Job's FailJob rule sees it
    result = _termination(tmp_path)
    assert result.outcome == "GatesFailed" and not result.promoted
    assert not storage.exists(f"{(tmp_path / 'out').as_uri()}/latest.json")


def test_a_run_launched_with_the_wrong_number_of_processes_says_so(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    doc = _pair(tiny_model, task_file, tmp_path)
    result = run(config_for(doc), Recorder(), tmp_path / "work")  # one process, not two
    assert result.exit_code == ExitCode.INVALID_SPEC
    assert "configured for 2 process(es)" in result.message


def test_kubetune_run_with_two_processes(tiny_model: Path, task_file: Path, tmp_path: Path) -> None:
    doc = _doc(tiny_model, task_file, tmp_path / "out", "lora")
    doc["metadata"] = {"name": "tiny"}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    kubetune = Path(sys.executable).parent / "kubetune"
    done = subprocess.run(
        [str(kubetune), "run", str(manifest), "--nproc", "2", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "==> 2 processes" in done.stderr and "Succeeded" in done.stdout
    (run_dir,) = (tmp_path / "out" / "runs").iterdir()
    assert (run_dir / "manifest.json").exists()

    # A batch the processes cannot share is refused before anything runs, naming the fix.
    bad = subprocess.run(
        [str(kubetune), "run", str(manifest), "--nproc", "3", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == ExitCode.INVALID_SPEC
    assert "--nproc 3: spec.hyperparameters.batchSize (16)" in bad.stderr


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (-9, "was killed by SIGKILL (out of memory?)"),
        (-15, "was killed by SIGTERM"),
        (-200, "was killed by 200"),
        (3, "exited with code 3"),
    ],
)
def test_how_a_process_ended_is_said_for_any_exit_code(code: int, said: str) -> None:
    """(`-9 in signal.Signals` raises on Python 3.11: the launcher crashed on this path.)"""
    from kubetune_trainer.launch import _describe_exit

    assert _describe_exit(code) == said
