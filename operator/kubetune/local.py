"""`kubetune run`: one FineTuneJob on this machine, no cluster, with the same trainer.

The manifest is validated exactly as the operator validates it; `--set path=value`, `--model`,
`--dataset` and `--output` change it first (local paths become file:// URIs). The run id is
derived from the job's name and spec, so running an interrupted job again resumes it from its
last checkpoint; `--fresh` starts a new run. `--nproc N` trains with N processes through the
trainer's launcher, as one pod of a distributed run does; the progress bar then follows rank 0's
metrics, as the operator does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import sys
import threading
import urllib.request
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import (
    MUTUALLY_EXCLUSIVE,
    RUN_ID_LENGTH,
    SCHEDULE_KIND,
    ExitCode,
    FineTuneJob,
    TrainerConfig,
    TrainerResult,
    spec_hash,
    stamp,
)
from kubetune.api.wire import CONFIG_FILE, Env, Stage
from kubetune.console import ProgressBar, summary
from kubetune.manifests import (
    Document,
    Loader,
    RawDocument,
    read_documents,
    validate_document,
)


class UsageError(Exception):
    pass


def to_uri(value: str) -> str:
    """A URI as is; a local path (relative to the working directory) as an absolute file:// URI."""
    if "://" in value:
        return value
    return Path(value).expanduser().resolve().as_uri()


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    """Sets spec.a.b (or spec.gates.0.min) in a manifest, creating mappings on the way."""
    parts = path.split(".")
    node: Any = doc
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UsageError(f"--set {path}: {key!r} is not an index of the list")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise UsageError(f"--set {path}: {'.'.join(parts[:i])} is not a mapping")


def drop_path(doc: dict[str, Any], path: str) -> bool:
    """Removes spec.a.b from a manifest if it is there; True when it was."""
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def apply_overrides(
    doc: dict[str, Any], sets: list[str], model: str | None, dataset: str | None, output: str | None
) -> None:
    for item in sets:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise UsageError(
                f"--set {item!r}: expected PATH=VALUE, e.g. spec.hyperparameters.maxSteps=20"
            )
        set_path(doc, path, yaml.load(text, Loader=Loader) if text else "")
        # Setting one of a mutually exclusive group replaces the others the file set.
        for group in MUTUALLY_EXCLUSIVE:
            if path in group:
                for other in group:
                    if other != path and drop_path(doc, other):
                        print(f"--set {path}: replaces {other}", file=sys.stderr)
    for path, value in (
        ("spec.model.uri", model),
        ("spec.dataset.uri", dataset),
        ("spec.output.uri", output),
    ):
        if value:
            set_path(doc, path, to_uri(value))


