"""Promotion: the one place that reads the current champion and replaces `<output>/latest.json`.

latest.json names the promoted run and what a server needs to load it (PromotionRecord). It is
replaced only by a conditional write, so two runs finishing at once can neither lose an update
nor leave a half-written file:

- object storage (s3://, gs://, az://): a PUT conditional on the version read (or on there
  being none yet); a 412 means another run promoted meanwhile. The version is both the ETag and
  the object's version as read, because each store checks its own: S3 and Azure send
  `If-Match: <ETag>`, GCS `x-goog-if-generation-match: <generation>` (object_store refuses a
  conditional update on GCS without the generation); `If-None-Match: *` or generation 0 when
  there is no latest.json yet;
- file://: an exclusive `flock` on `latest.json.lock` around read-decide-write, the file itself
  replaced by a rename (obstore's local store writes a temporary file and renames it).

Between two runs promoting at once, the better one stays promoted: after a conflict the run
re-reads the new champion and promotes itself only if it still beats that champion on the
deciding metric (the metric of its first gate that compares with the promoted run), keeping it
otherwise; with no such gate, the later run wins.

A run's whole way there (`settle`): decided before its models are saved (a run that already
lost merges nothing), its files published, latest.json written conditionally, and its own
files rewritten and published again when a run promoted in the moment between decided
otherwise, so that result.json never claims a promotion latest.json does not show.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import obstore
from pydantic import ValidationError

from kubetune.api import (
    RUN_RECORD,
    EvalMetrics,
    GateSpec,
    PromotionRecord,
    TrainerResult,
    latest_uri,
)
from kubetune_trainer import storage
from kubetune_trainer.errors import SpecError
from kubetune_trainer.gates import improvement, metric_value

log = logging.getLogger(__name__)

ATTEMPTS = 8  # conflicts in a row before giving up: runs finishing within the same second


@dataclass(frozen=True)
class Champion:
    """latest.json as read: the record (None: nothing promoted yet) and its version: the ETag
    (S3, Azure) and the store's own version (GCS's generation; S3's version id on a versioned
    bucket), whichever the store gave."""

    record: PromotionRecord | None
    etag: str | None = None
    version: str | None = None

    def update_mode(self) -> dict[str, str]:
        """obstore's put mode that replaces exactly this version (UpdateVersion)."""
        return {k: v for k, v in (("e_tag", self.etag), ("version", self.version)) if v}


@dataclass(frozen=True)
class Outcome:
    promoted: bool
    reason: str  # why not, when not
    previous: PromotionRecord | None  # the champion this run replaced, or kept


# Given the champion that is there now (None: none), why this run must not replace it (None: go).
Decide = Callable[[PromotionRecord | None], str | None]


def read_champion(output_uri: str) -> Champion:
    """The promoted run of an output (its latest.json) and the version it was read at."""
    uri = latest_uri(output_uri)
    loc = storage.locate(uri)
    try:
        got = obstore.get(loc.store, loc.key())
    except FileNotFoundError:
        return Champion(None)
    try:
        record = PromotionRecord.model_validate_json(bytes(got.bytes()))
    except ValidationError as exc:  # not JSON, or not a record: no retry can fix it
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "the document"
        raise SpecError(
            f"spec.output.uri: {uri} is not a promotion record ({where}: {problem['msg']}); "
            "it names the promoted run of this output and only kubetune should write it: "
            "restore an earlier version of it, or delete it (the next run that passes its "
            "gates is then promoted without comparison)"
        ) from exc
    return Champion(record, got.meta.get("e_tag"), got.meta.get("version"))


def promote(output_uri: str, record: PromotionRecord, decide: Decide) -> Outcome:
    """Make record the promoted run of output_uri if decide agrees, atomically."""
    uri = latest_uri(output_uri)
    if urlsplit(uri).scheme == "file":
        latest = Path(urlsplit(uri).path)
        with storage.file_lock(latest.with_name(f"{latest.name}.lock")):
            champion = read_champion(output_uri)
            return _write(uri, record, champion, decide, conditional=False)
    for _ in range(ATTEMPTS):
        champion = read_champion(output_uri)
        try:
            return _write(uri, record, champion, decide, conditional=True)
        except (obstore.exceptions.PreconditionError, obstore.exceptions.AlreadyExistsError):
            log.info("latest.json changed meanwhile (another run promoted); deciding again")
    raise storage.TrainerError(
        f"cannot promote to {uri}: it kept changing ({ATTEMPTS} conflicting writes in a row)"
    )


