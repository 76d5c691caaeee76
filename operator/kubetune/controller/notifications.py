"""Announcing a promotion to spec.notify.webhook: the POST (I/O), the destination policy it obeys
and its retry schedule (pure).

The run's final status carries `promotion.notification` (state Pending) from the moment the run
is promoted (decide.py). Every reconcile of the job then comes here: a Pending notification that
is due is built from the job's spec and status (kubetune/notify.py: a CloudEvent, signed as
Standard Webhooks sign), POSTed, and its new state written back to the status; one still Pending
asks the work queue to come back at nextAttemptTime. Delivery is at least once: a receiver that
answered 2xx but whose answer was lost (or an operator that died before writing the status) gets
the event again with the same id.

The URL is a tenant's, so the POST is the operator's own request made on a tenant's behalf:
- its host is resolved once, every address it resolves to is checked against the policy
  (`Policy`: loopback, link-local, unspecified, multicast and reserved addresses always; the
  chart's notify.deniedCidrs; notify.allowedCidrs and notify.allowedHosts open them), and the
  connection goes to the checked address (the Host header, TLS SNI and the certificate check use
  the URL's name), so a second lookup cannot send it elsewhere; redirects are not followed;
- the whole request has one deadline (notify.timeoutSeconds), not one per read, and at most
  BODY_CAP bytes of the answer are read, then dropped: an answer cannot hold or fill the operator;
- what a status message or an Event says is fixed phrases, the HTTP status code, an error's
  class and the host of spec.notify.webhook.url; never the answer's body, an error's text or a
  Secret's value (a URL from urlSecret is named by its Secret and key).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from kubetune.api import FineTuneJob, FineTuneJobStatus, NotificationStatus, WebhookSpec
from kubetune.controller.errors import Misconfigured, Retry
from kubetune.controller.settings import OperatorSettings
from kubetune.notify import Message, promotion_event, record_of, signed, signing_key

log = logging.getLogger("kubetune.operator")

# The most bytes of a receiver's answer that are read (and dropped): a 2xx status is the answer.
BODY_CAP = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refused whatever notify.deniedCidrs says; only notify.allowedCidrs opens them.
ALWAYS_REFUSED: dict[str, tuple[str, ...]] = {
    "a loopback address": ("127.0.0.0/8", "::1/128"),
    "a link-local address (the cloud metadata service's among them)": (
        "169.254.0.0/16",
        "fe80::/10",
    ),
    "an unspecified address": ("0.0.0.0/8", "::/128"),
    "a multicast address": ("224.0.0.0/4", "ff00::/8"),
    "a reserved address": ("240.0.0.0/4",),
}
_ALWAYS: tuple[tuple[str, IPNetwork], ...] = tuple(
    (kind, ipaddress.ip_network(cidr)) for kind, cidrs in ALWAYS_REFUSED.items() for cidr in cidrs
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_POLICY = "the operator's webhook policy refuses it (the chart's notify.allowedCidrs or "
_POLICY += "notify.allowedHosts opens a destination)"


@dataclass(frozen=True)
class Policy:
    """Where webhook deliveries may go: the operator's settings, parsed once."""

    denied: tuple[IPNetwork, ...]
    allowed: tuple[IPNetwork, ...]
    allowed_hosts: tuple[str, ...]

    @classmethod
    def of(cls, settings: OperatorSettings) -> Policy:
        def networks(values: list[Any]) -> tuple[IPNetwork, ...]:
            return tuple(ipaddress.ip_network(str(v)) for v in values)

        return cls(
            denied=networks(settings.notify_denied_cidrs),
            allowed=networks(settings.notify_allowed_cidrs),
            allowed_hosts=tuple(h.lower().rstrip(".") for h in settings.notify_allowed_hosts),
        )

    def host_is_allowed(self, host: str) -> bool:
        """Whether notify.allowedHosts names host: exactly, or as *.<suffix> for its subdomains."""
        host = host.lower().rstrip(".")
        return any(
            host.endswith(entry[1:]) if entry.startswith("*.") else host == entry
            for entry in self.allowed_hosts
        )

    def refusal(self, address: IPAddress, host: str) -> str | None:
        """Why the policy refuses address (which host resolved to); None when it may be called.
        An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4) is judged by both."""
        judged: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            inner = address.ipv4_mapped or address.sixtofour
            if inner is None and address in _NAT64:
                inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            if inner is not None:
                judged.append(inner)
        for each in judged:
            if any(each in net for net in self.allowed):
                continue
            for kind, net in _ALWAYS:
                if each in net:
                    return kind
            if self.host_is_allowed(host):
                continue
            for net in self.denied:
                if each in net:
                    return f"in {net} (notify.deniedCidrs)"
        return None


@dataclass(frozen=True)
class Target:
    """Where a notification goes: the URL, the spec field it came from, and how a message may
    name the receiver (its host from spec.notify.webhook.url; only its Secret for urlSecret)."""

    url: str
    field: str
    receiver: str
    from_secret: bool


