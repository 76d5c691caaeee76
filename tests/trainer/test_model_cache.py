"""The shared model cache (a profile's modelCache) and gated Hugging Face models.

The cache: two runs staging the same model at once fetch it once (on a volume, with flock; in
object storage, with a conditional create); a stale object-storage lock is replaced; and the
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
from collections.abc import Iterator
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
    assert sorted(keys) == [f"{name}/{MARKER}", f"{name}/config.json"]  # the lock is gone


def test_a_stale_lock_in_object_storage_is_replaced(
    s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_cache, "POLL_SECONDS", 0.1)
    spec = ModelCacheSpec(uri="s3://models/stale-cache")
    name = model_cache.entry_name("s3://models/m", None)
    lock = f"s3://models/stale-cache/{name}.lock"
    dead = time.time() - model_cache.STALE_SECONDS - 60  # a holder that died long ago
    storage.write_bytes(lock, json.dumps({"createdAt": dead}).encode())
    counter = tmp_path / "fetches"
    entry = ModelCache(spec, tmp_path).get("s3://models/m", None, _slow_fetch(counter))
    assert (entry / "config.json").is_file() and counter.read_text() == "fetch\n"
    assert not storage.exists(lock)


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
