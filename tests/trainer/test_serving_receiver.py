"""examples/serving/receiver.py against the real thing on both sides: a run of the real trainer
is promoted, the operator's own code builds, signs and POSTs its notification (kubetune/notify.py,
controller/notifications.py), and the receiver fetches the adapter by its manifest and hands it to a
stand-in for vLLM's runtime LoRA API, which loads it with PEFT onto the tiny base model, as
vLLM would load it onto its own.

The stand-in answers as vLLM's API server does (vllm/entrypoints/openai/serving_models.py,
load_lora_adapter / unload_lora_adapter, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): 200 on
success; 400 when the name is already loaded; 404 when unloading a name it does not serve. vLLM
itself needs a GPU build this suite does not have."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJob, WebhookSpec
from kubetune.controller.notifications import post, target_of
from kubetune.controller.settings import OperatorSettings
from kubetune.notify import Message, promotion_event, record_of, result_status, signed, signing_key
from tests.trainer.conftest import config_for, job_manifest, run_job

ROOT = Path(__file__).resolve().parents[2]
KEY = "whsec_" + base64.b64encode(b"receiver-test-key-0123456789abcd").decode()
OPEN = OperatorSettings.model_validate({}).model_copy(
    update={"notify_allowed_cidrs": [ip_network("127.0.0.1/32")]}
)


def _receiver_module() -> Any:
    spec = importlib.util.spec_from_file_location("receiver", ROOT / "examples/serving/receiver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["receiver"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class FakeVllm:
    """vLLM's two runtime LoRA endpoints; a load really loads the adapter with PEFT."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.served: dict[str, str] = {}  # lora_name -> lora_path
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.fail_loads = 0
        vllm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                verb = self.path.rsplit("/", 1)[-1]
                vllm.calls.append((verb, body))
                status = vllm.answer(verb, body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def answer(self, verb: str, body: dict[str, str]) -> int:
        name = body["lora_name"]
        if verb == "unload_lora_adapter":
            return 200 if self.served.pop(name, None) else 404
        if name in self.served:
            return 400
        if self.fail_loads:
            self.fail_loads -= 1
            return 500
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(self.base), body["lora_path"]
        )
        self.served[name] = body["lora_path"]
        return 200


@pytest.fixture
def vllm(tiny_model: Path) -> Iterator[FakeVllm]:
    fake = FakeVllm(tiny_model)
    yield fake
    fake.http.shutdown()


def _notification(doc: dict[str, Any], result: Any) -> Message:
    """What the operator sends for this run, built by its own code from the run's status."""
    job = FineTuneJob.model_validate(doc)
    status = result_status(job, result)
    spec_hash = config_for(doc, result.run_id).spec_hash or ""
    message = promotion_event(record_of(job, status, spec_hash), job.spec.output.uri, status)
    return signed(message, signing_key(KEY), result.run_id, datetime.now(UTC))


def test_the_receiver_serves_each_promoted_adapter_through_vllms_runtime_api(
    tiny_model: Path, task_file: Path, tmp_path: Path, vllm: FakeVllm
) -> None:
    out = tmp_path / "out"
    doc = job_manifest(tiny_model, task_file, out.as_uri(), "lora", hyperparameters__maxSteps=4)
    doc["spec"]["gates"] = []
    first, _ = run_job(doc, tmp_path / "work1", run_id="a1a1a1a1")
    second, _ = run_job(doc, tmp_path / "work2", run_id="b2b2b2b2")
    assert first.promoted and second.promoted, (first.message, second.message)

    module = _receiver_module()
    receiver = module.Receiver(
        key=KEY,
        base_model=doc["spec"]["model"]["uri"],
        adapter_prefix=out.as_uri() + "/",
        lora_name="text-to-sql",
        adapter_dir=tmp_path / "adapters",
        vllm_url=vllm.url,
    )
    receiver.adapter_dir.mkdir()
    http = module.server(receiver, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{http.server_address[1]}/hooks/kubetune"
    target = target_of(WebhookSpec(url=url), url)

    def send(message: Message) -> str | None:
        return post(target, message, OPEN)  # the operator's own delivery: None is a 2xx

    try:
        assert send(_notification(doc, first)) is None
        assert vllm.served == {"text-to-sql": str(receiver.adapter_dir / "a1a1a1a1")}
        files = sorted(p.name for p in (receiver.adapter_dir / "a1a1a1a1").iterdir())
        assert "adapter_config.json" in files and "adapter_model.safetensors" in files
        # At least once: the same event again changes nothing.
        calls = len(vllm.calls)
        assert send(_notification(doc, first)) is None and len(vllm.calls) == calls

        # The next promotion replaces it under the same name; a failed load puts the old back
        # and answers 502, so the operator retries, and the retry succeeds.
        vllm.fail_loads = 1
        assert send(_notification(doc, second)) == f"{target.receiver} answered 502"
        assert vllm.served == {"text-to-sql": str(receiver.adapter_dir / "a1a1a1a1")}
        assert send(_notification(doc, second)) is None
        assert vllm.served == {"text-to-sql": str(receiver.adapter_dir / "b2b2b2b2")}

        # Forged, another base, files that do not match the manifest: refused, nothing loaded.
        genuine = _notification(doc, first)
        forged = Message(genuine.headers, genuine.body.replace(b"a1a1a1a1", b"c3c3c3c3"))
        assert send(forged) == f"{target.receiver} answered 401"
        other = {**doc, "spec": {**doc["spec"], "model": {"uri": "hf://other/base"}}}
        assert send(_notification(other, first)).endswith("answered 422")
        (receiver.adapter_dir / "a1a1a1a1").rename(tmp_path / "moved")
        weights = out / "runs/a1a1a1a1/adapter/adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        assert send(_notification(doc, first)).endswith("answered 422")
        # Outside the prefix it may fetch, or climbing out of it with '..': refused.
        receiver.adapter_prefix = (tmp_path / "elsewhere").as_uri() + "/"
        assert send(_notification(doc, first)).endswith("answered 403")
        receiver.adapter_prefix = out.as_uri() + "/"
        run = f"{out.as_uri()}/runs/x/../a1a1a1a1/"
        climbing = first.artifacts.model_copy(
            update={"adapter_uri": f"{run}adapter/", "manifest_uri": f"{run}manifest.json"}
        )
        climbing_run = first.model_copy(update={"artifacts": climbing})
        assert send(_notification(doc, climbing_run)).endswith("answered 422")
        assert vllm.served == {"text-to-sql": str(receiver.adapter_dir / "b2b2b2b2")}
        assert not (receiver.adapter_dir / "a1a1a1a1").exists()
    finally:
        http.shutdown()