def target_of(webhook: WebhookSpec, url: str) -> Target:
    field = "spec.notify.webhook"
    if webhook.url_secret is not None:
        ref = webhook.url_secret
        where = f"Secret {ref.name!r} key {ref.key!r}"
        return Target(url, f"{field}.urlSecret", f"the receiver in {where}", True)
    try:
        netloc = urlsplit(url).netloc.rpartition("@")[2][:260]
    except ValueError:
        netloc = "?"
    return Target(url, f"{field}.url", f"the receiver at {netloc}", False)


class Undeliverable(Exception):
    """This attempt cannot be made (a refused destination, a name that does not resolve);
    its message is safe for the status and Events."""


@dataclass(frozen=True)
class _Address:
    family: int
    sockaddr: tuple[Any, ...]


def _lookup(host: str, port: int, seconds: float) -> list[tuple[Any, ...]]:
    """getaddrinfo, given up after seconds (a lookup in a thread; the resolver ends it later)."""
    found: list[Any] = []

    def run() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError, ValueError) as exc:
            found.append(exc)

    worker = threading.Thread(target=run, name="webhook-lookup", daemon=True)
    worker.start()
    worker.join(max(0.0, seconds))
    if not found:
        raise TimeoutError
    if isinstance(found[0], Exception):
        raise found[0]
    return list(found[0])


