"""The shared model cache (a profile's modelCache) and gated Hugging Face models.

The cache: two runs staging the same model at once fetch it once (on a volume, with flock; in
object storage, with a conditional create); an object-storage lock whose holder stopped
beating is taken over within a few beats, never a live holder's, never a successor's; and the
real trainer's second run loads the model from the cache after it is gone from its source.
Gated models: a fake Hub on 127.0.0.1 answers as the real one does (401 and 403 with
X-Error-Code: GatedRepo) and the trainer ends with a permanent failure naming the Secret."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kubetune.api import ExitCode, ModelCacheSpec, TrainerResult
from kubetune_trainer import model_cache, storage
from kubetune_trainer.model_cache import MARKER, ModelCache
from kubetune_trainer.pipeline import run as run_pipeline
from tests.support.s3 import S3Server
from tests.trainer.conftest import Recorder, config_for, job_manifest
from tests.unit import fake_gcs


def _slow_fetch(counter: Path) -> Any:
    def fetch(target: Path) -> None:
        with counter.open("a") as out:
            out.write("fetch\n")
        time.sleep(1.0)  # long enough for the other run to arrive meanwhile
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    return fetch


def _stage_on_volume(root: str, counter: str, out: str) -> None:
    cache = ModelCache(ModelCacheSpec(path=root), Path(out))
    entry = cache.get("s3://models/m", None, _slow_fetch(Path(counter)))
    Path(out, "entry").write_text(str(entry))


def test_two_runs_on_a_volume_fetch_the_model_once(tmp_path: Path) -> None:
    counter = tmp_path / "fetches"
    context = multiprocessing.get_context("spawn")  # two processes, as two pods
    runs = [
        context.Process(
            target=_stage_on_volume, args=(str(tmp_path / "cache"), str(counter), str(out))
        )
        for out in (tmp_path / "a", tmp_path / "b")
    ]
    for out in (tmp_path / "a", tmp_path / "b"):
        out.mkdir()
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
        assert run.exitcode == 0
    assert counter.read_text() == "fetch\n"
    entries = {(tmp_path / d / "entry").read_text() for d in ("a", "b")}
    (entry,) = entries
    assert (Path(entry) / "config.json").is_file() and (Path(entry) / MARKER).is_file()
    assert json.loads((Path(entry) / MARKER).read_text())["files"] == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if "partial" in p.name) == []


def test_two_runs_in_object_storage_fetch_the_model_once(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_cache, "POLL_SECONDS", 0.1)
    counter = tmp_path / "fetches"
    spec = ModelCacheSpec(uri="s3://models/model-cache")
    entries: list[Path] = []

    def stage(name: str) -> None:
        cache = ModelCache(spec, tmp_path / name)
        entries.append(cache.get("hf://org/model", "main", _slow_fetch(counter)))

    threads = [threading.Thread(target=stage, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counter.read_text() == "fetch\n"
    assert len(entries) == 2 and all((e / "config.json").is_file() for e in entries)
    name = model_cache.entry_name("hf://org/model", "main")
    assert name.startswith("model-")
    keys = storage.list_keys("s3://models/model-cache")
    assert sorted(keys) == [f"{name}.lock", f"{name}/{MARKER}", f"{name}/config.json"]
    released = json.loads(storage.read_bytes(f"s3://models/model-cache/{name}.lock"))
    assert released["released"] is True  # kept, released: no delete can be made conditional


class FakeClock:
    """Wall and monotonic time that move only when the code under test sleeps; on_sleep plays
    what other pods do meanwhile."""

    def __init__(self, start: float, on_sleep: Callable[[FakeClock], None] | None = None) -> None:
        self.now = start
        self.slept = 0.0
        self.on_sleep = on_sleep

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if self.on_sleep is not None:
            self.on_sleep(self)

    def clock(self) -> model_cache.Clock:
        return model_cache.Clock(lambda: self.now, lambda: self.slept, self.sleep)


STALE = model_cache.MISSED_BEATS * model_cache.HEARTBEAT_SECONDS
SOURCE = "s3://models/m"


def _lock_uri(cache_uri: str) -> str:
    return f"{cache_uri}/{model_cache.entry_name(SOURCE, None)}.lock"


def _body(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri))


def _fill_entry(cache_uri: str) -> None:
    """What a holder leaves when its fetch is done: the files, then the marker."""
    entry = f"{cache_uri}/{model_cache.entry_name(SOURCE, None)}"
    storage.write_bytes(f"{entry}/config.json", b"{}")
    storage.write_bytes(f"{entry}/{MARKER}", b"{}")


def _fetch_counting(counter: Path) -> Any:
    def fetch(target: Path) -> None:
        with counter.open("a") as out:
            out.write("fetch\n")
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    return fetch


# (the lock a dead holder left, how long this run waits before taking it over: at least, at most)
# fmt: off
DEAD_LOCKS = [
    pytest.param(lambda now: {"token": "t", "holder": "run-b/node-0", "heartbeatAt": now - 6 * 3600}, (0.0, 0.0), id="heartbeat-hours-old"),
    pytest.param(lambda now: {"token": "t", "holder": "run-b/node-0", "heartbeatAt": now}, (STALE - 2, STALE + model_cache.POLL_SECONDS), id="heartbeat-just-stopped"),
    pytest.param(lambda now: {"token": "t", "holder": "run-a/node-0", "heartbeatAt": now}, (0.0, 0.0), id="this-runs-own-earlier-attempt"),
    pytest.param(lambda now: b"\x00 not a lock", (STALE - 2, STALE + model_cache.POLL_SECONDS), id="unreadable"),
    pytest.param(lambda now: {"createdAt": now}, (STALE - 2, STALE + model_cache.POLL_SECONDS), id="written-by-an-older-trainer"),
]
# fmt: on


@pytest.mark.parametrize(("left", "waited"), DEAD_LOCKS)
def test_a_dead_holders_lock_is_taken_over_within_a_few_beats(
    s3_env: S3Server, tmp_path: Path, left: Callable[[float], Any], waited: tuple[float, float]
) -> None:
    """A fetcher killed mid-fetch blocked every waiter for 6 hours, and an unreadable lock
    forever; now a lock without a heartbeat for MISSED_BEATS beats is taken over (minutes), and
    a retry of the same run and node takes its predecessor's at once."""
    cache_uri = f"s3://models/dead-{tmp_path.name}"
    lock = _lock_uri(cache_uri)
    fake = FakeClock(time.time())
    content = left(fake.now)
    storage.write_bytes(
        lock, content if isinstance(content, bytes) else json.dumps(content).encode()
    )
    counter = tmp_path / "fetches"
    cache = ModelCache(ModelCacheSpec(uri=cache_uri), tmp_path, "run-a/node-0", fake.clock())
    entry = cache.get(SOURCE, None, _fetch_counting(counter))
    assert (entry / "config.json").is_file() and counter.read_text() == "fetch\n"
    assert waited[0] <= fake.slept <= waited[1]
    assert _body(lock)["released"] is True  # released by this run


