"""Both images built, then run as Kubernetes would run them: the trainer as the operator's own
pod spec says (uid 1000, read-only root, only its volumes writable, no network), the operator
as the chart's Deployment says, on the real control plane with the chart installed."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from hack import images
from kubetune.api import FineTuneJob, TrainerResult
from kubetune.controller import build
from kubetune.controller.settings import OperatorSettings
from tests.conftest import ROOT
from tests.images.conftest import Built
from tests.images.conftest import build as build_images
from tests.support.images import Runtime, layers, node_dir
from tests.support.node import NodeAgent
from tests.support.platform import RELEASE, SYSTEM, chart_operator, installed
from tests.support.specs import minimal_job

pytestmark = pytest.mark.images


def test_trainer_image_fine_tunes_as_the_operators_pod_runs_it(
    built: Built, tiny_model: Path, task_file: Path, tmp_path: Path
) -> None:
    doc = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "in-image", "namespace": "ml", "uid": "uid-image"},
        "spec": {
            "model": {"uri": f"file:///models/{tiny_model.name}"},
            "dataset": {"uri": f"file:///data/{task_file.name}", "testSplit": 0.1},
            "method": {"type": "lora"},
            "hyperparameters": {"maxSteps": 8, "batchSize": 16, "learningRate": 5e-3},
            "evaluation": {"metrics": ["loss", "exactMatch"], "maxNewTokens": 4},
            "gates": [{"metric": "loss", "max": 100}],
            "output": {"uri": "file:///out/in-image"},
            # W&B's offline mode runs its own core process: it must work with the pod's
            # read-only root and no network, writing only into the pod's volumes.
            "tracking": {"wandb": {"project": "in-image", "mode": "offline"}},
        },
    }
    job = FineTuneJob.model_validate(doc)
    settings = OperatorSettings(trainer_image=built.trainer, allow_file_output=True)
    run_id = "0123abcd"
    pod = build.build_job(job, run_id, settings)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == built.trainer
    config = node_dir(tmp_path / "config", 0)
    for key, value in build.build_configmap(job, run_id, settings)["data"].items():
        (config / key).write_text(value)
    uid = pod["securityContext"]["fsGroup"]
    volumes = {"config": config, "work": node_dir(tmp_path / "work", uid)}
    volumes["tmp"] = node_dir(tmp_path / "tmp", uid)
    out = node_dir(tmp_path / "out", uid)
    termination = tmp_path / "termination-log"
    argv = built.runtime.container_argv(
        built.trainer,
        container,
        pod,
        volumes,
        network="none",
        extra_mounts={
            "/models": (node_dir(tmp_path / "models", uid, copy_of=tiny_model), True),
            "/data": (node_dir(tmp_path / "data", uid, copy_of=task_file), True),
            "/out": (out, False),
        },
        termination_log=termination,
    )
    assert "--read-only" in argv and "--user" in argv
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]

    result = TrainerResult.model_validate_json(termination.read_text())
    assert (result.run_id, result.outcome, result.steps) == (run_id, "Succeeded", 8)
    assert result.warnings == []  # no tracker dropped
    run = out / "in-image" / "runs" / run_id
    manifest = json.loads((run / "manifest.json").read_text())
    paths = {f["path"] for f in manifest["files"]}
    assert paths >= {"adapter/adapter_config.json", "report.md"}
    assert any(p.endswith(f"/run-in-image-{run_id}.wandb") for p in paths), sorted(paths)
    for entry in manifest["files"]:
        data = (run / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
    assert json.loads((out / "in-image" / "latest.json").read_text())["runId"] == run_id
    # It ran as the pod's user: what it wrote is uid 1000's.
    assert (run / "manifest.json").stat().st_uid == uid


def test_trainer_image_cannot_write_outside_its_volumes(built: Built) -> None:
    """With the pod's read-only root and none of its volumes, nothing is writable: Python finds
    no temporary directory, and the image's own folders refuse a write (only the pod's
    volumes, /work, /tmp and /dev/shm, make room)."""
    probe = (
        "import errno, tempfile\n"
        "for d in ('/work', '/tmp', '/var/tmp', '/run/lock', '/opt/kubetune'):\n"
        "    try: open(d + '/x', 'w')\n"
        "    except OSError as e: print(d, errno.errorcode[e.errno])\n"
        "tempfile.mkdtemp()\n"
    )
    done = subprocess.run(
        [*built.runtime.base(), "--read-only", *_no_tmpfs(built.runtime), "--user", "1000:1000",
         "--network", "none", "--entrypoint", "python", built.trainer, "-c", probe],
        capture_output=True, text=True,
    )  # fmt: skip
    refused = dict(line.split() for line in done.stdout.splitlines())
    assert refused == dict.fromkeys(
        ["/work", "/tmp", "/var/tmp", "/run/lock", "/opt/kubetune"], "EROFS"
    ), done.stdout + done.stderr
    assert done.returncode != 0 and "No usable temporary directory" in done.stderr


def _no_tmpfs(runtime: Runtime) -> list[str]:
    return ["--read-only-tmpfs=false"] if runtime.engine == "podman" else []


def test_operator_image_runs_the_operator_as_the_chart_deploys_it(
    built: Built, tmp_path: Path
) -> None:
    """The chart installed on a control plane of its own; the operator's image run with the
    Deployment's container and pod spec as the API server stores them, and the chart's
    ServiceAccount identity."""
    with installed(tmp_path, namespaces=["team-a"]) as plane:
        api = plane.client()
        deployment = plane.request(
            "GET", f"/apis/apps/v1/namespaces/{SYSTEM}/deployments/{RELEASE}"
        )
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert "command" not in container  # the image's ENTRYPOINT runs, with the chart's args
        volumes = {v["name"]: node_dir(tmp_path / v["name"], 1000) for v in pod["volumes"]}
        node = NodeAgent(plane.node_client(), tmp_path / "node", fake_seconds=3).start()
        operator = chart_operator(plane, tmp_path)
        readable = tmp_path / "kubeconfig-for-uid-1000"  # the container runs as uid 1000
        readable.write_bytes(operator.kubeconfig.read_bytes())
        readable.chmod(0o644)

        def in_image(settings: dict[str, str]) -> list[str]:
            env = {**settings, "KUBECONFIG": "/etc/kubetune-test/kubeconfig"}
            spec = {**container, "env": [{"name": k, "value": v} for k, v in env.items()]}
            return built.runtime.container_argv(
                built.operator,
                spec,
                pod,
                volumes,
                network="host",  # the API server listens on this machine's 127.0.0.1
                extra_mounts={"/etc/kubetune-test/kubeconfig": (readable, True)},
            )

        operator.container = in_image
        operator.start()
        try:
            api.create("finetunejobs", "team-a", minimal_job("sql"))
            phases = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and "Succeeded" not in phases:
                assert operator.alive(), operator.log.read_text()[-3000:]
                phase = (api.get("finetunejobs", "team-a", "sql").get("status") or {}).get("phase")
                if phase and (not phases or phases[-1] != phase):
                    phases.append(phase)
                time.sleep(0.2)
            assert "Running" in phases and phases[-1] == "Succeeded", (
                phases,
                operator.log.read_text()[-3000:],
            )
            metrics = _get(f"http://127.0.0.1:{operator.metrics_port}/metrics")
            assert (
                'kubetune_operator_finetunejobs{namespace="team-a",phase="Succeeded"} 1.0'
                in metrics
            )
        finally:
            operator.stop()
            node.stop()
    assert not node.errors, node.errors


def _get(url: str) -> str:
    from urllib.request import urlopen

    return urlopen(url, timeout=5).read().decode()


def test_images_hold_what_pyproject_asks_for(built: Built) -> None:
    for image in (built.operator, built.trainer):
        done = built.runtime.shell(image, "pip check")
        assert done.returncode == 0, done.stdout + done.stderr
    versions = built.runtime.shell(
        built.trainer,
        "python -c 'import torch, kubetune_trainer; print(torch.__version__)'",
    )
    release, _, build = versions.stdout.strip().partition("+")
    assert release == images.torch_pin().split("==")[1], versions.stdout + versions.stderr
    # The CPU wheel where it can be had; else PyPI's CUDA build (hack/images.py, install.md).
    listed = built.runtime.shell(built.trainer, "pip list --format json")
    cuda = any(p["name"].lower().startswith("nvidia-") for p in json.loads(listed.stdout))
    assert build.startswith("cu") if cuda else build == "cpu", versions.stdout
    # The operator image has no training stack: no torch, nothing from the trainer extra.
    listed = built.runtime.shell(built.operator, "pip list --format json")
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "kopf" in names and "kubetune" in names
    assert not names & {"torch", "transformers", "peft", "bitsandbytes"}


def budgets() -> dict[str, float]:
    """The size budget (MB) per image, from the table in docs/install.md."""
    text = (ROOT / "docs" / "install.md").read_text()
    rows = re.findall(r"^\| `(\w+)` image \(([^)]*)\) \| [^|]* \| ([\d.]+) MB \|", text, re.M)
    return {f"{name}/{variant}": float(budget) for name, variant, budget in rows}


def test_image_sizes_are_within_the_documented_budget(built: Built) -> None:
    limits = budgets()
    assert set(limits) >= {"operator/any base", "trainer/cpu"}, limits
    operator_mb = built.row("operator")["bytes"] / 1e6
    trainer_mb = built.row("trainer")["bytes"] / 1e6
    assert operator_mb <= limits["operator/any base"], operator_mb
    # Where PyTorch's CPU wheel cannot be had, the CPU image carries PyPI's CUDA build of torch
    # (hack/images.py says so when it builds): its own, larger budget.
    listed = built.runtime.shell(built.trainer, "pip list --format json")
    cuda = any(p["name"].lower().startswith("nvidia-") for p in json.loads(listed.stdout))
    variant = "trainer/cpu, PyPI's torch" if cuda else "trainer/cpu"
    assert trainer_mb <= limits[variant], (variant, trainer_mb)


def test_a_code_change_rebuilds_only_the_code_layers(built: Built, tmp_path: Path) -> None:
    """Dependencies are installed from pyproject.toml before the code is copied: touching one .py
    file reuses every dependency layer (the same layer digests) and re-ships only the code."""
    context = images.copy_context(tmp_path / "context")
    touched = context / "operator" / "kubetune" / "api" / "__init__.py"
    touched.write_text(touched.read_text() + "\n# a code change\n")
    report = tmp_path / "report.json"
    done = build_images(report=report, context=context, tag="test-rebuilt")
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    rebuilt = {r["name"]: r for r in json.loads(report.read_text())}
    for name, tag in (("operator", built.operator), ("trainer", built.trainer)):
        before, after = layers(built.runtime, tag), layers(built.runtime, rebuilt[name]["tag"])
        # pip install --no-deps . and the three COPY layers of the code; nothing else
        assert len(before) == len(after) and before[:-4] == after[:-4], name
        assert before[-1] != after[-1], name
        print(f"{name}: rebuilt in {rebuilt[name]['seconds']} s after a .py change")
