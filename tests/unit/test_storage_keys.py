"""A tenant's storage Secret configures an object-store client only through the keys that
kubetune.api.storage_keys allows: the operator and the trainer never send their own identity (a
ServiceAccount token, a cloud session) where a tenant's Secret points, and the operator lends no
identity of its own to a tenant's store. Each case runs the real obstore client against a
recording HTTP server on 127.0.0.1 standing in for the attacker's endpoint."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from obstore.exceptions import UnknownConfigurationKeyError
from obstore.store import from_url

from kubetune.api import CREDENTIAL_ENV
from kubetune.api.storage_keys import ALLOWED_KEYS, storage_config
from kubetune.controller.errors import Retry
from kubetune.controller.results import read_result
from kubetune_trainer import storage
from kubetune_trainer.errors import SpecError

OPERATOR_TOKEN = "operator-serviceaccount-token-do-not-send"


@dataclass
class Recorder:
    """An HTTP server that records every request (path, headers, body) and answers 404."""

    url: str
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def seen(self, text: str) -> bool:
        return any(
            text in path or text in body.decode(errors="replace") or text in str(headers)
            for _, path, headers, body in self.requests
        )


@pytest.fixture
def attacker() -> Iterator[Recorder]:
    recorder = Recorder("")

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorder.requests.append((self.command, self.path, dict(self.headers), body))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = do_PUT = _record

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield recorder
    server.shutdown()


@pytest.fixture
def operator_token(tmp_path: Path) -> Path:
    """The operator's (or a trainer pod's) projected ServiceAccount token."""
    path = tmp_path / "token"
    path.write_text(OPERATOR_TOKEN)
    return path


def _escapes(url: str, token: Path) -> dict[str, dict[str, str]]:
    return {
        "aws-container-credentials": {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{url}/creds",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token),
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": "us-east-1",
        },
        "aws-web-identity": {
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
            "AWS_ROLE_ARN": "arn:aws:iam::1:role/x",
            "AWS_ENDPOINT_URL": url,
            "AWS_REGION": "us-east-1",
        },
        "azure-federated-token": {
            "AZURE_STORAGE_ACCOUNT_NAME": "acct",
            "AZURE_CLIENT_ID": "c",
            "AZURE_TENANT_ID": "t",
            "AZURE_FEDERATED_TOKEN_FILE": str(token),
            "AZURE_AUTHORITY_HOST": url,
            "AZURE_STORAGE_ENDPOINT": url,
        },
    }


ESCAPES = ["aws-container-credentials", "aws-web-identity", "azure-federated-token"]
URI = {"aws": "s3://models/runs-here", "azure": "az://acct/models/runs-here"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in ESCAPES])
def test_the_operator_never_sends_its_token_where_a_secret_points(
    case: str, attacker: Recorder, operator_token: Path
) -> None:
    secret = _escapes(attacker.url, operator_token)[case]
    assert read_result(URI[case.split("-")[0]], "0123abcd", secret) is None
    assert not attacker.seen(OPERATOR_TOKEN)
    assert attacker.requests == []  # refused before any request


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in ESCAPES])
def test_the_trainer_refuses_such_a_secret_naming_the_keys(
    case: str, attacker: Recorder, operator_token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = _escapes(attacker.url, operator_token)[case]
    for key, value in secret.items():  # what envFrom with the output's prefix gives the pod
        monkeypatch.setenv(CREDENTIAL_ENV["output"] + key, value)
    uri = URI[case.split("-")[0]]
    storage.use_credentials([(uri, CREDENTIAL_ENV["output"])])
    try:
        with pytest.raises(SpecError, match=r"spec\.output\.credentialsSecret has key") as err:
            storage.read_bytes(f"{uri}/data.jsonl")
    finally:
        storage.use_credentials([])
    scheme = "s3" if case.startswith("aws") else "az"
    refused = {k for k in secret if k not in ALLOWED_KEYS[scheme]}
    assert all(key in str(err.value) for key in refused)
    assert str(operator_token) not in str(err.value) and attacker.url not in str(err.value)
    assert not attacker.seen(OPERATOR_TOKEN)


def test_without_a_secret_the_operator_reads_nothing_with_its_own_identity(
    attacker: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The operator's own credentials, as IRSA or a platform's env would give them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OPERATORKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", attacker.url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert read_result("s3://someone-elses-bucket/x", "0123abcd", {}) is None
    assert attacker.requests == []


def test_a_tenants_keys_are_used_without_the_operators_session_token(
    attacker: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", OPERATOR_TOKEN)
    secret = {
        "AWS_ACCESS_KEY_ID": "TENANTKEY",
        "AWS_SECRET_ACCESS_KEY": "tenant-secret",
        "AWS_ENDPOINT_URL": attacker.url,
        "AWS_REGION": "us-east-1",
    }
    assert read_result("s3://models/x", "0123abcd", secret) is None  # 404: no manifest
    assert attacker.requests, "the tenant's own store was read"
    assert all("TENANTKEY" in h.get("authorization", "") for _, _, h, _ in attacker.requests)
    assert not attacker.seen(OPERATOR_TOKEN)


@pytest.mark.parametrize(
    ("scheme", "key"),
    [pytest.param(s, k, id=k) for s, keys in ALLOWED_KEYS.items() for k in sorted(keys)],
)
def test_every_allowed_key_is_one_obstore_knows(scheme: str, key: str) -> None:
    root = {"s3": "s3://b", "gs": "gs://b", "az": "az://acct/c"}[scheme]
    try:
        from_url(root, config={key.lower(): "x"})
    except UnknownConfigurationKeyError:
        pytest.fail(f"{key} is not an obstore configuration key")
    except Exception:  # a value obstore cannot use is not the question here
        pass


@pytest.mark.parametrize(
    ("scheme", "key"),
    [
        pytest.param("s3", "AWS_CONTAINER_CREDENTIALS_FULL_URI", id="aws-container-uri"),
        pytest.param("s3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", id="aws-container-path"),
        pytest.param("s3", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", id="aws-token-file"),
        pytest.param("s3", "AWS_WEB_IDENTITY_TOKEN_FILE", id="aws-web-identity"),
        pytest.param("s3", "AWS_ROLE_ARN", id="aws-role"),
        pytest.param("s3", "AWS_METADATA_ENDPOINT", id="aws-metadata"),
        pytest.param("s3", "AWS_STS_ENDPOINT", id="aws-sts"),
        pytest.param("s3", "AWS_IMDSV1_FALLBACK", id="aws-imdsv1"),
        pytest.param("s3", "AWS_SHARED_CREDENTIALS_FILE", id="aws-credentials-file"),
        pytest.param("gs", "GOOGLE_SERVICE_ACCOUNT", id="gcs-key-path"),
        pytest.param("gs", "GOOGLE_SERVICE_ACCOUNT_PATH", id="gcs-key-path2"),
        pytest.param("gs", "GOOGLE_APPLICATION_CREDENTIALS", id="gcs-adc-file"),
        pytest.param("az", "AZURE_FEDERATED_TOKEN_FILE", id="azure-token-file"),
        pytest.param("az", "AZURE_AUTHORITY_HOST", id="azure-authority"),
        pytest.param("az", "AZURE_MSI_ENDPOINT", id="azure-msi"),
        pytest.param("az", "AZURE_USE_AZURE_CLI", id="azure-cli-command"),
        pytest.param("az", "AZURE_FABRIC_TOKEN_SERVICE_URL", id="azure-fabric"),
        pytest.param("az", "AZURE_STORAGE_USE_EMULATOR", id="azure-emulator-loopback"),
    ],
)
def test_keys_that_name_a_file_a_command_or_a_credential_endpoint_are_refused(
    scheme: str, key: str
) -> None:
    found = storage_config(scheme, {key: "anything", "AWS_REGION": "us-east-1"})
    assert key in found.refused and key not in found.config
    assert "anything" not in found.refusal("the Secret")


def test_other_families_keys_are_left_to_their_own_sources() -> None:
    keys = {"AWS_ACCESS_KEY_ID": "a", "GOOGLE_SERVICE_ACCOUNT": "/path"}
    assert storage_config("s3", keys).refused == ()
    assert storage_config("gs", keys).refused == ("GOOGLE_SERVICE_ACCOUNT",)


def _endpoint_cases(url: str) -> dict[str, tuple[str, dict[str, str], str]]:
    """(URI, Secret, the key refused): a tenant's endpoint or region with the pod's identity."""
    return {
        "endpoint-without-credentials": (
            "s3://shared/team-a/data.jsonl",
            {"AWS_ENDPOINT_URL": url},
            "AWS_ENDPOINT_URL",
        ),
        "region-that-moves-sts": (
            "s3://shared/team-a/data.jsonl",
            {"AWS_REGION": "@attacker.example/"},
            "AWS_REGION",
        ),
        "endpoint-with-a-path-to-another-prefix": (
            "s3://shared/team-a/data.jsonl",
            {
                "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s",
                "AWS_ENDPOINT_URL": f"{url}/shared/team-b/private.jsonl#",
            },
            "AWS_ENDPOINT_URL",
        ),
        "gcs-base-url-without-credentials": (
            "gs://shared/team-a/data.jsonl",
            {"GOOGLE_BASE_URL": url},
            "GOOGLE_BASE_URL",
        ),
        "azure-client-secret-alone": (
            "az://acct/shared/team-a/data.jsonl",
            {
                "AZURE_STORAGE_ACCOUNT_NAME": "acct",
                "AZURE_CLIENT_SECRET": "x",
                "AZURE_ENDPOINT": url,
            },
            "AZURE_ENDPOINT",
        ),
    }


ENDPOINTS = list(_endpoint_cases("http://x"))


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in ENDPOINTS])
def test_a_secrets_endpoint_or_region_never_carries_the_pods_identity(
    case: str, attacker: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review after the allowlist: an endpoint (or a region, from which object_store builds
    STS's host) with no credentials in the same Secret sent the pod's identity (IRSA, Workload
    Identity, a managed identity) to the tenant's host; an endpoint with a path moved requests
    to another prefix than the URI names, past allowedInputPrefixes."""
    uri, secret, key = _endpoint_cases(attacker.url)[case]
    for name, value in secret.items():
        monkeypatch.setenv(CREDENTIAL_ENV["dataset"] + name, value)
    storage.use_credentials([(uri, CREDENTIAL_ENV["dataset"])])
    try:
        with pytest.raises(SpecError, match=key) as err:
            storage.read_bytes(uri)
    finally:
        storage.use_credentials([])
    assert attacker.url not in str(err.value)
    scheme = uri.split(":", 1)[0]
    output = uri.rsplit("/", 1)[0]
    assert read_result(output, "0123abcd", secret) is None  # the operator's side
    assert attacker.requests == [], f"{scheme}: a request left for the tenant's endpoint"