def local_run_id(job: FineTuneJob) -> str:
    canonical = json.dumps(job.spec.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(f"{job.metadata.name}/{canonical}".encode()).hexdigest()[:RUN_ID_LENGTH]


def load_job(path: str, name: str | None, overrides: dict[str, Any]) -> FineTuneJob:
    """The one FineTuneJob of the file (or the one named), overridden, then validated by the
    same loader as `kubetune validate`: the same problems, with file and line."""
    raw = read_documents(path)
    if isinstance(raw, Document):
        if raw.problems and raw.problems[0].message == "no such file":
            raise UsageError(f"{path}: cannot read: no such file")
        raise ValidationProblems([str(p) for p in raw.problems])
    jobs = [r for r in raw if isinstance(r.data, dict) and r.data.get("kind") == "FineTuneJob"]
    if not jobs:  # a FineTuneSchedule: one run of what its template stamps, now
        jobs = [
            _stamped(r)
            for r in raw
            if isinstance(r.data, dict) and r.data.get("kind") == SCHEDULE_KIND
        ]
    if name:
        jobs = [r for r in jobs if (r.data.get("metadata") or {}).get("name") == name]
    if not jobs:
        raise UsageError(f"{path}: no FineTuneJob{f' named {name!r}' if name else ''} in this file")
    if len(jobs) > 1:
        raise UsageError(f"{path}: {len(jobs)} FineTuneJobs in this file; choose one with --name")
    (chosen,) = jobs
    apply_overrides(
        chosen.data,
        overrides["sets"],
        overrides["model"],
        overrides["dataset"],
        overrides["output"],
    )
    doc = validate_document(chosen.data, chosen.node, chosen.doc)
    if doc.problems or doc.job is None:
        raise ValidationProblems([str(p) for p in doc.problems])
    return doc.job


def _stamped(raw: RawDocument) -> RawDocument:
    """The FineTuneJob a FineTuneSchedule's template stamps for now (api.stamp: the operator's
    stamp), after the schedule itself is validated (its problems keep their lines)."""
    checked = validate_document(raw.data, raw.node, raw.doc)
    if checked.problems or checked.schedule is None:
        raise ValidationProblems([str(p) for p in checked.problems])
    # Its lines are the schedule's, not the job's: no node.
    return RawDocument(stamp(raw.data, datetime.now(UTC)), None, raw.doc)


class ValidationProblems(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def run(args: Any) -> int:
    overrides = {
        "sets": args.set or [],
        "model": args.model,
        "dataset": args.dataset,
        "output": args.output,
    }
    try:
        job = load_job(args.file, args.name, overrides)
    except ValidationProblems as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    except UsageError as exc:
        print(f"kubetune run: {exc}", file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)

    if job.spec.profile:
        # A profile is the cluster's (placement, identity, cache): here the spec runs as written.
        print(
            f"note: spec.profile ({job.spec.profile}) applies in the cluster; kubetune run uses "
            "the spec as written (check it against the profile: kubetune validate "
            f"profile.yaml {args.file})",
            file=sys.stderr,
        )
    # The console shows stages and the progress bar; of the trainer's log only its warnings
    # (its whole log, and the libraries' warnings, go to trainer.log beside the artifacts).
    trainer_log = logging.getLogger("kubetune_trainer")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("warning: %(message)s"))

    from kubetune_trainer.pipeline import run as run_pipeline
    from kubetune_trainer.telemetry import PrometheusReporter, Reporters, TrainerMetrics

    run_id = args.run_id or (
        secrets.token_hex(RUN_ID_LENGTH // 2) if args.fresh else local_run_id(job)
    )
    nproc = args.nproc
    hp = job.spec.hyperparameters
    if nproc < 1 or hp.batch_size % ((hp.micro_batch_size or 1) * nproc):
        print(
            f"kubetune run: --nproc {nproc}: spec.hyperparameters.batchSize ({hp.batch_size}) "
            f"must be a multiple of microBatchSize ({hp.micro_batch_size or 1}) times {nproc} "
            "processes; change --nproc or set spec.hyperparameters.batchSize",
            file=sys.stderr,
        )
        return int(ExitCode.INVALID_SPEC)
    config = TrainerConfig.for_job(
        job, run_id, world_size=nproc, metrics_port=args.metrics_port, spec_hash=spec_hash(job)
    )
    home = Path(
        args.workdir or os.environ.get("KUBETUNE_HOME", Path.home() / ".cache" / "kubetune")
    )
    reporters: list[Any] = [ProgressBar()]
    if args.metrics_port:
        prometheus = PrometheusReporter(TrainerMetrics())
        prometheus.serve(args.metrics_port, addr="127.0.0.1")
        reporters.append(prometheus)
    print(
        f"==> run {run_id}: {job.spec.method.type} on {job.spec.model.uri} "
        f"-> {config.output_prefix}",
        file=sys.stderr,
    )
    workdir = home / "runs" / f"{job.metadata.name}-{run_id}"
    if nproc > 1:
        result = _run_processes(config, workdir, home / "cache", nproc)
    else:
        trainer_log.addHandler(console)
        propagate, trainer_log.propagate = trainer_log.propagate, False
        try:
            result = run_pipeline(config, Reporters(*reporters), workdir, cache=home / "cache")
        finally:
            trainer_log.removeHandler(console)
            trainer_log.propagate = propagate
    print(summary(job, result))
    if getattr(args, "print_notification", False):
        print("\n" + notification(job, result, config.spec_hash or ""))
    return int(result.exit_code)


def notification(job: FineTuneJob, result: TrainerResult, hashed: str) -> str:
    """What spec.notify.webhook would receive for this run's promotion (kubetune/notify.py),
    as the operator builds it from the run's status; unsigned (the key is a cluster Secret)."""
    from kubetune.notify import promotion_event, record_of, result_status, signed

    if not result.promoted:
        return f"==> no notification: run {result.run_id} was not promoted"
    status = result_status(job, result)
    message = promotion_event(record_of(job, status, hashed), job.spec.output.uri, status)
    message = signed(message, None, result.run_id, datetime.now(UTC))
    hook = job.spec.notify.webhook if job.spec.notify else None
    if hook is None:
        target = "spec.notify.webhook (not set)"
    else:
        target = hook.url or f"the URL in Secret {hook.url_secret.name if hook.url_secret else ''}"
    note = " (the cluster signs it: webhook-signature)" if hook and hook.signing_secret else ""
    return f"==> notification: POST to {target}{note}\n{message.show()}"


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_processes(config: TrainerConfig, workdir: Path, cache: Path, nproc: int) -> TrainerResult:
    """The run as nproc processes of the trainer's launcher (one pod's worth); the bar follows
    rank 0's metrics, which rank 0 serves on 127.0.0.1."""
    from kubetune.progress import parse_metrics
    from kubetune_trainer.launch import launch

    port = config.metrics_port or _free_port()
    config = config.model_copy(update={"metrics_port": port})
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    path.write_text(config.model_dump_json(exclude_none=True))
    os.environ.update(
        {
            Env.NPROC_PER_NODE.value: str(nproc),
            Env.WORKDIR.value: str(workdir),
            Env.CACHE.value: str(cache),
            Env.METRICS_ADDR.value: "127.0.0.1",
            Env.LOG_LEVEL.value: "WARNING",  # the whole log goes to trainer.log
        }
    )
    bar, done = ProgressBar(), threading.Event()

    def follow() -> None:
        stage = None
        while not done.wait(0.5):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    progress, now = parse_metrics(r.read().decode())
            except OSError:
                continue
            if now and now != stage:
                stage = now
                bar.stage(now)
            if progress is not None and progress.total_steps and now == Stage.TRAIN:
                bar.step(progress)

    print(f"==> {nproc} processes", file=sys.stderr)
    thread = threading.Thread(target=follow, name="progress", daemon=True)
    thread.start()
    try:
        result = launch(config, path)
    finally:
        done.set()
        thread.join(5)
        bar.stage(Stage.DONE)
    return result