def test_a_live_holders_lock_is_not_taken_over(s3_env: S3Server, tmp_path: Path) -> None:
    """A holder that keeps beating keeps its lock however long its fetch takes (here ten times
    the staleness bound); the waiter then reads the entry it filled."""
    cache_uri = f"s3://models/live-{tmp_path.name}"
    beats: list[bool] = []

    def holder_meanwhile(fake: FakeClock) -> None:
        if fake.slept < 10 * STALE:
            beats.append(other.beat())
        elif not storage.exists(f"{cache_uri}/{model_cache.entry_name(SOURCE, None)}/{MARKER}"):
            _fill_entry(cache_uri)
            assert other.release()

    fake = FakeClock(time.time(), holder_meanwhile)
    other = model_cache.StoreLock(_lock_uri(cache_uri), "run-b/node-0", fake.clock())
    assert other.acquire(None)
    counter = tmp_path / "fetches"
    cache = ModelCache(ModelCacheSpec(uri=cache_uri), tmp_path, "run-a/node-0", fake.clock())
    entry = cache.get(SOURCE, None, _fetch_counting(counter))
    assert not counter.exists()  # never fetched: never took the lock
    assert (entry / "config.json").is_file() and fake.slept >= 10 * STALE
    assert beats and all(beats)  # the holder never lost its lock


