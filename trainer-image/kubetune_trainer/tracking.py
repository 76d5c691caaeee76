"""Experiment tracking: MLflow and Weights & Biases get what the run reports.

Each tracker named in `spec.tracking` receives the run's parameters (the resolved spec and the
data it read), the training curves (loss, learning rate, epoch and throughput per step, validation
loss), and at the end the evaluation of the tuned and base models, the gate verdicts, the outcome
and the artifact URIs. A run that resumes after preemption continues the same tracked run.

Tracking never decides anything: a tracker that fails is dropped with a warning on the run's
result, and training goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from kubetune.api import TrainerConfig, TrainerResult
from kubetune_trainer.errors import SpecError
from kubetune_trainer.gates import describe
from kubetune_trainer.telemetry import StepInfo

log = logging.getLogger("kubetune_trainer")

# The files of a run an MLflow run gets a copy of (spec.tracking.mlflow.logFiles).
MLFLOW_FILES = ("report.md", "loss.png", "metrics.json", "result.json")
# MLflow's client retries a failed request 7 times with growing pauses (minutes in all); a
# tracker that cannot be reached must not stall training that long.
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
FLUSH_SECONDS = 5.0  # step metrics are sent in batches, at most this far apart
RUN_ID_TAG = "kubetune.runId"


class Tracker(Protocol):
    name: str
    field: str  # the spec field that asks for it
    module: str  # the client library it needs

    def start(self) -> None: ...
    def params(self, values: dict[str, Any]) -> None: ...
    def stage(self, name: str, detail: str = "") -> None: ...
    def step(self, info: StepInfo) -> None: ...
    def eval_loss(self, step: int, loss: float) -> None: ...
    def finish(self, result: TrainerResult, staging: Path) -> None: ...
    def close(self, result: TrainerResult, staging: Path | None) -> None: ...


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as one level of dotted keys (gates.0.metric)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def spec_params(config: TrainerConfig) -> dict[str, Any]:
    """The resolved spec, without the trackers' own settings."""
    spec = config.spec.model_dump(mode="json", exclude_none=True, exclude={"tracking"})
    return {"runId": config.run_id, **spec}