def destination(
    target: Target, policy: Policy, seconds: float
) -> tuple[str, int, bool, list[_Address]]:
    """The URL's host, port, whether it is https, and its addresses, every one of them checked
    against the policy (raises Undeliverable)."""
    name = target.receiver if target.from_secret else target.url
    try:
        parts = urlsplit(target.url)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise Undeliverable(f"{target.field}: {name} is not an http:// or https:// URL")
    tls = parts.scheme == "https"
    port = port or (443 if tls else 80)
    try:
        infos = _lookup(host, port, seconds)
    except TimeoutError:
        raise Undeliverable(f"the name of {target.receiver} did not resolve in time") from None
    except (OSError, UnicodeError, ValueError) as exc:
        raise Undeliverable(
            f"the name of {target.receiver} could not be resolved ({type(exc).__name__})"
        ) from None
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        why = policy.refusal(address, host)
        if why is not None:
            if target.from_secret:
                raise Undeliverable(f"{target.field}: {name} reaches {why}; {_POLICY}")
            said = "is" if host == str(address) else f"resolves to {address},"
            raise Undeliverable(f"{target.field}: {host} {said} {why}; {_POLICY}")
        addresses.append(_Address(family, tuple(sockaddr)))
    if not addresses:
        raise Undeliverable(f"the name of {target.receiver} has no IP address")
    return host, port, tls, addresses


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to addresses already checked, never to a fresh lookup of the name:
    the Host header, and for https the SNI and the certificate check, still use the name."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: list[_Address],
        tls: ssl.SSLContext | None,
        deadline: float,
    ) -> None:
        super().__init__(f"[{host}]" if ":" in host else host, port)
        self.default_port = 80 if tls is None else 443  # the Host header names other ports
        self._addresses, self._tls, self._deadline = addresses, tls, deadline

    def connect(self) -> None:
        error: OSError = ConnectionError("no address")
        for address in self._addresses:
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            self.sock = sock  # the deadline's watchdog cuts whatever self.sock is
            try:
                sock.settimeout(max(0.001, self._deadline - time.monotonic()))
                sock.connect(address.sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            if self._tls is not None:
                wrapped = self._tls.wrap_socket(
                    sock, server_hostname=self.host, do_handshake_on_connect=False
                )
                self.sock = wrapped
                wrapped.do_handshake()
            return
        raise error


def _cut(connection: _PinnedConnection, passed: threading.Event) -> None:
    """The deadline: shut the socket down under whatever read or write is waiting on it."""
    passed.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def post(target: Target, message: Message, settings: OperatorSettings) -> str | None:
    """POST message to target within settings.notify_timeout_seconds, all of it; None when the
    receiver answered 2xx, else why not, in one line that quotes nothing the receiver, the
    network or a Secret said."""
    seconds = settings.notify_timeout_seconds
    deadline = time.monotonic() + seconds
    try:
        host, port, tls, addresses = destination(target, Policy.of(settings), seconds)
    except Undeliverable as exc:
        return str(exc)
    context = ssl.create_default_context() if tls else None
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = _PinnedConnection(host, port, addresses, context, deadline)
    passed = threading.Event()
    late = f"{target.receiver} did not answer within {seconds:g} s"
    watchdog = threading.Timer(deadline - time.monotonic(), _cut, (connection, passed))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.request("POST", path, body=message.body, headers=message.headers)
        response = connection.getresponse()
        if passed.is_set():  # headers cut short by the deadline may still parse
            return late
        status = response.status
        _drain(response)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if passed.is_set() or time.monotonic() >= deadline:
            return late
        return f"POST to {target.receiver} failed: {type(exc).__name__}"
    finally:
        watchdog.cancel()
        connection.close()
    if 200 <= status < 300:
        return None
    said = f"{target.receiver} answered {status}"
    return said + (" (redirects are not followed)" if 300 <= status < 400 else "")


def _drain(response: http.client.HTTPResponse) -> None:
    """Read at most BODY_CAP bytes of the answer and drop them. The status has decided already:
    a body cut short by the deadline or the connection changes nothing."""
    read = 0
    with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
        while read < BODY_CAP:
            chunk = response.read1(min(16 * 1024, BODY_CAP - read))
            if not chunk:
                break
            read += len(chunk)


def backoff(attempts: int, settings: OperatorSettings) -> float:
    """Seconds before attempt attempts+1: the base, doubling per failure, capped."""
    base = settings.notify_backoff_seconds * 2 ** max(0, attempts - 1)
    return float(min(settings.notify_backoff_max_seconds, base))


def after_attempt(
    note: NotificationStatus, error: str | None, now: datetime, settings: OperatorSettings
) -> NotificationStatus:
    """The notification's state after one more attempt that failed with error (None: delivered)."""
    attempts = note.attempts + 1
    if error is None:
        return note.model_copy(
            update={
                "state": "Delivered",
                "attempts": attempts,
                "last_attempt_time": now,
                "next_attempt_time": None,
                "message": None,
            }
        )
    if attempts >= settings.notify_max_attempts:
        return note.model_copy(
            update={
                "state": "Failed",
                "attempts": attempts,
                "last_attempt_time": now,
                "next_attempt_time": None,
                "message": f"{error} (gave up after {attempts} attempts)",
            }
        )
    delay = timedelta(seconds=backoff(attempts, settings))
    return note.model_copy(
        update={
            "attempts": attempts,
            "last_attempt_time": now,
            "next_attempt_time": (now + delay).replace(microsecond=0),
            "message": error,
        }
    )


class SecretReader(Protocol):
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...


class NotReady(Exception):
    """What the notification needs is missing (a Secret, a key): an attempt that failed."""


def _secret_value(kube: SecretReader, namespace: str, name: str, key: str, field: str) -> str:
    try:
        data = kube.secret_data(namespace, name)
    except Misconfigured as exc:  # e.g. the chart's readStorageSecrets: false (403)
        raise NotReady(f"Secret {name!r} cannot be read ({field}): {exc}") from exc
    if data is None:
        raise NotReady(f"Secret {name!r} not found in namespace {namespace} ({field})")
    if key not in data:
        raise NotReady(f"Secret {name!r} has no key {key!r} ({field})")
    return data[key]


def request(
    kube: SecretReader,
    webhook: WebhookSpec,
    job: FineTuneJob,
    status: FineTuneJobStatus,
    spec_hash: str,
    note: NotificationStatus,
    now: datetime,
) -> tuple[Target, Message]:
    """Where this attempt goes and its signed request (raises NotReady)."""
    namespace = job.metadata.namespace or ""
    field = "spec.notify.webhook"
    if webhook.url_secret is not None:
        ref = webhook.url_secret
        url = _secret_value(kube, namespace, ref.name, ref.key, f"{field}.urlSecret").strip()
    else:
        url = webhook.url or ""
    key = None
    if webhook.signing_secret is not None:
        ref = webhook.signing_secret
        value = _secret_value(kube, namespace, ref.name, ref.key, f"{field}.signingSecret")
        try:
            key = signing_key(value)
        except ValueError as exc:
            raise NotReady(f"{field}.signingSecret: {exc}") from exc
    message = promotion_event(record_of(job, status, spec_hash), job.spec.output.uri, status)
    return target_of(webhook, url), signed(message, key, note.id, now)


def deliver(
    kube: SecretReader,
    webhook: WebhookSpec,
    job: FineTuneJob,
    status: FineTuneJobStatus,
    spec_hash: str,
    note: NotificationStatus,
    now: datetime,
    settings: OperatorSettings,
) -> str | None:
    """One delivery attempt: None when the receiver answered 2xx, else why not, in one line
    fit for the status, an Event and the log."""
    try:
        target, message = request(kube, webhook, job, status, spec_hash, note, now)
    except NotReady as exc:
        return str(exc)
    return post(target, message, settings)


def due_in(note: NotificationStatus, now: datetime) -> float:
    """Seconds until the next attempt of a Pending notification (0: now)."""
    if note.next_attempt_time is None:
        return 0.0
    return max(0.0, (note.next_attempt_time - now).total_seconds())


def retry_later(note: NotificationStatus, now: datetime) -> Retry:
    return Retry(
        f"notification {note.id}: attempt {note.attempts + 1} at {note.next_attempt_time}"
        + (f" (last: {note.message})" if note.message else ""),
        max(1.0, due_in(note, now)),
    )
