"""Promotion: latest.json replaced only conditionally, so runs finishing together leave it naming
the best of them (by the deciding gate's metric), never half-written, never losing an update;
on a real S3 server (If-Match / If-None-Match), on file:// (a flock), and against the
requests GCS checks (x-goog-if-generation-match), on a stand-in server (tests/unit/fake_gcs.py)."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import EvalMetrics, ExitCode, GateSpec, PromotionRecord, TrainerResult
from kubetune_trainer import promotion, storage
from kubetune_trainer.errors import SpecError
from tests.unit import fake_gcs

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


# -- GCS: a conditional update needs the generation ---------------------------------------------


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[fake_gcs.FakeGcs]:
    with fake_gcs.serve() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server


def test_every_promotion_on_gcs_sends_the_generation_it_read(gcs: fake_gcs.FakeGcs) -> None:
    """object_store's GCS client refuses a conditional update without the object's generation
    ("Version required for conditional update"); the second promotion failed so until it was
    passed. GCS checks `x-goog-if-generation-match`, not If-Match."""
    output = "gs://bucket/out"
    assert promote(output, "aaaaaaaa", 0.5).promoted
    assert promote(output, "bbbbbbbb", 0.4).promoted
    assert promote(output, "cccccccc", 0.3).promoted
    first, second, third = gcs.writes("latest.json")
    assert first.headers["x-goog-if-generation-match"] == "0"  # only if there is none yet
    generations = [b.generation for b in gcs.blobs.values()]
    assert second.headers["x-goog-if-generation-match"] == str(int(generations[0]) - 2)
    assert third.headers["x-goog-if-generation-match"] == str(int(generations[0]) - 1)
    champion = promotion.read_champion(output)
    assert (champion.record.run_id, champion.record.previous_run_id) == ("cccccccc", "bbbbbbbb")
    assert champion.version == str(generations[0])


def test_a_promotion_on_gcs_that_lost_a_race_decides_again(
    gcs: fake_gcs.FakeGcs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run promotes between this run's read and its write: GCS answers 412 to the
    stale generation, and the run reads the new champion and keeps it (it is better)."""
    output = "gs://bucket/out"
    assert promote(output, "aaaaaaaa", 0.5).promoted
    real = promotion.read_champion
    raced: list[promotion.Outcome | None] = []

    def read_then_lose(uri: str) -> promotion.Champion:
        champion = real(uri)
        if not raced:
            raced.append(None)
            raced[0] = promote(output, "bbbbbbbb", 0.1)  # lands between read and write
        return champion

    monkeypatch.setattr(promotion, "read_champion", read_then_lose)
    late = promote(output, "cccccccc", 0.3, judged="aaaaaaaa")
    assert raced[0].promoted and not late.promoted, late
    assert "run bbbbbbbb was promoted meanwhile" in late.reason
    assert real(output).record.run_id == "bbbbbbbb"
    statuses = [r.headers.get("x-goog-if-generation-match") for r in gcs.writes("latest.json")]
    assert len(statuses) == 3  # a, b, and c's refused write; c did not write again


# -- a corrupt latest.json is the user's to fix ---------------------------------------------


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        pytest.param(b'{"runId": "aaaa', "Invalid JSON", id="truncated"),
        pytest.param(b"\xff\xfe not utf-8", "Invalid JSON", id="binary"),
        pytest.param(b'{"job": "x"}', "runId: Field required", id="not-a-record"),
        pytest.param(b"[]", "the document", id="an-array"),
    ],
)
def test_a_corrupt_latest_json_is_a_spec_error_naming_the_uri(
    output: str, content: bytes, detail: str
) -> None:
    """Retrying cannot mend it: it fails at once (exit code 2) and says how to mend it."""
    uri = storage.join(output, "latest.json")
    storage.write_bytes(uri, content)
    with pytest.raises(SpecError) as raised:
        promotion.read_champion(output)
    message = str(raised.value)
    assert raised.value.exit_code == ExitCode.INVALID_SPEC
    assert message.startswith(f"spec.output.uri: {uri} is not a promotion record ("), message
    assert detail in message and "restore an earlier version of it, or delete it" in message
    with pytest.raises(SpecError):
        promote(output, "aaaaaaaa", 0.1)  # never overwritten unread
    assert storage.read_bytes(uri) == content


