"""Where a promotion webhook may go and what comes back from it (security finding 3 of issue 25):
the destination policy (loopback, link-local and the metadata address, the denied ranges; the
allowlists), one lookup pinned for the connection (https checked against the name), redirects
not followed, an answer read to a cap within one deadline, and nothing a receiver, the network
or a Secret says reaching the status, an Event or the log. Real servers on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kubetune.api import WebhookSpec
from kubetune.controller import notifications
from kubetune.controller.errors import Retry
from kubetune.controller.finetunejob_controller import reconcile
from kubetune.controller.settings import OperatorSettings
from kubetune.notify import Message
from tests.controller.test_notify import NOW, OPEN, Receiver, notification, promoted_job, result_of
from tests.controller.test_reconcile import SETTINGS, FakeKube

TOKEN = "ghp_16c7e42f292c6912e7710c838347ae178b4a"  # a Secret value that must never come back
MESSAGE = Message({"Content-Type": "application/json"}, b"{}")
POLICY = "the operator's webhook policy refuses it"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def post(url: str, settings: OperatorSettings = OPEN) -> str | None:
    return notifications.post(notifications.target_of(WebhookSpec(url=url), url), MESSAGE, settings)


def fake_dns(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[list[str]]]) -> list[str]:
    """Answer the lookups of names (one answer per lookup, in turn; a name with no answers left
    does not exist); other names go to the real resolver. The names looked up, in order."""
    real, asked = socket.getaddrinfo, []

    def lookup(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in names:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        if not names[host]:
            raise socket.gaierror(socket.EAI_NONAME, f"Failed to resolve {host!r}")
        out = []
        for a in names[host].pop(0):
            if ":" in a:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return asked


@pytest.mark.parametrize(
    ("url", "settings", "said"),
    [
        pytest.param(
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            OPEN,
            "169.254.169.254 is a link-local address (the cloud metadata service's among them)",
            id="metadata-address",
        ),
        pytest.param(
            "http://2852039166/latest/meta-data/",
            OPEN,
            "2852039166 resolves to 169.254.169.254, a link-local address",
            id="metadata-address-written-as-a-number",
        ),
        pytest.param(
            "http://[::ffff:169.254.169.254]/",
            OPEN,
            ", a link-local address",  # the IPv4 inside, judged as itself
            id="metadata-address-mapped-into-ipv6",
        ),
        pytest.param(
            "http://[fe80::1]:8080/", OPEN, "fe80::1 is a link-local", id="ipv6-link-local"
        ),
        pytest.param(
            "http://{netloc}/hooks",
            SETTINGS,
            "127.0.0.1 is a loopback address",
            id="loopback-by-default",
        ),
        pytest.param(
            "http://127.0.0.2:{port}/",
            OPEN,
            "127.0.0.2 is a loopback",
            id="loopback-outside-the-allowlist",
        ),
        pytest.param("http://0.0.0.0:{port}/", OPEN, "0.0.0.0 is an unspecified", id="unspecified"),
        pytest.param("http://224.0.0.1/", OPEN, "224.0.0.1 is a multicast", id="multicast"),
        pytest.param(
            "https://10.96.0.1/api/v1/secrets",
            SETTINGS,
            "10.96.0.1 is in 10.0.0.0/8 (notify.deniedCidrs)",
            id="the-api-servers-service-address",
        ),
        pytest.param(
            "http://[fd00:ec2::254]/", SETTINGS, "fd00:ec2::254 is in fc00::/7", id="ipv6-private"
        ),
    ],
)
def test_a_refused_destination_is_a_failed_attempt_that_sends_nothing(
    receiver: Receiver, url: str, settings: OperatorSettings, said: str
) -> None:
    port = receiver.server.server_address[1]
    error = post(url.format(netloc=receiver.netloc, port=port), settings)
    assert error is not None and error.startswith("spec.notify.webhook.url: "), error
    assert said in error and POLICY in error and "notify.allowedCidrs" in error
    assert receiver.requests == []


def test_the_allowlist_opens_exactly_what_it_names(receiver: Receiver) -> None:
    assert post(receiver.url, SETTINGS) is not None and receiver.requests == []
    assert post(receiver.url, OPEN) is None and len(receiver.requests) == 1


@pytest.mark.parametrize(
    ("answers", "settings", "said"),
    [
        pytest.param(
            [["10.96.0.1"]], SETTINGS, "kubernetes.default.svc resolves to 10.96.0.1, in 10.0.0.0/8",
            id="a-service-name",
        ),
        pytest.param(
            [["203.0.113.7", "169.254.169.254"]], SETTINGS, "resolves to 169.254.169.254",
            id="one-of-its-addresses",
        ),
        pytest.param(
            [["169.254.169.254"]],
            SETTINGS.model_copy(update={"notify_allowed_hosts": ["kubernetes.default.svc"]}),
            "resolves to 169.254.169.254, a link-local",
            id="an-allowed-host-never-reaches-link-local",
        ),
    ],
)  # fmt: skip
def test_a_name_that_resolves_to_a_refused_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, answers: list[list[str]], settings: OperatorSettings, said: str
) -> None:
    fake_dns(monkeypatch, {"kubernetes.default.svc": answers})
    error = post("https://kubernetes.default.svc/api", settings)
    assert error is not None and said in error and POLICY in error, error


def test_allowed_hosts_and_cidrs_open_the_denied_ranges() -> None:
    policy = notifications.Policy.of(
        SETTINGS.model_copy(
            update={
                "notify_allowed_hosts": ["deployer.ml-serving.svc", "*.hooks.example.com"],
                "notify_allowed_cidrs": [ip_network("10.20.0.0/16")],
            }
        )
    )
    service = ip_address("10.96.4.2")
    assert policy.refusal(service, "deployer.ml-serving.svc") is None
    assert policy.refusal(service, "a.hooks.example.com.") is None
    assert policy.refusal(service, "hooks.example.com") is not None  # only the names under it
    assert policy.refusal(service, "other.ml-serving.svc") is not None
    assert policy.refusal(ip_address("10.20.3.4"), "anything") is None
    assert policy.refusal(ip_address("203.0.113.7"), "public.example") is None


def test_the_name_is_looked_up_once_and_the_connection_goes_to_that_address(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: a second lookup would answer the metadata address; there is none."""
    asked = fake_dns(monkeypatch, {"rebind.test": [["127.0.0.1"], ["169.254.169.254"]]})
    port = receiver.server.server_address[1]
    assert post(f"http://rebind.test:{port}/hooks") is None
    assert asked == ["rebind.test"]
    ((headers, _),) = receiver.requests
    assert headers["Host"] == f"rebind.test:{port}"  # the name, not the address


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for receiver.test signed by it: (ca, cert, key)."""
    now = dt.datetime.now(dt.UTC)

    def cert(name: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths = (directory / "ca.pem", directory / "tls.crt", directory / "tls.key")
    pem = serialization.Encoding.PEM
    paths[0].write_bytes(cert("test CA", ca_key, "test CA", ca_key, True).public_bytes(pem))
    paths[1].write_bytes(cert("receiver.test", key, "test CA", ca_key, False).public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.mark.parametrize(
    ("name", "said"),
    [
        pytest.param("receiver.test", None, id="the-certificate-names-the-host"),
        pytest.param(
            "other.test",
            "POST to the receiver at other.test:{port} failed: SSLCertVerificationError",
            id="the-certificate-names-another-host",
        ),
    ],
)
def test_https_to_the_pinned_address_checks_the_certificate_against_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, said: str | None
) -> None:
    receiver = Receiver()
    ca, cert, key = _tls_files(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    receiver.server.socket = context.wrap_socket(receiver.server.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the CA the operator's default context trusts
    fake_dns(monkeypatch, {name: [["127.0.0.1"]]})
    port = receiver.server.server_address[1]
    try:
        error = post(f"https://{name}:{port}/hooks")
    finally:
        receiver.server.shutdown()
    assert error == (said.format(port=port) if said else None)
    assert len(receiver.requests) == (0 if said else 1)


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.answers = [302]
    receiver.location = "http://169.254.169.254/latest/meta-data/"
    error = post(receiver.url)
    assert error == f"the receiver at {receiver.netloc} answered 302 (redirects are not followed)"
    assert len(receiver.requests) == 1


class RecordingKube(FakeKube):
    """FakeKube that keeps every Event's message."""

    def event(self, owner: dict[str, Any], type_: str, reason: str, message: str, now: Any) -> None:
        super().event(owner, type_, reason, message, now)
        self.writes.append(("event-message", message))


