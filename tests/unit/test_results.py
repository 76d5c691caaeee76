"""Reading a finished run's result.json and an output's latest.json: a transient failure is
retried (the run's final status is never written without its result), a permanent one gives up,
and only the Secret's keys are used."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kubetune.api import PromotionRecord
from kubetune.controller.errors import Retry
from kubetune.controller.results import MAX_RESULT_BYTES, read_latest, read_result
from kubetune_trainer import storage
from tests.support.s3 import S3Server


@pytest.fixture
def unavailable() -> Iterator[str]:
    """An S3 endpoint that answers 503 Service Unavailable to everything."""

    class Handler(BaseHTTPRequestHandler):
        def _busy(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _busy

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_unavailable_store_is_retried_later(unavailable: str) -> None:
    credentials = {
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "AWS_ENDPOINT_URL": unavailable,
        "AWS_REGION": "us-east-1",
    }
    with pytest.raises(Retry, match=r"result\.json of run 0123abcd not read yet"):
        read_result("s3://models/x", "0123abcd", credentials)


def test_a_refusal_or_nothing_there_gives_up(s3_env: S3Server) -> None:
    wrong = {**s3_env.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    assert read_result("s3://models/refused", "0123abcd", wrong) is None
    assert read_result("s3://models/nothing-here", "0123abcd", s3_env.env()) is None
    storage.write_bytes("s3://models/there/runs/0123abcd/result.json", b'{"runId": "0123abcd",'
                        b' "outcome": "Succeeded", "exitCode": 0}')  # fmt: skip
    assert read_result("s3://models/there", "0123abcd", s3_env.env()) is None  # no manifest yet
    storage.write_bytes("s3://models/there/runs/0123abcd/manifest.json", b"{}")
    found = read_result("s3://models/there", "0123abcd", s3_env.env())
    assert found is not None and found.outcome == "Succeeded"


def test_latest_json_is_read_with_the_secrets_keys_only(s3_env: S3Server) -> None:
    keys = s3_env.env()
    assert read_latest("s3://models/none-yet", keys) is None
    record = PromotionRecord(run_id="0123abcd", job="reviews")
    storage.write_bytes("s3://models/promoted/latest.json", record.model_dump_json().encode())
    found = read_latest("s3://models/promoted/", keys)
    assert found is not None and (found.run_id, found.job) == ("0123abcd", "reviews")
    wrong = {**keys, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    assert read_latest("s3://models/promoted", wrong) is None
    # No credentials in the Secret: the operator's own (this process's AWS_*) are never used.
    assert read_latest("s3://models/promoted", {}) is None
    storage.write_bytes("s3://models/garbage/latest.json", b'{"runId": 7}')
    assert read_latest("s3://models/garbage", keys) is None
    storage.write_bytes("s3://models/huge/latest.json", b" " * (MAX_RESULT_BYTES + 1))
    assert read_latest("s3://models/huge", keys) is None