@pytest.fixture
def liar() -> Iterator[tuple[str, list[int]]]:
    """An S3 endpoint that says a small size for every HEAD and answers GET with 256 MiB,
    Range or not; it counts the bytes it manages to send."""
    sent = [0]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _head(self, size: int) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("ETag", '"e"')
            self.send_header("Last-Modified", "Mon, 07 Dec 2026 00:00:00 GMT")
            self.end_headers()

        def do_HEAD(self) -> None:
            self._head(100)

        def do_GET(self) -> None:
            self._head(256 << 20)
            chunk = b"x" * (1 << 20)
            try:
                for _ in range(256):
                    self.wfile.write(chunk)
                    sent[0] += len(chunk)
            except OSError:
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sent
    server.shutdown()


def test_a_result_json_is_read_to_a_bound(liar: tuple[str, list[int]]) -> None:
    """A tenant's store (its own endpoint, or a huge result.json in its bucket) cannot make the
    operator read more than the size it asked for: it read 400 MiB into memory before."""
    url, sent = liar
    secret = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": url,
        "AWS_REGION": "us-east-1",
    }
    with contextlib.suppress(Retry):  # a range answered with the whole object is an error
        assert read_result("s3://models/x", "0123abcd", secret) is None
    assert sent[0] < 64 << 20, sent[0]


def test_a_padded_boolean_is_read_the_way_it_is_checked(attacker: Recorder) -> None:
    """' true' was unsigned to kubetune's check and no boolean to obstore: a retry every 5 s."""
    secret = {"AWS_SKIP_SIGNATURE": " true", "AWS_ENDPOINT_URL": attacker.url}
    assert read_result("s3://models/x", "0123abcd", secret) is None