@pytest.mark.parametrize(
    ("url", "said"),
    [
        pytest.param(
            TOKEN,
            "spec.notify.webhook.urlSecret: the receiver in Secret 'receiver' key 'url' is not "
            "an http:// or https:// URL",
            id="not-a-url",
        ),
        pytest.param(
            f"https://{TOKEN}.invalid/",
            "the name of the receiver in Secret 'receiver' key 'url' could not be resolved "
            "(gaierror)",
            id="a-name-that-does-not-resolve",
        ),
        pytest.param(
            f"http://169.254.169.254/?token={TOKEN}",
            "spec.notify.webhook.urlSecret: the receiver in Secret 'receiver' key 'url' reaches "
            "a link-local address (the cloud metadata service's among them); "
            + POLICY
            + " (the chart's notify.allowedCidrs or notify.allowedHosts opens a destination)",
            id="a-refused-destination",
        ),
        pytest.param(
            "http://{netloc}/hooks?token=" + TOKEN,
            "the receiver in Secret 'receiver' key 'url' answered 500",
            id="an-answer-that-echoes-it",
        ),
        pytest.param(
            "http://127.0.0.1:{closed}/hooks?token=" + TOKEN,
            "POST to the receiver in Secret 'receiver' key 'url' failed: ConnectionRefusedError",
            id="a-refused-connection",
        ),
    ],
)
def test_a_url_secret_never_reaches_the_status_an_event_or_the_log(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    url: str,
    said: str,
) -> None:
    fake_dns(monkeypatch, {f"{TOKEN}.invalid": []})
    receiver.answers, receiver.reply = [500], f"bad token {TOKEN}".encode()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    kube = promoted_job({"urlSecret": {"name": "receiver", "key": "url"}}, RecordingKube)
    kube.secrets["receiver"] = {"url": url.format(netloc=receiver.netloc, closed=closed)}
    settings = OPEN.model_copy(update={"notify_max_attempts": 1})
    stored = result_of(kube)
    caplog.set_level(logging.DEBUG)
    try:
        reconcile(kube, settings, "ml", "sql-lora", now=NOW, read_result=lambda *_: stored)
    except Retry as exc:  # pragma: no cover - one attempt: Failed, no retry
        pytest.fail(f"retried: {exc}")
    note = notification(kube)
    assert note["state"] == "Failed" and note["message"] == f"{said} (gave up after 1 attempts)"
    events = [w[1] for w in kube.writes if w[0] == "event-message"]
    assert note["message"] in events
    for text in [str(kube.ftj["status"]), *events, caplog.text]:
        assert TOKEN not in text and "ghp_" not in text


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        pytest.param(b"HTTP/1.1 500 " + TOKEN.encode() + b"\r\n\r\n", "answered 500", id="500"),
        pytest.param(None, "failed: RemoteDisconnected", id="no-answer"),
        pytest.param(b"garbage " + TOKEN.encode() + b"\r\n\r\n", "failed: BadStatusLine",
                     id="not-http"),
    ],
)  # fmt: skip
def test_a_network_errors_text_is_not_quoted(answer: bytes | None, said: str) -> None:
    """The error's class, never its text (which carries what the peer sent, or the URL)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(65536)
                if answer is not None:
                    peer.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        port = listener.getsockname()[1]
        message = post(f"http://127.0.0.1:{port}/?token={TOKEN}")
    assert message is not None and said in message and TOKEN not in message, message


class Flood:
    """An HTTP server that answers a POST 200 and then as much body as the client takes (up to
    `offered` bytes), slowly or at once; it counts what it could send."""

    def __init__(self, offered: int, chunk: int, pause: float, headers: bytes) -> None:
        self.sent = 0
        self.done = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hooks"

        def serve() -> None:
            peer, _ = self.listener.accept()
            with peer:
                peer.recv(65536)
                block = b"x" * chunk
                try:
                    peer.sendall(headers)
                    while self.sent < offered:
                        peer.sendall(block)
                        self.sent += len(block)
                        time.sleep(pause)
                except OSError:
                    pass
            self.done.set()

        threading.Thread(target=serve, daemon=True).start()


MIB = 1024 * 1024
BIG = 64 * MIB


@pytest.mark.parametrize(
    ("headers", "chunk", "pause", "said"),
    [
        pytest.param(f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode(), 64 * 1024, 0,
                     None, id="a-huge-body"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", 64 * 1024, 0, None,
                     id="a-body-without-end"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", 1, 0.02, None,
                     id="a-body-dripping"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Slow: ", 1, 0.02, "did not answer within 0.5 s",
                     id="headers-dripping"),
    ],
)  # fmt: skip
def test_an_answer_is_read_to_a_cap_within_one_deadline(
    headers: bytes, chunk: int, pause: float, said: str | None
) -> None:
    """A 2xx status is the answer: the body is read to BODY_CAP at most, and the whole POST ends
    at notify_timeout_seconds however slowly the receiver drips. Asserted on bytes: what the
    server could send before the operator hung up, and the memory the POST took."""
    flood = Flood(BIG if chunk > 1 else 1_000_000, chunk, pause, headers)
    settings = OPEN.model_copy(update={"notify_timeout_seconds": 0.5})
    tracemalloc.start()
    try:
        error = post(flood.url, settings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    sent_when_it_returned = flood.sent
    flood.listener.close()
    if said is None:
        assert error is None
    else:
        assert error is not None and error.endswith(said), error
    assert peak < 4 * MIB  # the old client held the whole body: 64 MiB
    if chunk > 1:
        assert flood.done.wait(10)
        assert flood.sent < 16 * MIB  # the cap, plus what the sockets' buffers hold
    else:
        assert sent_when_it_returned < 250  # 0.5 s of a byte per 20 ms, with room for a slow CPU


def test_the_policy_and_deadline_settings_parse_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBETUNE_NOTIFY_ALLOWED_CIDRS", '["10.20.0.0/16", "fd12::/64"]')
    monkeypatch.setenv("KUBETUNE_NOTIFY_ALLOWED_HOSTS", '["deployer.ml-serving.svc", "*.hooks.io"]')
    monkeypatch.setenv("KUBETUNE_NOTIFY_DENIED_CIDRS", '["10.96.0.0/12"]')
    policy = notifications.Policy.of(OperatorSettings())
    assert policy.denied == (ip_network("10.96.0.0/12"),)
    assert policy.allowed == (ip_network("10.20.0.0/16"), ip_network("fd12::/64"))
    assert policy.allowed_hosts == ("deployer.ml-serving.svc", "*.hooks.io")
    monkeypatch.setenv("KUBETUNE_NOTIFY_ALLOWED_HOSTS", '["http://x"]')
    with pytest.raises(ValueError, match="notify_allowed_hosts"):
        OperatorSettings()
    monkeypatch.delenv("KUBETUNE_NOTIFY_ALLOWED_HOSTS")
    monkeypatch.setenv("KUBETUNE_NOTIFY_DENIED_CIDRS", '["10.0.0.1/8"]')  # host bits set
    with pytest.raises(ValueError, match="notify_denied_cidrs"):
        OperatorSettings()
