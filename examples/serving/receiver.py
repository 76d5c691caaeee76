"""A promotion receiver for vLLM: kubetune's webhook in, the promoted LoRA adapter served out.

Runs beside vLLM in its pod (examples/serving/vllm-lora.yaml: a second container sharing the
adapters volume and localhost). For each promotion event (docs/serving.md) it:

1. verifies the Standard Webhooks signature (401 if forged or older than 5 minutes);
2. checks the event: its type, the base model vLLM serves (422 otherwise: an adapter only
   applies to its own base), the adapter under ADAPTER_PREFIX (what this receiver may fetch)
   and under the run's own prefix, beside its manifest.json;
3. downloads the adapter's files that manifest.json lists, checks each size and sha256, and
   moves the folder into place (ADAPTER_DIR/<runId>) only when all match;
4. swaps vLLM's adapter through its runtime LoRA API (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True):
   unload LORA_NAME, load LORA_NAME from the new folder, so clients keep asking for the same
   model name; if the load fails, the previous folder is loaded again and the answer is 502.

Any non-2xx answer makes the operator retry with backoff; an event it has already applied
(the operator delivers at least once) is answered 200 without doing anything. Rollback is
the same event for an older run.

Needs `pip install standardwebhooks obstore`. Settings, from the environment:
KUBETUNE_WEBHOOK_KEY (the signing Secret's value, whsec_...), BASE_MODEL (as the FineTuneJob
names it, e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct), ADAPTER_PREFIX (e.g.
s3://models/text-to-sql/), LORA_NAME (text-to-sql), ADAPTER_DIR (/adapters), VLLM_URL
(http://127.0.0.1:8000), SERVED_RUN_ID (the run vLLM starts with, to restore it if the first
swap fails), PORT (8080); storage credentials as obstore reads them (AWS_*,
GOOGLE_*, AZURE_*).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import obstore
from obstore.store import from_url
from standardwebhooks import Webhook, WebhookVerificationError

log = logging.getLogger("receiver")

PROMOTED = "dev.kubetune.finetunejob.promoted.v1"
RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_BODY = 1 << 20


class Refused(Exception):
    """An event this receiver will not apply: answered with status, never retried into success."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Receiver:
    key: str
    base_model: str
    adapter_prefix: str
    lora_name: str = "text-to-sql"
    adapter_dir: Path = Path("/adapters")
    vllm_url: str = "http://127.0.0.1:8000"
    served: str | None = None  # the run id vLLM serves under lora_name
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_env(cls) -> Receiver:
        env = os.environ
        return cls(
            key=env["KUBETUNE_WEBHOOK_KEY"],
            base_model=env["BASE_MODEL"],
            adapter_prefix=env["ADAPTER_PREFIX"],
            lora_name=env.get("LORA_NAME", "text-to-sql"),
            adapter_dir=Path(env.get("ADAPTER_DIR", "/adapters")),
            vllm_url=env.get("VLLM_URL", "http://127.0.0.1:8000"),
            served=env.get("SERVED_RUN_ID") or None,  # what vLLM was started with
        )

    def handle(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        try:
            event = Webhook(self.key).verify(body, headers)
        except WebhookVerificationError as exc:
            return 401, f"not verified: {exc}"
        try:
            with self._lock:  # one swap at a time
                return 200, self._apply(event)
        except Refused as exc:
            log.warning("refused: %s", exc)
            return exc.status, str(exc)
        except Exception as exc:  # storage unreachable, a bug: the operator retries
            log.exception("failed")
            return 502, f"failed: {type(exc).__name__}"

    def _apply(self, event: dict[str, Any]) -> str:
        if event.get("type") != PROMOTED:
            return f"ignored: {event.get('type')}"
        data = event.get("data") or {}
        run_id = str(data.get("runId", ""))
        if not RUN_ID.match(run_id):
            raise Refused(422, f"runId {run_id!r} is not a run id")
        if run_id == self.served:
            return f"run {run_id} is already served"  # a redelivery
        base = (data.get("baseModel") or {}).get("uri")
        if base != self.base_model:
            raise Refused(422, f"run {run_id} tunes {base}, this vLLM serves {self.base_model}")
        adapter, manifest = data.get("adapterUri") or "", data.get("manifestUri") or ""
        run = manifest.removesuffix("manifest.json")
        if (
            not run.endswith(f"/{run_id}/")
            or adapter.rstrip("/") != f"{run}adapter"
            or any(p in (".", "..") or "%" in p for p in run.split("://", 1)[-1].split("/"))
        ):  # a store resolves '..' and %2e: s3://models/x/runs/../../other/ is not under x/
            raise Refused(422, f"run {run_id}: adapterUri {adapter!r} is not its run's adapter")
        if not adapter.startswith(self.adapter_prefix.rstrip("/") + "/"):
            raise Refused(403, f"run {run_id}: {adapter} is outside {self.adapter_prefix}")
        folder = self._fetch(run_id, run, manifest)
        self._swap(run_id, folder)
        return f"serving run {run_id} as {self.lora_name}"

    def _fetch(self, run_id: str, run: str, manifest_uri: str) -> Path:
        """The adapter's files, each checked against manifest.json, moved into place last."""
        folder = self.adapter_dir / run_id
        if folder.exists():
            return folder  # fetched and checked before (a redelivery after a failed swap)
        options = {}
        if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
            options["client_options"] = {"allow_http": True}  # an in-cluster S3 server
        store = from_url(run, **options)
        listed = json.loads(bytes(obstore.get(store, "manifest.json").bytes()))
        files = [
            f for f in listed.get("files", []) if str(f.get("path", "")).startswith("adapter/")
        ]
        if not files:
            raise Refused(422, f"run {run_id}: manifest.json lists no adapter files")
        staging = self.adapter_dir / f".{run_id}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        for entry in files:
            path = PurePosixPath(entry["path"])
            if path.is_absolute() or ".." in path.parts:
                raise Refused(422, f"run {run_id}: manifest.json names {path}")
            data = bytes(obstore.get(store, str(path)).bytes())
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise Refused(422, f"run {run_id}: {path} does not match manifest.json")
            target = staging / path.relative_to("adapter")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        staging.rename(folder)
        return folder

    def _swap(self, run_id: str, folder: Path) -> None:
        """vLLM serves folder as lora_name: unload the old adapter, load the new one."""
        self._vllm("unload_lora_adapter", {"lora_name": self.lora_name}, missing_ok=True)
        try:
            self._vllm("load_lora_adapter", {"lora_name": self.lora_name, "lora_path": str(folder)})
        except Refused:
            if self.served is not None:  # back to what was served
                previous = str(self.adapter_dir / self.served)
                self._vllm(
                    "load_lora_adapter", {"lora_name": self.lora_name, "lora_path": previous}
                )
            raise
        log.info("serving run %s (was %s) as %s", run_id, self.served, self.lora_name)
        self.served = run_id

    def _vllm(self, verb: str, body: dict[str, str], missing_ok: bool = False) -> None:
        request = urllib.request.Request(
            f"{self.vllm_url}/v1/{verb}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read()
        except urllib.error.HTTPError as exc:
            # vLLM answers 404 (or 400 in older versions) to unloading a name it does not serve
            if missing_ok and exc.code in (400, 404):
                return
            raise Refused(502, f"vLLM {verb} answered {exc.code}") from exc
        except OSError as exc:
            raise Refused(502, f"vLLM {verb} failed: {type(exc).__name__}") from exc


def server(receiver: Receiver, host: str = "0.0.0.0", port: int = 8080) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            if not 0 <= size <= MAX_BODY:
                status, text = 413, "too large"
            else:
                body = self.rfile.read(size)
                status, text = receiver.handle(body, {k: v for k, v in self.headers.items()})
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, format: str, *args: Any) -> None:
            log.info(format, *args)

    return ThreadingHTTPServer((host, port), Handler)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server(Receiver.from_env(), port=int(os.environ.get("PORT", "8080"))).serve_forever()