# -- settle: a run's whole way to latest.json, on file:// -------------------------------------


def _result(run_id: str, promoted: bool = True) -> TrainerResult:
    outcome = "Succeeded" if promoted else "GatesFailed"
    code = ExitCode.SUCCEEDED if promoted else ExitCode.GATES_FAILED
    return TrainerResult(
        run_id=run_id, outcome=outcome, exit_code=code, message="", promoted=promoted
    )


class Published:
    """The export stage's side, recorded: each write (result, why) and each publish."""

    def __init__(self, output: str, run_id: str, loss: float, rival: tuple[str, float] | None):
        self.output, self.rival = output, rival
        self.decide = promotion.decider(run_id, GATES, EvalMetrics(loss=loss), None)
        self.writes: list[tuple[TrainerResult, str]] = []
        self.publishes: list[tuple[str | None, tuple[str, ...]]] = []

    def publish(
        self, rec: PromotionRecord | None, only: tuple[str, ...]
    ) -> promotion.Outcome | None:
        self.publishes.append((rec.run_id if rec else None, only))
        if rec is None:
            return None
        if self.rival is not None:  # a run promoted between the check and this write
            promote(self.output, *self.rival)
        return promotion.promote(self.output, rec, self.decide)

    def files(self) -> promotion.RunFiles:
        return promotion.RunFiles(
            write=lambda res, why: self.writes.append((res, why)),
            publish=self.publish,
            lost=lambda why: _result("bbbbbbbb", promoted=False).model_copy(
                update={"message": why}
            ),
        )


WHEN = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _settle(output: str, loss: float, rival: tuple[str, float] | None) -> tuple[Any, Published]:
    io = Published(output, "bbbbbbbb", loss, rival)
    settled = promotion.settle(
        output,
        "bbbbbbbb",
        _result("bbbbbbbb"),
        "",
        lambda res: record(res.run_id, loss).model_copy(update={"promoted_at": WHEN}),
        io.files(),
    )
    return settled, io


def test_a_run_that_wins_is_published_once_and_names_what_it_replaced(tmp_path: Path) -> None:
    output = (tmp_path / "out").as_uri()
    promote(output, "aaaaaaaa", 0.5)
    settled, io = _settle(output, 0.4, None)
    assert settled.promoted and settled.previous_run_id == "aaaaaaaa"
    assert settled.promoted_at == WHEN
    assert io.publishes == [("bbbbbbbb", ())]
    assert [w[0] for w in io.writes] == [settled]


def test_a_run_that_loses_the_race_says_so_in_its_own_files_published_again(
    tmp_path: Path,
) -> None:
    output = (tmp_path / "out").as_uri()
    settled, io = _settle(output, 0.5, ("cccccccc", 0.3))
    assert not settled.promoted
    assert "run cccccccc was promoted meanwhile with a better loss" in settled.message
    assert io.publishes == [("bbbbbbbb", ()), (None, promotion.RESULT_FILES)]
    assert io.writes[-1] == (settled, settled.message)
    assert promotion.read_champion(output).record.run_id == "cccccccc"


def test_a_run_that_still_wins_over_a_run_promoted_meanwhile_names_that_run(
    tmp_path: Path,
) -> None:
    output = (tmp_path / "out").as_uri()
    settled, io = _settle(output, 0.2, ("cccccccc", 0.3))
    assert settled.promoted and settled.previous_run_id == "cccccccc"
    assert io.publishes == [("bbbbbbbb", ()), (None, promotion.RESULT_FILES)]
    assert io.writes[-1] == (settled, "")
