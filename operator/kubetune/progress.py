"""A trainer's progress as its Prometheus endpoint tells it (the names in api/wire.py): what the
operator writes to status.progress and what `kubetune run`'s progress bar shows."""

from __future__ import annotations

import math
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import Progress
from kubetune.api.wire import TrainerMetric

# The most a count read from a trainer's metrics may be: what a float holds exactly (and far
# below the API's int64).
MAX_COUNT = 2**53


def parse_metrics(text: str, now: datetime | None = None) -> tuple[Progress | None, str | None]:
    """status.progress and the pipeline stage from the trainer's Prometheus metrics. The text is
    whatever answers on the pod's port (an allowed custom image's, too), so nothing in it may
    fail a reconcile: text that is not Prometheus's is no reading; values that are not finite
    (a diverging loss is NaN: JSON, and so the API, has none), negative where the field cannot
    be, or beyond MAX_COUNT are left out."""
    values: dict[str, float] = {}
    stage = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == TrainerMetric.STAGE:
                    if sample.value == 1:
                        stage = sample.labels.get(TrainerMetric.STAGE)
                elif not sample.labels and math.isfinite(sample.value):
                    values[sample.name] = sample.value
    except ValueError:
        return None, None

    def amount(metric: TrainerMetric) -> float | None:
        value = values.get(metric)
        return value if value is not None and 0 <= value <= MAX_COUNT else None

    def count(metric: TrainerMetric) -> int | None:
        value = amount(metric)
        return int(value) if value is not None else None

    step = count(TrainerMetric.STEP)
    if step is None:
        return None, stage
    total = count(TrainerMetric.TOTAL_STEPS) or None
    return (
        Progress(
            step=step,
            total_steps=total,
            percent=min(100, int(100 * step / total)) if total else None,
            epoch=amount(TrainerMetric.EPOCH),
            loss=values.get(TrainerMetric.TRAIN_LOSS),
            tokens_per_second=amount(TrainerMetric.TOKENS_PER_SECOND),
            eta_seconds=count(TrainerMetric.ETA_SECONDS),
            tokens=count(TrainerMetric.TOKENS) or None,
            updated_at=now,
        ),
        stage,
    )
