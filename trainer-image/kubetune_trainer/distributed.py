"""One process of a distributed run: who it is, its process group, and the collectives the
pipeline needs.

Every rank runs the same pipeline. The stages that read or write storage alone (the baseline and
final evaluation, the gates, the export and promotion) run on rank 0 while the others wait;
`on_main` hands rank 0's outcome, or its failure, to every rank, so that all ranks end the same
way. The launcher (launch.py, torch's elastic agent) sets the environment read here: RANK,
LOCAL_RANK, WORLD_SIZE, GROUP_RANK (the pod's index), MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from kubetune.api import ExitCode
from kubetune.api.wire import Env
from kubetune_trainer.errors import TrainerError, first_line

T = TypeVar("T")

# How long a rank waits for the others at a collective: long enough for rank 0 to evaluate and
# export a large model while the others wait, short enough that a hung peer ends the run.
TIMEOUT = timedelta(seconds=int(os.environ.get(Env.COLLECTIVE_TIMEOUT, "3600")))


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Rank:
    """This process's place in the run, from the launcher's environment (one process: rank 0)."""

    def env(name: str, default: int) -> int:
        return int(os.environ.get(name, default))

    return Rank(env("RANK", 0), env("LOCAL_RANK", 0), env("WORLD_SIZE", 1), env("GROUP_RANK", 0))


def init(rank: Rank) -> None:
    """Joins the process group (gloo on CPU; NCCL for CUDA tensors, gloo for the objects the
    pipeline exchanges) before any stage, so that stages can wait for each other."""
    import torch
    import torch.distributed as dist

    if not rank.distributed or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's value, on every rank."""
    import torch.distributed as dist

    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's value, by rank, on every rank."""
    import torch.distributed as dist

    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class RankZeroError(TrainerError):
    """A failure of a stage that rank 0 ran for everyone, as the other ranks learn of it."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


def on_main(fn: Callable[[], T]) -> T | None:
    """Runs fn on rank 0 while the others wait; every rank then returns rank 0's value (which
    must pickle) or raises its failure, with the same exit code and message."""
    if not active():
        return fn()
    if current().main:
        try:
            value = fn()
        except TrainerError as exc:
            broadcast(("error", int(exc.exit_code), str(exc)))
            raise
        except Exception as exc:
            first = first_line(exc)
            broadcast(("error", int(ExitCode.RUNTIME_ERROR), f"{type(exc).__name__}: {first}"))
            raise
        broadcast(("ok", value, ""))
        return value
    status, value, message = broadcast(("", None, ""))
    if status == "error":
        raise RankZeroError(value, message)
    return value


def peer_lost(exc: BaseException) -> bool:
    """Whether exc is a collective that failed because another process died or hung (its
    socket closed, or the collective timed out), rather than this process's own failure."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Broken pipe",
            "Timed out waiting",
            "NCCL communicator was aborted",
        )
    )


def memory() -> tuple[int, int | None]:
    """This process's peak resident memory and, on a GPU, its peak allocated GPU memory."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    gpu = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
    return rss, gpu
