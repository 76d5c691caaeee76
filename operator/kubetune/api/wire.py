"""The names on the operator-trainer wire, each defined once: where the config is mounted, the
working directory, the rendezvous port, the environment the trainer reads, its pipeline stages
and Prometheus metrics, and the labels and annotations of what the operator makes.

Beside `contract.py` (the config and the result that cross the wire) and importing nothing, so
that every module of kubetune.api can use them (a profile's reserved paths, a schedule's label).
tests/unit/test_wire.py finds any of these literals elsewhere in the product code.
"""

from __future__ import annotations

from enum import StrEnum

CONFIG_DIR = "/etc/kubetune"  # the run's ConfigMap, mounted read-only
CONFIG_FILE = "config.json"  # the TrainerConfig in it
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"  # the trainer's default config
POD_WORK_DIR = "/work"  # the trainer's working directory in its pod (an emptyDir)
DEFAULT_WORK_DIR = "/tmp/kubetune"  # the trainer's working directory when none is set
TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath
RENDEZVOUS_PORT = 29500  # torchrun's default master port: rank 0's pod, for the others


class Env(StrEnum):
    """The environment the trainer reads. The operator sets WORKDIR and, for a run of several
    processes, the PET_* variables (torchrun's own names for its flags); `kubetune run` sets
    the rest for a local run."""

    CONFIG = "KUBETUNE_CONFIG"  # the config file (default CONFIG_PATH)
    WORKDIR = "KUBETUNE_WORKDIR"  # the working directory (default DEFAULT_WORK_DIR)
    CACHE = "KUBETUNE_CACHE"  # staged data and converted models (default WORKDIR/cache)
    METRICS_ADDR = "KUBETUNE_METRICS_ADDR"  # where the metrics listen (default 0.0.0.0)
    LOG_LEVEL = "KUBETUNE_LOG_LEVEL"  # the log's level (default INFO)
    JOIN_TIMEOUT = "KUBETUNE_JOIN_TIMEOUT_SECONDS"  # how long pods wait for each other
    COLLECTIVE_TIMEOUT = "KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS"  # one collective's limit
    NNODES = "PET_NNODES"  # pods of the run
    NPROC_PER_NODE = "PET_NPROC_PER_NODE"  # processes per pod
    NODE_RANK = "PET_NODE_RANK"  # this pod's index
    MASTER_ADDR = "PET_MASTER_ADDR"  # rank 0's pod
    MASTER_PORT = "PET_MASTER_PORT"  # and its RENDEZVOUS_PORT


class Stage(StrEnum):
    """The trainer's pipeline stages, in order (the `kubetune_trainer_stage` enum's states)."""

    STARTING = "starting"
    DATA = "data"
    MODEL = "model"
    BASELINE = "baseline"  # the base model's (and the champion's) evaluation
    TRAIN = "train"
    EVALUATE = "evaluate"
    EXPORT = "export"
    DONE = "done"
    FAILED = "failed"


# The stages after training: the operator shows such a run as Evaluating.
EVALUATING_STAGES = frozenset({Stage.EVALUATE, Stage.EXPORT})


class TrainerMetric(StrEnum):
    """The trainer's Prometheus metrics (telemetry.py serves them, observe.py reads them)."""

    INFO = "kubetune_trainer"  # an Info: served as kubetune_trainer_info
    STAGE = "kubetune_trainer_stage"  # an Enum: its label has the metric's name
    STEP = "kubetune_trainer_step"
    TOTAL_STEPS = "kubetune_trainer_total_steps"
    EPOCH = "kubetune_trainer_epoch"
    TRAIN_LOSS = "kubetune_trainer_train_loss"
    EVAL_LOSS = "kubetune_trainer_eval_loss"
    LEARNING_RATE = "kubetune_trainer_learning_rate"
    TOKENS_PER_SECOND = "kubetune_trainer_tokens_per_second"
    TOKENS = "kubetune_trainer_tokens"
    ETA_SECONDS = "kubetune_trainer_eta_seconds"
    GPU_MEMORY_BYTES = "kubetune_trainer_gpu_memory_bytes"
    RANK_MEMORY_BYTES = "kubetune_trainer_rank_memory_bytes"
    WORLD_SIZE = "kubetune_trainer_world_size"


# The trainer's container in each pod (its log is what `kubetune logs` reads), and the Job
# controller's annotation (and, since Kubernetes 1.28, label) of an Indexed Job's pod: its rank.
CONTAINER = "trainer"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# Labels and annotations of the objects the operator makes (what it finds its children by).
RUN_LABEL = "kubetune.dev/run-id"
JOB_LABEL = "kubetune.dev/finetunejob"
SPEC_HASH_ANNOTATION = "kubetune.dev/spec-hash"
# The profile a run was resolved against: name@generation (an annotation, for people) and the
# profile's name as a label (what a platform team selects a profile's pods by).
PROFILE_LABEL = "kubetune.dev/profile"
PROFILE_ANNOTATION = "kubetune.dev/profile"
# A run stamped from a FineTuneSchedule: its schedule, and the time it was due.
SCHEDULE_LABEL = "kubetune.dev/schedule"
SCHEDULED_TIME_ANNOTATION = "kubetune.dev/scheduled-time"
# `kubetune rollback SCHEDULE` annotates the schedule with <runId>@<promotedAt> of the record it
# wrote to latest.json; the operator checks it against latest.json before its status shows it.
ROLLBACK_ANNOTATION = "kubetune.dev/rollback"
MANAGED_BY = "kubetune-operator"  # app.kubernetes.io/managed-by of every child