def _write(
    uri: str, record: PromotionRecord, champion: Champion, decide: Decide, *, conditional: bool
) -> Outcome:
    why_not = decide(champion.record)
    if why_not is not None:
        return Outcome(False, why_not, champion.record)
    if champion.record is not None and champion.record.run_id != record.run_id:
        record = record.model_copy(update={"previous_run_id": champion.record.run_id})
    body = (record.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n").encode()
    loc = storage.locate(uri)
    if not conditional:
        obstore.put(loc.store, loc.key(), body)
    elif champion.record is None:
        obstore.put(loc.store, loc.key(), body, mode="create")
    else:
        obstore.put(loc.store, loc.key(), body, mode=champion.update_mode())
    log.info("Promoted run=%s uri=%s previous=%s", record.run_id, uri, record.previous_run_id)
    return Outcome(True, "", champion.record)


def decider(run_id: str, gates: list[GateSpec], tuned: EvalMetrics, judged: str | None) -> Decide:
    """Whether a run whose gates passed may replace the champion that is there now. The one
    its gates judged it against (judged; None: nothing was promoted), or itself: yes. Another,
    promoted meanwhile: only if this run is not worse on the deciding metric (its first gate
    that compares with the promoted run); with no such gate, the later run wins."""
    deciding = next((g for g in gates if g.reference() == "promoted"), None)

    def decide(current: PromotionRecord | None) -> str | None:
        if current is None or current.run_id in (judged, run_id) or deciding is None:
            return None
        metric = deciding.metric
        ours = metric_value(tuned, metric)
        theirs = metric_value(current.metrics, metric)
        if ours is None or theirs is None or improvement(metric, ours, theirs) >= 0:
            return None
        return (
            f"run {current.run_id} was promoted meanwhile with a better {metric} "
            f"({theirs:.4g} against {ours:.4g}); it stays promoted"
        )

    return decide


def other_run(record: PromotionRecord | None, run_id: str) -> str | None:
    """The run a promotion replaces: the champion's, unless it is this run itself (a resume)."""
    return record.run_id if record is not None and record.run_id != run_id else None


Publish = Callable[[PromotionRecord | None, tuple[str, ...]], Outcome | None]


@dataclass(frozen=True)
class RunFiles:
    """What the race needs from the export stage, which owns the run's files."""

    # The run's own files (result.json, report.md, ...) staged from a result, and why a run
    # promoted meanwhile kept latest.json ("": none did).
    write: Callable[[TrainerResult, str], None]
    # The staged files uploaded (only these names, when given; the manifest always), then,
    # with a record, latest.json written by `promote`; its Outcome, None without a record.
    publish: Publish
    # The result of this run once it lost latest.json to a better run, and why.
    lost: Callable[[str], TrainerResult]


def settle(
    output_uri: str,
    run_id: str,
    result: TrainerResult,
    superseded: str,
    record: Callable[[TrainerResult], PromotionRecord],
    files: RunFiles,
) -> TrainerResult:
    """The run published and, when its result says promoted, made the promoted run: its
    result first says what the promotion will (when, and the run it replaces, read now); the
    files are written and published, then latest.json conditionally. If a better run took
    latest.json in the moment between, or another run was promoted then and this one still
    replaced it, the run's own files say so and are published again, the manifest last.
    Returns the result as published."""
    promoting = None
    if result.promoted:
        promoting = record(result)
        current = read_champion(output_uri).record
        update = {
            "promoted_at": promoting.promoted_at,
            "previous_run_id": other_run(current, run_id),
        }
        result = result.model_copy(update=update)
    files.write(result, superseded)
    outcome = files.publish(promoting, ())
    if outcome is None:
        return result
    if not outcome.promoted:
        result = files.lost(outcome.reason).model_copy(update={"warnings": result.warnings})
        files.write(result, outcome.reason)
    elif (previous := other_run(outcome.previous, run_id)) != result.previous_run_id:
        result = result.model_copy(update={"previous_run_id": previous})
        files.write(result, superseded)
    else:
        return result
    files.publish(None, RESULT_FILES)
    return result


RESULT_FILES = ("result.json", "report.md", "metrics.json", "eval_samples.jsonl", RUN_RECORD)
