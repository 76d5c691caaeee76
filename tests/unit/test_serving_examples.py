"""examples/serving: the manifests docs/serving.md shows, valid for Kubernetes where a schema
exists (kubernetes-validate, strict), and pointing at the paths kubetune writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.local import load_job

ROOT = Path(__file__).resolve().parents[2]
SERVING = sorted((ROOT / "examples" / "serving").glob("*.yaml"))
# CRDs kubernetes-validate has no schema for: checked below by what they must point at.
NO_OVERRIDES = {"sets": [], "model": None, "dataset": None, "output": None}
NO_SCHEMA = {("serving.kserve.io/v1beta1", "InferenceService")}


@pytest.mark.parametrize("path", SERVING, ids=lambda p: p.name)
def test_serving_manifests_are_valid_kubernetes(path: Path) -> None:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NO_SCHEMA:
            continue
        kubernetes_validate.validate(doc, "1.32.0", strict=True)  # raises on any problem


def test_serving_examples_load_what_the_retraining_example_writes() -> None:
    job = load_job(str(ROOT / "examples/retraining.yaml"), None, NO_OVERRIDES)
    runs = f"{job.spec.output.uri}/runs/RUN_ID"
    vllm, _service = yaml.safe_load_all((ROOT / "examples/serving/vllm-lora.yaml").read_text())
    pod = vllm["spec"]["template"]["spec"]
    assert f"{runs}/adapter/" in pod["initContainers"][0]["args"]
    args = pod["containers"][0]["args"]
    assert "--enable-lora" in args
    assert f"--model={job.spec.model.uri.removeprefix('hf://')}" in args
    # The promotion receiver beside it: the same base, the job's runs, the volume vLLM reads.
    receiver = pod["containers"][1]
    env = {e["name"]: e.get("value") for e in receiver["env"]}
    assert env["BASE_MODEL"] == job.spec.model.uri
    assert env["ADAPTER_PREFIX"] == f"{job.spec.output.uri}/runs/"
    assert "KUBETUNE_WEBHOOK_KEY" in env and receiver["volumeMounts"][0]["name"] == "adapters"
    assert "/adapters" in [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    kserve = yaml.safe_load((ROOT / "examples/serving/kserve-merged.yaml").read_text())
    assert kserve["spec"]["predictor"]["model"]["storageUri"] == f"{runs}/merged/"