def test_a_takeover_never_replaces_a_successors_lock(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two waiters find the same dead lock; the other takes it over between this one's read
    and its write. This one's write, conditional on the version it read, fails: the
    successor keeps the lock, fills the entry, and this one reads it."""
    cache_uri = f"s3://models/race-{tmp_path.name}"
    lock = _lock_uri(cache_uri)
    dead = {"token": "t", "holder": "run-c/node-0", "heartbeatAt": time.time() - 6 * 3600}
    storage.write_bytes(lock, json.dumps(dead).encode())
    successor_tokens: list[str] = []

    def successor_finishes(fake: FakeClock) -> None:
        if not storage.exists(f"{cache_uri}/{model_cache.entry_name(SOURCE, None)}/{MARKER}"):
            assert _body(lock)["token"] == successor.token  # still the successor's
            _fill_entry(cache_uri)
            assert successor.release()

    fake = FakeClock(time.time(), successor_finishes)
    successor = model_cache.StoreLock(lock, "run-b/node-0", fake.clock())
    real_read = model_cache.StoreLock.read

    def read_then_lose_the_race(self: model_cache.StoreLock) -> Any:
        seen = real_read(self)
        if self is not successor and not successor_tokens:
            assert successor.acquire(seen)  # the other waiter's takeover lands first
            successor_tokens.append(successor.token)
        return seen

    monkeypatch.setattr(model_cache.StoreLock, "read", read_then_lose_the_race)
    counter = tmp_path / "fetches"
    cache = ModelCache(ModelCacheSpec(uri=cache_uri), tmp_path, "run-a/node-0", fake.clock())
    entry = cache.get(SOURCE, None, _fetch_counting(counter))
    assert successor_tokens and not counter.exists()
    assert (entry / "config.json").is_file()
    assert _body(lock) == {**_body(lock), "released": True, "token": successor.token}


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_a_holder_releases_only_its_own_lock(
    store: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that looked dead (a long pause) and was taken over learns it at its next beat,
    and its release leaves the successor's lock alone; on S3 (ETag) and on GCS (generation)."""
    if store == "s3":
        request.getfixturevalue("s3_env")
        uri = f"s3://models/release-{tmp_path.name}/m.lock"
    else:
        gcs = request.getfixturevalue("gcs")
        uri = "gs://bucket/cache/m.lock"
    clock = model_cache.Clock()
    first = model_cache.StoreLock(uri, "run-a/node-0", clock)
    assert first.acquire(None)
    assert first.beat() and _body(uri)["token"] == first.token
    second = model_cache.StoreLock(uri, "run-b/node-0", clock)
    assert not second.acquire(None)  # it exists: no blind create
    assert second.acquire(second.read())  # the takeover, on the version read
    assert not first.beat() and first.lost.is_set()
    assert not first.release()
    assert _body(uri)["token"] == second.token and "released" not in _body(uri)
    assert second.release() and _body(uri) == {**_body(uri), "released": True}
    if store == "gs":  # no write without a precondition: 0 (create) or the generation replaced
        sent = [w.headers.get("x-goog-if-generation-match") for w in gcs.writes("m.lock")]
        # create, beat, create (refused), takeover, beat (refused), the successor's release
        assert [g == "0" if g else None for g in sent] == [True, False, True] + [False] * 3


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Iterator[fake_gcs.FakeGcs]:
    with fake_gcs.serve() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server


def test_the_holder_beats_while_it_fetches(s3_env: S3Server, tmp_path: Path) -> None:
    """The heartbeat thread rewrites the lock during the fetch (the fetch waits until it has
    seen two beats), and stops when the fetch is done."""
    cache_uri = f"s3://models/beats-{tmp_path.name}"
    lock = _lock_uri(cache_uri)
    seen: list[float] = []

    def fetch(target: Path) -> None:
        while len(set(seen)) < 3:
            seen.append(_body(lock)["heartbeatAt"])
            time.sleep(0.02)  # polling a condition, not timing one
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    cache = ModelCache(ModelCacheSpec(uri=cache_uri), tmp_path, "run-a/node-0", None, 0.05)
    thread = threading.Thread(target=cache.get, args=(SOURCE, None, fetch), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive() and _body(lock)["released"] is True


def test_the_second_run_loads_the_model_from_the_cache(
    s3_env: S3Server, tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """The real trainer, twice, on a model in S3 with a cache on a volume: the first run fetches
    it; the model is then deleted from S3 and the second run still trains, from the cache."""
    uri = "s3://models/base/tiny"
    storage.upload_dir(tiny_model, uri)
    cache = tmp_path / "volume" / "models"
    results = []
    for run in ("1", "2"):
        doc = job_manifest(
            tiny_model, task_file, f"s3://models/cached-{run}", "lora", hyperparameters__maxSteps=4
        )
        doc["spec"]["model"]["uri"] = uri
        config = config_for(doc).model_copy(update={"model_cache": ModelCacheSpec(path=str(cache))})
        workdir = tmp_path / f"work-{run}"
        results.append(run_pipeline(config, Recorder(), workdir))
        log = (workdir / "trainer.log").read_text()
        if run == "1":
            assert "Fetching the model into the cache" in log
            assert storage.delete_prefix(uri) > 0  # gone from its source
        else:
            assert "Model from the cache" in log and "Fetching" not in log
    assert [r.exit_code for r in results] == [ExitCode.SUCCEEDED] * 2, [r.message for r in results]
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    assert entry.name.startswith("tiny-") and (entry / "config.json").is_file()


# -- gated models ------------------------------------------------------------------------------


class _Hub(BaseHTTPRequestHandler):
    """The Hub's answer for a gated model (huggingface_hub's hf_raise_for_status reads the
    X-Error-Code header): 401 without a token, 403 with one whose account lacks access."""

    seen: ClassVar[list[str | None]] = []

    def _refuse(self) -> None:
        token = self.headers.get("Authorization")
        type(self).seen.append(token)
        status = 403 if token else 401
        message = "Access to model meta-llama/Llama-3.2-1B is restricted"
        self.send_response(status)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": message}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _refuse

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gated_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize(
    ("token", "cached", "message"),
    [
        pytest.param(
            None,
            False,
            "spec.model.uri: hf://meta-llama/Llama-3.2-1B is a gated model and the trainer has "
            "no Hugging Face token: set spec.model.tokenSecret",
            id="no-token",
        ),
        pytest.param(
            "hf_notgranted123",
            False,
            "spec.model.uri: hf://meta-llama/Llama-3.2-1B is a gated model and the Hub refused "
            "the token from Secret 'hf-token' (spec.model.tokenSecret, key HF_TOKEN) (HTTP 403): "
            "accept the model's licence on huggingface.co",
            id="token-without-access",
        ),
        pytest.param(
            "hf_notgranted123",
            True,
            "the Hub refused the token from Secret 'hf-token'",
            id="token-without-access-through-the-cache",
        ),
    ],
)
def test_a_gated_model_fails_at_once_naming_the_secret(
    gated_hub: str,
    task_file: Path,
    tiny_model: Path,
    tmp_path: Path,
    token: str | None,
    cached: bool,
    message: str,
) -> None:
    doc = job_manifest(tiny_model, task_file, (tmp_path / "out").as_uri(), "lora")
    doc["spec"]["model"]["uri"] = "hf://meta-llama/Llama-3.2-1B"
    if token:
        doc["spec"]["model"]["tokenSecret"] = {"name": "hf-token"}
    termination = tmp_path / "termination-log"
    config = config_for(doc).model_copy(
        update={
            "termination_message_path": str(termination),
            "model_cache": ModelCacheSpec(path=str(tmp_path / "cache")) if cached else None,
        }
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json(exclude_none=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=gated_hub, HF_HOME=str(tmp_path / "hf"), KUBETUNE_WORKDIR=str(tmp_path))
    env.update({"HF_TOKEN": token} if token else {})
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == ExitCode.INVALID_SPEC, done.stdout[-3000:] + done.stderr[-3000:]
    result = TrainerResult.model_validate_json(termination.read_text())
    assert message in result.message, result.message
    # The token reached the Hub (some of huggingface_hub's requests go without one).
    assert set(_Hub.seen) == ({None, f"Bearer {token}"} if token else {None}), set(_Hub.seen)
    if token:  # the token went to the Hub and nowhere else
        assert token not in result.message
        assert token not in done.stdout + done.stderr
        assert token not in (tmp_path / "trainer.log").read_text()
