"""The trainer metrics read (Kube.metrics) against real servers on 127.0.0.1: the trainer's own
(prometheus_client), and pods that answer badly on purpose. Whatever answers on a trainer's
address, one read ends within its deadline (the whole request, not each read) and keeps at most
`max_bytes`; a slow or oversized answer counts as no reading (None).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubetune.controller.kube import Kube

Serve = Callable[[socket.socket], None]


class Pod:
    """A TCP server on 127.0.0.1 that answers each connection with `serve` and counts the bytes
    it managed to send."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.sent = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._run, daemon=True)
        self._accept.start()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # OSError: the reader hung up
            conn.recv(4096)  # the request
            self.serve(conn)

    def close(self) -> None:
        self.listener.close()
        for thread in self._threads:
            thread.join(60)  # each answer ends by itself (a bounded trickle or stream)


@pytest.fixture
def pod() -> Iterator[Callable[[Serve], Pod]]:
    started: list[Pod] = []

    def start(serve: Serve) -> Pod:
        started.append(Pod(serve))
        return started[-1]

    yield start
    for p in started:
        p.close()


METRICS = b"# TYPE kubetune_trainer_step gauge\nkubetune_trainer_step 42.0\n"


def answer(head: bytes, body: bytes = b"") -> Serve:
    return lambda conn: conn.sendall(head + b"\r\n\r\n" + body)


@pytest.mark.parametrize(
    ("serve", "expected"),
    [
        pytest.param(
            answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain", METRICS),
            METRICS.decode(),
            id="whole",
        ),
        pytest.param(
            answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(METRICS), METRICS),
            ),
            METRICS.decode(),
            id="chunked",
        ),
        pytest.param(answer(b"HTTP/1.0 404 Not Found", b"no"), None, id="not-found"),
        pytest.param(
            answer(b"HTTP/1.0 302 Found\r\nLocation: http://169.254.169.254/"), None, id="redirect"
        ),
        pytest.param(
            answer(b"HTTP/1.0 200 OK\r\nContent-Length: 1000", METRICS), None, id="cut-short"
        ),
        pytest.param(lambda conn: conn.sendall(b"\x00\x01ssh"), None, id="not-http"),
        pytest.param(answer(b"HTTP/1.0 200 OK", b"x" * (1 << 20)), None, id="over-the-cap"),
    ],
)
def test_a_metrics_answer_is_read_whole_or_not_at_all(
    pod: Callable[[Serve], Pod], serve: Serve, expected: str | None
) -> None:
    p = pod(serve)
    assert Kube.metrics("127.0.0.1", p.port, timeout=10) == expected


def test_the_trainers_own_metrics_server_is_read(unused_port: int) -> None:
    registry = CollectorRegistry()
    Gauge("kubetune_trainer_step", "Step.", registry=registry).set(42)
    server, thread = start_http_server(unused_port, addr="127.0.0.1", registry=registry)
    try:
        text = Kube.metrics("127.0.0.1", unused_port, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert text is not None and "kubetune_trainer_step 42.0" in text


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nobody_listening_is_no_reading(unused_port: int) -> None:
    assert Kube.metrics("127.0.0.1", unused_port, timeout=10) is None


def test_a_trickling_answer_ends_at_the_deadline(pod: Callable[[Serve], Pod]) -> None:
    """One byte every 0.1 s: each read gets a byte well within any per-read timeout, so only a
    deadline on the whole request ends it. The trickle stops by itself after 600 bytes (a
    minute), as a guard: a read without a deadline would wait for all of it and return it."""

    def trickle(conn: socket.socket) -> None:
        p.send(conn, b"HTTP/1.0 200 OK\r\n\r\n")
        for _ in range(600):
            p.send(conn, b"#")
            time.sleep(0.1)

    p = pod(trickle)
    assert Kube.metrics("127.0.0.1", p.port, timeout=1.0) is None
    p.close()
    # It hung up after about ten bytes (one second's worth); a generous bound, not a timing.
    assert p.sent < 200


def test_an_endless_answer_stops_at_the_cap(pod: Callable[[Serve], Pod]) -> None:
    """As fast as the connection takes it, for 256 MiB (a guard: a read without a cap would
    keep all of it and return it). The reader hangs up after 64 KiB; the server got no further
    than that and what the sockets' buffers held."""
    block = b"kubetune_trainer_step 1\n" * 4096

    def endless(conn: socket.socket) -> None:
        p.send(conn, b"HTTP/1.0 200 OK\r\n\r\n")
        while p.sent < 256 << 20:
            p.send(conn, block)

    p = pod(endless)
    assert Kube.metrics("127.0.0.1", p.port, timeout=30, max_bytes=64 << 10) is None
    p.close()  # the server notices the hang-up at its next send
    assert p.sent < 32 << 20