def step_metrics(info: StepInfo) -> dict[str, float]:
    values = {
        "train/loss": info.loss,
        "train/learning_rate": info.learning_rate,
        "train/epoch": info.epoch,
        "train/tokens_per_second": info.tokens_per_second,
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def final_metrics(result: TrainerResult) -> dict[str, float]:
    """tuned/<metric> and base/<metric> of the final evaluation, gates passed, train time."""
    out: dict[str, float] = {}
    if result.metrics:
        for side in ("tuned", "base"):
            evaluated = getattr(result.metrics, side)
            if evaluated is not None:
                for key, value in evaluated.model_dump(mode="json", exclude_none=True).items():
                    out[f"{side}/{key}"] = float(value)
    if result.gates:
        out["gates/passed"] = float(sum(g.passed for g in result.gates))
        out["gates/failed"] = float(sum(not g.passed for g in result.gates))
    if result.train_seconds is not None:
        out["train/seconds"] = result.train_seconds
    return out


def outcome_tags(result: TrainerResult) -> dict[str, str]:
    """The outcome, the gate verdicts and the artifact URIs, as kubetune.* strings."""
    tags = {
        "kubetune.outcome": result.outcome,
        "kubetune.promoted": str(result.promoted).lower(),
        "kubetune.message": result.message[:5000],
    }
    for i, gate in enumerate(result.gates):
        tags[f"kubetune.gate.{i}"] = f"{'passed' if gate.passed else 'FAILED'}: {describe(gate)}"
    artifacts = (
        result.artifacts.model_dump(by_alias=True, exclude_none=True) if result.artifacts else {}
    )
    for key, uri in artifacts.items():
        tags[f"kubetune.artifacts.{key}"] = uri
    if result.warnings:
        tags["kubetune.warnings"] = "\n".join(result.warnings)[:5000]
    return tags


def _checkpoint_follows(config: TrainerConfig, info: StepInfo) -> bool:
    """Whether a checkpoint is saved after this step: what was sent by then is never lost,
    since a resumed run starts after the checkpoint."""
    every = config.spec.hyperparameters.checkpoint_every_steps
    epoch_end = info.epoch >= 1 and abs(info.epoch - round(info.epoch)) < 1e-6
    return epoch_end or bool(every and info.step % every == 0)  # training.SaveAtEpochEnd


class MlflowTracker:
    """One MLflow run per kubetune run, found again by its kubetune.runId tag on resume."""

    name = "MLflow"
    field = "spec.tracking.mlflow"
    module = "mlflow"

    def __init__(self, config: TrainerConfig) -> None:
        tracking = config.spec.tracking
        assert tracking is not None and tracking.mlflow is not None
        self.spec = tracking.mlflow
        self.config = config
        self.client: Any = None
        self.run_id = ""
        self.pending: list[Any] = []
        self.flushed = time.monotonic()
        self.step_no = 0

    def start(self) -> None:
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        config = self.config
        self.client = client = MlflowClient(tracking_uri=self.spec.tracking_uri)
        name = self.spec.experiment or "/".join(
            part for part in (config.namespace, config.job_name) if part
        )
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name)
            except MlflowException:  # created by another run meanwhile
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_ID_TAG}` = '{config.run_id}'",
            max_results=1,
        )
        if found and found[0].info.status != "FINISHED":
            self.run_id = found[0].info.run_id  # an earlier attempt of this run: continue it
            client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow continues run=%s experiment=%s", self.run_id, name)
        else:
            tags = {
                RUN_ID_TAG: config.run_id,
                "kubetune.job": config.job_name,
                "kubetune.namespace": config.namespace or "",
                "mlflow.source.name": "kubetune",
                **self.spec.tags,
            }
            run = client.create_run(
                experiment_id,
                run_name=self.spec.run_name or f"{config.job_name}-{config.run_id}",
                tags=tags,
            )
            self.run_id = run.info.run_id
            log.info(
                "MLflow run=%s url=%s/#/experiments/%s/runs/%s",
                self.run_id,
                self.spec.tracking_uri.rstrip("/"),
                experiment_id,
                self.run_id,
            )
        self.params(flatten(spec_params(config)))

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = [
            Param(key, str(value)[:6000])
            for key, value in values.items()
            if key not in existing and value is not None
        ]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per request
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, v, now, step) for k, v in values.items())

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.flushed = time.monotonic()

    def stage(self, name: str, detail: str = "") -> None:
        self._flush()
        self.client.set_tag(self.run_id, "kubetune.stage", name)

    def step(self, info: StepInfo) -> None:
        self.step_no = info.step
        self._metrics(step_metrics(info), info.step)
        if (
            time.monotonic() - self.flushed >= FLUSH_SECONDS
            or info.step == info.total_steps
            or _checkpoint_follows(self.config, info)
        ):
            self._flush()

    def eval_loss(self, step: int, loss: float) -> None:
        self._metrics({"validation/loss": loss}, step)

    def finish(self, result: TrainerResult, staging: Path) -> None:
        from mlflow.entities import RunTag

        self._metrics(final_metrics(result), result.steps or self.step_no)
        self._flush()
        tags = [RunTag(k, v) for k, v in outcome_tags(result).items()]
        tags.append(RunTag("mlflow.note.content", result.message))
        self.client.log_batch(self.run_id, tags=tags)

    def close(self, result: TrainerResult, staging: Path | None) -> None:
        from mlflow.entities import RunTag

        if result.outcome == "Failed":
            self._flush()
            tags = [RunTag(k, v) for k, v in outcome_tags(result).items()]
            self.client.log_batch(self.run_id, tags=tags)
        elif self.spec.log_files and staging is not None:
            for name in MLFLOW_FILES:
                if (staging / name).exists():
                    self.client.log_artifact(self.run_id, str(staging / name))
        # A gate verdict is a result, not a failure of the run; a trainer failure is.
        status = "FAILED" if result.outcome == "Failed" else "FINISHED"
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
    """One W&B run per kubetune run, its id derived from the run id (so a resume continues it);
    offline, its records go into the run's folder for `wandb sync`."""

    name = "W&B"
    field = "spec.tracking.wandb"
    module = "wandb"

    def __init__(self, config: TrainerConfig, workdir: Path) -> None:
        tracking = config.spec.tracking
        assert tracking is not None and tracking.wandb is not None
        self.spec = tracking.wandb
        self.config = config
        self.dir = workdir / "wandb-files"
        self.run: Any = None

    def start(self) -> None:
        import wandb

        config = self.config
        self.dir.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {"console": "off", "silent": True}
        if self.spec.base_url:
            settings["base_url"] = self.spec.base_url
        run_id = f"{config.job_name}-{config.run_id}".replace(".", "-")
        self.run = wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            id=run_id,
            name=self.spec.run_name or f"{config.job_name}-{config.run_id}",
            resume="allow",
            mode=self.spec.mode,
            dir=str(self.dir),
            job_type="fine-tune",
            tags=self.spec.tags or None,
            config=spec_params(config),
            settings=wandb.Settings(**settings),
        )
        url = self.run.url if self.spec.mode == "online" else None
        log.info("W&B run=%s mode=%s url=%s", run_id, self.spec.mode, url or "-")

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def stage(self, name: str, detail: str = "") -> None:
        if self.run is not None:  # None once finished (the "done" stage comes after)
            self.run.summary["kubetune/stage"] = name

    def step(self, info: StepInfo) -> None:
        # W&B ignores steps below the last one logged: after a resume, the steps between the
        # checkpoint and the preemption keep their first values.
        self.run.log(step_metrics(info), step=info.step)

    def eval_loss(self, step: int, loss: float) -> None:
        self.run.log({"validation/loss": loss}, step=step)

    def finish(self, result: TrainerResult, staging: Path) -> None:
        import wandb

        self.run.summary.update({**final_metrics(result), **outcome_tags(result)})
        self.run.finish(exit_code=0)
        self.run = None
        # finish() only tells wandb-core the run is done (a message it does not wait on); the
        # run's .wandb file is complete once the service has shut down, which teardown waits
        # for. Copied earlier, the offline records could stop short of the run record (seen once
        # on a busy machine).
        try:
            wandb.teardown()
        except SystemExit as exc:  # teardown exits the process when wandb-core failed
            raise RuntimeError(f"wandb-core exited with code {exc.code}") from None
        if self.spec.mode == "offline":
            # The offline records go with the run's files (and into its manifest).
            shutil.copytree(self.dir / "wandb", staging / "wandb", symlinks=True)

    def close(self, result: TrainerResult, staging: Path | None) -> None:
        if self.run is not None:  # the run failed before finish
            self.run.summary.update(outcome_tags(result))
            self.run.finish(exit_code=int(result.exit_code) or 1)


class Tracking:
    """The configured trackers, fed as one reporter. A tracker that raises is dropped; what
    happened becomes a warning of the run."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers
        self.warnings: list[str] = []

    @classmethod
    def for_config(cls, config: TrainerConfig, workdir: Path) -> Tracking:
        tracking = config.spec.tracking
        trackers: list[Tracker] = []
        if tracking and tracking.mlflow:
            trackers.append(MlflowTracker(config))
        if tracking and tracking.wandb:
            trackers.append(WandbTracker(config, workdir))
        return cls(trackers)

    def check_installed(self) -> None:
        """A job that asks for a tracker needs its client; the trainer image has both, a local
        environment may not. Said before anything runs, rather than found out after training."""
        for tracker in self.trackers:
            if find_spec(tracker.module) is None:
                raise SpecError(
                    f"{tracker.field}: the {tracker.name} client ({tracker.module}) is not "
                    "installed here; pip install 'kubetune[tracking]' (the trainer image has it)"
                )

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:
                self.trackers.remove(tracker)
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                message = (
                    f"{tracker.name} tracking stopped ({method}): {type(exc).__name__}: {first}; "
                    "the run went on without it"
                )
                log.warning("%s", message)
                self.warnings.append(message)

    def start(self) -> None:
        self._each("start")

    def params(self, values: dict[str, Any]) -> None:
        self._each("params", values)

    def stage(self, name: str, detail: str = "") -> None:
        self._each("stage", name, detail)

    def step(self, info: StepInfo) -> None:
        self._each("step", info)

    def eval_loss(self, step: int, loss: float) -> None:
        self._each("eval_loss", step, loss)

    def finish(self, result: TrainerResult, staging: Path) -> None:
        self._each("finish", result, staging)

    def close(self, result: TrainerResult, staging: Path | None) -> None:
        self._each("close", result, staging)
