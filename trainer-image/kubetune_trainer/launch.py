"""A distributed run's launcher: `python -m kubetune_trainer.launch [CONFIG]`, one per pod.

It is torchrun (torch's elastic agent, the same launch API) with the run's own rules: it reads
torchrun's environment (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR,
PET_MASTER_PORT, as Kubeflow Trainer's torch runtime sets them), starts one process per GPU
(`nprocPerNode` on CPU), and meets the other pods at rank 0's address (static rendezvous: pod i
is node rank i). No in-place restarts (max_restarts 0): a process that fails ends the pod's
processes and, through the collectives, the other pods'; the Job replaces the pods and the run
resumes from its last checkpoint.

What it adds to torchrun: the pod exits with the run's exit code (torchrun exits 1 for every
failure, which would hide "gates failed" or "invalid spec" from the Job's podFailurePolicy), and
it writes the termination message: rank 0's result, or the failure that started it all, naming
the rank.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from pathlib import Path

from kubetune.api import ExitCode, TrainerConfig, TrainerResult
from kubetune.api.wire import DEFAULT_WORK_DIR, RENDEZVOUS_PORT, Env
from kubetune_trainer.errors import first_line
from kubetune_trainer.process import entry, load_config, run_process, setup_logging

log = logging.getLogger("kubetune_trainer")

# How long a pod waits for the others to join (a pod may wait for a node, an image pull).
JOIN_TIMEOUT = int(os.environ.get(Env.JOIN_TIMEOUT, "900"))
RESULT_FILE = "result-rank-{rank}.json"
PID_FILE = "rank-{rank}.pid"


def _env(name: Env, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _worker(path: str, workdir: str) -> str:
    """One process of the run (spawned by the agent, which set RANK, WORLD_SIZE, ...): its
    result as JSON, also left in a file for the launcher should another process fail first."""
    from kubetune_trainer import distributed

    rank = distributed.current()
    setup_logging(rank)
    Path(workdir, PID_FILE.format(rank=rank.rank)).write_text(str(os.getpid()))
    config = load_config(Path(path))
    if config is None:
        result = TrainerResult(
            run_id="00000000", outcome="Failed", exit_code=ExitCode.INVALID_SPEC, message=""
        )
    else:
        result = run_process(config)
    text = result.model_dump_json(exclude_none=True)
    Path(workdir, RESULT_FILE.format(rank=rank.rank)).write_text(text)
    if result.outcome == "Failed":
        # A failed process exits failed: the agent then stops at once (a process that returns
        # waits at the agents' exit barrier for every pod, and a lost pod never comes), and the
        # launcher reads this result from its file.
        logging.shutdown()
        os._exit(int(result.exit_code) or 1)
    return text


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # not a signal this platform names
            name = str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def launch(config: TrainerConfig, path: Path) -> TrainerResult:
    """This pod's processes, run to the end; the result the pod reports."""
    result = _launch(config, path)
    log.info(
        "Pod result outcome=%s exit_code=%d message=%s",
        result.outcome,
        result.exit_code,
        result.message,
    )
    return result


def _launch(config: TrainerConfig, path: Path) -> TrainerResult:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nnodes = _env(Env.NNODES, 1)
    nproc = _env(Env.NPROC_PER_NODE, 1)
    node = _env(Env.NODE_RANK, 0)
    workdir = Path(os.environ.get(Env.WORKDIR, DEFAULT_WORK_DIR))
    workdir.mkdir(parents=True, exist_ok=True)
    for pattern in (RESULT_FILE, PID_FILE):
        for old in workdir.glob(pattern.format(rank="*")):
            old.unlink()

    def failed(code: ExitCode, message: str) -> TrainerResult:
        return TrainerResult(
            run_id=config.run_id, outcome="Failed", exit_code=code, message=message
        )

    expected = config.world_size or 1
    if nnodes * nproc != expected:
        return failed(
            ExitCode.INVALID_SPEC,
            f"launched as {nnodes} pod(s) x {nproc} process(es) but the run was configured for "
            f"{expected} processes; the operator sets {Env.NNODES} and {Env.NPROC_PER_NODE} from "
            "spec.resources",
        )
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        # As torchrun: processes that share the CPUs do not each start a thread per core.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    if nnodes > 1:
        address = os.environ.get(Env.MASTER_ADDR, "localhost")
        endpoint = f"{address}:{_env(Env.MASTER_PORT, RENDEZVOUS_PORT)}"
        backend, configs = "static", {"rank": node, "timeout": JOIN_TIMEOUT}
    else:  # one pod: a rendezvous of its own on a free local port (torchrun --standalone)
        endpoint, backend, configs = "localhost:0", "c10d", {}
    launch_config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=f"{config.run_id}-{uuid.uuid4().hex[:8]}" if nnodes == 1 else config.run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    log.info(
        "Launching pod=%d of %d processes=%d world_size=%d rendezvous=%s",
        node,
        nnodes,
        nproc,
        expected,
        endpoint,
    )
    try:
        values = elastic_launch(launch_config, _worker)(str(path), str(workdir))
        # Every process returned: each with rank 0's result (distributed.on_main).
        return TrainerResult.model_validate_json(values[min(values)])
    except ChildFailedError as exc:
        # What each of this pod's processes left: its result, else how it ended. The agent
        # reports the first process it saw end (often one that lost its peer), so a process
        # that ended without a result is looked for among all of them.
        results, silent = [], []
        for local_rank in range(nproc):
            global_rank = node * nproc + local_rank
            saved = workdir / RESULT_FILE.format(rank=global_rank)
            if saved.exists():
                results.append(TrainerResult.model_validate_json(saved.read_text()))
                continue
            pid_file = workdir / PID_FILE.format(rank=global_rank)
            failure = exc.failures.get(global_rank)
            pid = failure.pid if failure else pid_file.read_text() if pid_file.exists() else "?"
            how = (
                _describe_exit(failure.exitcode)
                if failure
                else "ended without a result (killed, e.g. out of memory, or crashed)"
            )
            silent.append(
                failed(
                    ExitCode.RUNTIME_ERROR,
                    f"rank {global_rank} (pod {node}, local rank {local_rank}, pid {pid}) {how}",
                ).model_copy(update={"rank": global_rank})
            )
        # A process's own failure first; one that left no result next (the agent stops the
        # others once one has failed: they leave none either, so the lowest is a guess); a
        # process that only lost its peer last.
        own = [r for r in results if r.exit_code != ExitCode.PEER_LOST and r.outcome == "Failed"]
        return (own or silent or results)[0]
    except Exception as exc:  # the rendezvous: the other pods never came, or rank 0 is gone
        first = first_line(exc)
        return failed(
            ExitCode.PEER_LOST,
            f"pod {node} could not meet the run's other pods at {endpoint}: "
            f"{type(exc).__name__}: {first}",
        )


def main(argv: list[str] | None = None) -> int:
    return entry(argv, launch)


if __name__ == "__main__":
    # Through the package's module, so that the processes (spawned, not forked) find _worker.
    from kubetune_trainer.launch import main as launch_main

    sys.exit(launch_main())
