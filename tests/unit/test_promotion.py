"""Promotion: latest.json replaced only conditionally, so runs finishing together leave it naming
the best of them (by the deciding gate's metric), never half-written, never losing an update;
on a real S3 server (If-Match / If-None-Match) and on file:// (a flock)."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from kubetune.api import EvalMetrics, GateSpec, PromotionRecord
from kubetune_trainer import promotion, storage

GATES = [
    GateSpec.model_validate({"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"})
]


def record(run_id: str, loss: float) -> PromotionRecord:
    return PromotionRecord(run_id=run_id, metrics=EvalMetrics(loss=loss))


def promote(output: str, run_id: str, loss: float, judged: str | None = None) -> promotion.Outcome:
    decide = promotion.decider(run_id, GATES, EvalMetrics(loss=loss), judged)
    return promotion.promote(output, record(run_id, loss), decide)


@pytest.fixture(params=["file", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return f"s3://models/promotion-{random.randrange(10**9)}"
    return (tmp_path / "out").as_uri()


def test_a_later_but_worse_run_does_not_replace_a_better_one(output: str) -> None:
    """Both judged against nothing promoted (they started before either finished)."""
    assert promote(output, "bbbbbbbb", 0.4).promoted
    late = promote(output, "aaaaaaaa", 0.5)
    assert not late.promoted
    assert late.reason == (
        "run bbbbbbbb was promoted meanwhile with a better loss (0.4 against 0.5); it stays "
        "promoted"
    )
    assert promotion.read_champion(output).record.run_id == "bbbbbbbb"


def test_a_later_and_better_run_replaces_and_remembers_the_previous(output: str) -> None:
    assert promote(output, "aaaaaaaa", 0.5).promoted
    assert promote(output, "bbbbbbbb", 0.4).promoted
    champion = promotion.read_champion(output).record
    assert (champion.run_id, champion.previous_run_id) == ("bbbbbbbb", "aaaaaaaa")


def test_the_champion_a_run_was_judged_against_is_replaced_without_a_second_look(
    output: str,
) -> None:
    """Its gates already compared with this champion on the same test set."""
    assert promote(output, "aaaaaaaa", 0.3).promoted
    assert promote(output, "bbbbbbbb", 0.5, judged="aaaaaaaa").promoted


def test_runs_promoting_at_once_leave_the_best(output: str) -> None:
    losses = [round(random.uniform(0.1, 1.0), 4) for _ in range(8)]
    start = threading.Barrier(len(losses))
    outcomes: dict[str, promotion.Outcome] = {}

    def run(i: int) -> None:
        start.wait()
        outcomes[f"run{i:05d}"] = promote(output, f"run{i:05d}", losses[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(losses))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    best = f"run{losses.index(min(losses)):05d}"
    champion = promotion.read_champion(output).record
    assert champion.run_id == best, (losses, outcomes)
    assert outcomes[best].promoted
    # The file is whole: it parses, and names a run that believed itself promoted.
    raw = storage.read_bytes(storage.join(output, "latest.json"))
    assert json.loads(raw)["runId"] == best


def test_without_a_champion_gate_the_later_run_wins(output: str) -> None:
    decide = promotion.decider("bbbbbbbb", [], EvalMetrics(loss=0.9), None)
    assert promote(output, "aaaaaaaa", 0.1).promoted
    assert promotion.promote(output, record("bbbbbbbb", 0.9), decide).promoted
    assert promotion.read_champion(output).record.run_id == "bbbbbbbb"


def test_a_record_written_before_this_schema_still_reads(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "latest.json").write_text(
        json.dumps(
            {
                "runId": "0123abcd",
                "job": "sql",
                "adapterUri": "s3://m/a/",
                "mergedUri": None,
                "manifestUri": "s3://m/manifest.json",
                "metrics": {"loss": 0.5},
            }
        )
    )
    champion = promotion.read_champion(out.as_uri()).record
    assert champion is not None and champion.run_id == "0123abcd"
    assert champion.metrics.loss == 0.5 and champion.base_model is None
