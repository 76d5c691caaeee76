"""The client's output for people: `kubetune get`'s table, `describe`'s page, and `submit
--wait`'s progress bar and summary (the same as `kubetune run`'s, from the run's status)."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from typing import Any

from kubetune.api import FINAL_PHASES, ExitCode, FineTuneJob, TrainerResult
from kubetune.api.wire import Stage
from kubetune.client import Client, Description, exit_code

# Messages come from anyone who may write the namespace's Events, and from spec values: no
# terminal control sequence of theirs reaches the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _plain(text: Any) -> str:
    return _CONTROL.sub("?", str(text or ""))


def _age(value: Any, now: datetime) -> str:
    if not value:
        return "-"
    try:
        then = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = int((now - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def table(jobs: list[FineTuneJob], namespaces: bool = False) -> str:
    """`kubectl get ftj`'s columns, with the run, step, loss, gates and promotion."""
    now = datetime.now(UTC)
    head = ["NAME", "PHASE", "METHOD", "RUN", "STEP", "LOSS", "GATES", "PROMOTED", "AGE"]
    if namespaces:
        head.insert(0, "NAMESPACE")
    rows = [head]
    for job in jobs:
        status = job.status
        progress = status.progress if status else None
        step = "-"
        if progress is not None and progress.step:
            step = f"{progress.step}/{progress.total_steps or '?'}"
        row = [
            job.metadata.name,
            (status.phase if status else None) or "-",
            job.spec.method.type,
            (status.run_id if status else None) or "-",
            step,
            f"{progress.loss:.4f}" if progress is not None and progress.loss is not None else "-",
            (status.gates_summary if status else None) or "-",
            "yes" if status is not None and status.promotion is not None else "-",
            _age(job.metadata.creation_timestamp, now),
        ]
        if namespaces:
            row.insert(0, job.metadata.namespace or "")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def describe(desc: Description) -> str:
    """What the run is, where it is, why it is not running, and what it made."""
    job, status = desc.job, desc.job.status
    spec = job.spec
    lines = [
        f"Name:        {job.metadata.name}",
        f"Namespace:   {job.metadata.namespace}",
        f"Method:      {spec.method.type} on {spec.model.uri}",
        f"Dataset:     {spec.dataset.uri}",
        f"Output:      {spec.output.uri}",
    ]
    if spec.profile:
        lines.append(f"Profile:     {spec.profile}")
    if spec.suspend:
        lines.append("Suspended:   yes (kubetune resume continues it)")
    if status is None or status.phase is None:
        lines.append("Phase:       - (the operator has not seen it yet: is it running?)")
        return "\n".join(lines)
    lines.append(f"Phase:       {status.phase}")
    if status.message:
        lines.append(f"Message:     {_plain(status.message)}")
    if status.run_id:
        lines.append(f"Run:         {status.run_id} (attempts: {status.attempts})")
    if status.profile is not None:
        lines.append(f"Resolved:    FineTuneProfile {status.profile.name}")
    progress = status.progress
    if progress is not None and progress.step:
        detail = [f"step {progress.step}/{progress.total_steps or '?'}"]
        if progress.loss is not None:
            detail.append(f"loss {progress.loss:.4f}")
        if progress.tokens_per_second:
            detail.append(f"{progress.tokens_per_second:.0f} tok/s")
        if progress.eta_seconds is not None and status.phase not in FINAL_PHASES:
            detail.append(f"ETA {progress.eta_seconds} s")
        lines.append(f"Progress:    {', '.join(detail)}")
    if status.conditions:
        lines += ["", "Conditions:", f"  {'TYPE':<16}{'STATUS':<8}{'REASON':<24}MESSAGE"]
        for c in status.conditions:
            lines.append(f"  {c.type:<16}{c.status:<8}{c.reason:<24}{_plain(c.message)}")
    if desc.pods:
        lines += ["", "Pods:"]
        for pod in desc.pods:
            why = f" {_plain(pod.reason)}" if pod.reason else ""
            said = f": {_plain(pod.message)}" if pod.message else ""
            code = f" exit {pod.exit_code}" if pod.exit_code is not None else ""
            lines.append(
                f"  {pod.name} (rank {pod.index}) {pod.phase}{why}{code}"
                f"{' on ' + pod.node if pod.node else ''}{said}"
            )
    if status.gates:
        from kubetune_trainer.gates import describe as gate

        lines += ["", "Gates:"]
        lines += [f"  {'PASS' if g.passed else 'FAIL'}  {gate(g)}" for g in status.gates]
    if status.artifacts is not None:
        lines += ["", "Artifacts:"]
        for key, value in status.artifacts.model_dump(by_alias=True, exclude_none=True).items():
            lines.append(f"  {key:<12} {value}")
    if status.promotion is not None:
        promo = status.promotion
        before = f", replacing run {promo.previous_run_id}" if promo.previous_run_id else ""
        lines += ["", f"Promoted:    {promo.latest_uri} names it{before}"]
    if desc.events:
        lines += ["", "Events:", f"  {'TYPE':<9}{'REASON':<22}{'AGE':<6}MESSAGE"]
        now = datetime.now(UTC)
        for e in desc.events:
            when = e.get("lastTimestamp") or e.get("eventTime")
            lines.append(
                f"  {_plain(e.get('type')):<9}{_plain(e.get('reason')):<22}{_age(when, now):<6}"
                f"{_plain(e.get('message'))}"
            )
    return "\n".join(lines)


def result_of(job: FineTuneJob) -> TrainerResult:
    """The run's status as the trainer's result `kubetune run` summarises."""
    status = job.status
    assert status is not None
    code = exit_code(status)
    outcome = "Succeeded" if code == ExitCode.SUCCEEDED else (
        "GatesFailed" if code == ExitCode.GATES_FAILED else "Failed")  # fmt: skip
    seconds = None
    if status.start_time and status.completion_time:
        seconds = (status.completion_time - status.start_time).total_seconds()
    progress = status.progress
    return TrainerResult(
        run_id=status.run_id or "-",
        outcome=outcome,
        exit_code=code,
        message=status.message or "",
        steps=progress.step if progress is not None and progress.step else None,
        tokens=(status.usage.tokens if status.usage else None)
        or (progress.tokens if progress else None),
        train_seconds=seconds,
        metrics=status.metrics,
        gates=status.gates,
        artifacts=status.artifacts,
        promoted=status.promotion is not None,
    )


def follow(client: Client, name: str, namespace: str | None, timeout: float | None) -> int:
    """`--wait`: the run's phases as lines, training as a progress bar, then the summary of
    `kubetune run`; its exit code (the trainer's outcome's), or 1 when timeout passes first."""
    from kubetune.console import ProgressBar, summary

    bar = ProgressBar()
    phase = None
    job = None
    for job in client.watch(name, namespace, timeout):
        status = job.status
        if status is None:
            continue
        progress = status.progress
        trained = progress is not None and progress.step and progress.total_steps
        if trained and phase == "Running" and status.phase != phase and progress.step > bar.shown:
            bar.step(progress)  # the last steps, reported as it left Running: the bar ends there
        if status.phase != phase:
            phase = status.phase
            bar.stage(phase or "", status.message or "")
        if trained and phase == "Running":
            bar.step(progress)
    bar.stage(Stage.DONE)
    if job is None or job.status is None or job.status.phase not in FINAL_PHASES:
        shown = job.status.phase if job is not None and job.status else "no phase"
        print(f"kubetune: {name} is still {shown} after {timeout:.0f} s", file=sys.stderr)
        return int(ExitCode.RUNTIME_ERROR)
    print(summary(job, result_of(job)))
    return int(exit_code(job.status))
