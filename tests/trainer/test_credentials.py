"""Credentials per storage source, against a real S3 server with three users: the admin, a
reader of the `data` bucket only and a writer of the `models` bucket only. The trainer reads the
data with the dataset's Secret and writes the artifacts with the output's, each found under its
source's prefix in the environment (as the pod's envFrom puts them); a source without a Secret
of its own uses the output's; with no Secret at all, the default chain (the pod's identity)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import CREDENTIAL_ENV, ExitCode
from kubetune_trainer import storage
from tests.support import s3
from tests.trainer.conftest import job_manifest, run_job

READER = s3.Identity("data-reader", "data-reader-secret", ("Read:data", "List:data"))
WRITER = s3.Identity(
    "models-writer", "models-writer-secret", ("Read:models", "Write:models", "List:models")
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3.S3Server]:
    started = s3.start(tmp_path_factory.mktemp("s3-users"), identities=(READER, WRITER))
    yield started
    started.stop()


@pytest.fixture
def data(server: s3.S3Server, task_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The task in s3://data, written by the admin; then no plain AWS_* in the environment."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    uri = "s3://data/credentials/reviews.jsonl"
    storage.write_bytes(uri, task_file.read_bytes())
    for key in list(os.environ):
        if key.startswith(("AWS_", *CREDENTIAL_ENV.values())):
            monkeypatch.delenv(key)
    return uri


def _as(source: str, who: s3.Identity, server: s3.S3Server, monkeypatch: pytest.MonkeyPatch):
    for key, value in who.env(server).items():  # what envFrom with the source's prefix gives
        monkeypatch.setenv(CREDENTIAL_ENV[source] + key, value)


def _job(tiny_model: Path, data: str, out: str, **secrets: str) -> dict:
    doc = job_manifest(tiny_model, Path("/unused"), out, "lora", hyperparameters__maxSteps=4)
    doc["spec"]["dataset"]["uri"] = data
    for source, name in secrets.items():
        doc["spec"][source]["credentialsSecret"] = name
    return doc


def test_each_source_uses_its_own_secret(
    server: s3.S3Server,
    data: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _as("dataset", READER, server, monkeypatch)
    _as("output", WRITER, server, monkeypatch)
    out = "s3://models/credentials/own"
    doc = _job(tiny_model, data, out, dataset="data-reader", output="models-writer")
    result, _ = run_job(doc, tmp_path / "work", run_id="c0ffee01")
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
    storage.use_credentials([])
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    assert storage.exists(f"{out}/runs/c0ffee01/manifest.json")  # written as the writer


def test_a_source_without_its_own_secret_uses_the_outputs(
    server: s3.S3Server,
    data: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The data is read with the output's credentials, which cannot read it: a clear failure
    naming the data, not a silent use of some other key."""
    _as("dataset", READER, server, monkeypatch)  # there, but not named by the spec: unused
    _as("output", WRITER, server, monkeypatch)
    doc = _job(tiny_model, data, "s3://models/credentials/fallback", output="models-writer")
    result, _ = run_job(doc, tmp_path / "work", run_id="c0ffee02")
    assert result.exit_code != ExitCode.SUCCEEDED
    assert result.message.startswith(
        f"cannot read {data} with the credentials of spec.output.credentialsSecret: "
    ), result.message


def test_without_secrets_the_default_chain_is_used(
    server: s3.S3Server,
    data: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Secret named: every URI uses obstore's default chain, here the standard variables
    (what a pod identity provides: IRSA's web identity token, or the metadata server)."""
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID", "unused")  # no Secret: not read
    result, _ = run_job(
        _job(tiny_model, data, "s3://models/credentials/chain"),
        tmp_path / "work",
        run_id="c0ffee03",
    )
    assert result.exit_code == ExitCode.SUCCEEDED, result.message
