"""Credentials per storage source, against a real S3 server with three users: the admin, a
reader of the `data` bucket only and a writer of the `models` bucket only. The trainer reads the
data with the dataset's Secret and writes the artifacts with the output's, each found under its
source's prefix in the environment (as the pod's envFrom puts them); a source without a Secret
of its own uses the output's; with no Secret at all, the default chain (the pod's identity)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api import CREDENTIAL_ENV, ExitCode, TrainerResult
from kubetune_trainer import storage
from tests.support import oidc, s3
from tests.trainer.conftest import config_for, job_manifest, run_job

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


def test_a_pod_identity_reads_and_writes_through_a_web_identity_token(
    tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    """What IRSA gives a pod whose ServiceAccount is bound to a role: AWS_ROLE_ARN and a
    projected token in AWS_WEB_IDENTITY_TOKEN_FILE, no keys. The real trainer exchanges the
    token (signed by a local OIDC issuer, as the cluster's service account issuer signs it) at
    SeaweedFS's STS for temporary credentials of a role that may read `data` and write `models`,
    and runs on them; a token issued for another audience is refused."""
    with oidc.issuer() as issuer:
        statements = [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
             "Resource": ["arn:aws:s3:::data", "arn:aws:s3:::data/*"]},
            {"Effect": "Allow", "Action": "s3:*",
             "Resource": ["arn:aws:s3:::models", "arn:aws:s3:::models/*"]},
            {"Effect": "Allow", "Action": "sts:ValidateSession", "Resource": "*"},
        ]  # fmt: skip
        server = s3.start_with_sts(tmp_path / "s3", issuer.url, "FineTuning", statements)
        try:
            admin = {**os.environ, **server.env()}
            storage_env = {k: v for k, v in admin.items() if k.startswith("AWS_")}
            _write_as(storage_env, "s3://data/wi/reviews.jsonl", task_file.read_bytes())
            token = tmp_path / "token"
            token.write_text(issuer.token("system:serviceaccount:team-a:fine-tuning"))
            pod = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
            pod.update(
                AWS_ROLE_ARN="arn:aws:iam::role/FineTuning",
                AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
                AWS_REGION="us-east-1",
                AWS_ENDPOINT_URL=server.endpoint,  # the S3 endpoint, as for any S3-compatible store
                AWS_ENDPOINT_URL_STS=str(server.sts_endpoint),
                SSL_CERT_FILE=str(server.ca_file),  # the test CA of the https STS endpoint
                KUBETUNE_WORKDIR=str(tmp_path / "pod"),
            )
            out = "s3://models/wi/run"
            doc = job_manifest(tiny_model, task_file, out, "lora", hyperparameters__maxSteps=4)
            doc["spec"]["dataset"]["uri"] = "s3://data/wi/reviews.jsonl"
            config = tmp_path / "config.json"
            termination = tmp_path / "termination-log"
            config.write_text(
                config_for(doc, "f00d0001")
                .model_copy(update={"termination_message_path": str(termination)})
                .model_dump_json(exclude_none=True)
            )
            done = subprocess.run(
                [sys.executable, "-m", "kubetune_trainer", str(config)],
                env=pod,
                capture_output=True,
                text=True,
                timeout=600,
            )
            result = TrainerResult.model_validate_json(termination.read_text())
            assert done.returncode == 0, result.message + done.stderr[-2000:]
            assert _exists_as(storage_env, f"{out}/runs/f00d0001/manifest.json")
            # A token for another audience is not the cluster's token for this STS: refused.
            federated = {k: v for k, v in pod.items() if k.startswith("AWS_")}
            federated["SSL_CERT_FILE"] = pod["SSL_CERT_FILE"]
            assert _exists_as(federated, f"{out}/runs/f00d0001/manifest.json")
            token.write_text(issuer.token("system:serviceaccount:team-a:x", audience="other"))
            assert not _exists_as(federated, f"{out}/runs/f00d0001/manifest.json")
        finally:
            server.stop()


def _write_as(env: dict[str, str], uri: str, data: bytes) -> None:
    """A write with these credentials (a separate process: obstore reads the environment)."""
    code = "import sys; from kubetune_trainer import storage; "
    code += "storage.write_bytes(sys.argv[1], sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code, uri], input=data, env=_with(env), check=True)


def _exists_as(env: dict[str, str], uri: str) -> bool:
    code = "import sys; from kubetune_trainer import storage; "
    code += "sys.exit(0 if storage.exists(sys.argv[1]) else 3)"
    return subprocess.run([sys.executable, "-c", code, uri], env=_with(env)).returncode == 0


def _with(storage_env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_"))}
    return {**base, **storage_env}
