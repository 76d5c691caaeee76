"""The images, built for real (hack/images.py, as `make images` runs it) and run with a real
container runtime (tests/support/images.py). Marked `images`: `make test` installs buildah and
podman and runs them; elsewhere they run when docker or buildah is there, and are skipped with
the reason otherwise, unless KUBETUNE_IMAGES=required (set by `make test`) makes that a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.images import Runtime

REGISTRY = "localhost/kubetune-test"
TAG = "test"


@dataclass
class Built:
    operator: str
    trainer: str
    report: list[dict]
    runtime: Runtime

    def row(self, name: str) -> dict:
        return next(r for r in self.report if r["name"] == name)


def builder_available() -> bool:
    docker = (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    )
    return bool(docker or shutil.which("buildah"))


def build(
    *args: str, report: Path, context: Path = ROOT, tag: str = TAG
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, str(ROOT / "hack" / "images.py"), "--trainer-variant", "cpu",
        "--registry", REGISTRY, "--tag", tag, "--context", str(context), "--report", str(report),
        *args,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if not builder_available():
        if os.environ.get("KUBETUNE_IMAGES") == "required":
            pytest.fail("KUBETUNE_IMAGES=required but neither a Docker engine nor buildah is here")
        pytest.skip("no image builder here: install buildah (make sysdeps) or run a Docker engine")
    workdir = tmp_path_factory.mktemp("images")
    report = workdir / "report.json"
    done = build(report=report)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    rows = json.loads(report.read_text())
    tags = {r["name"]: r["tag"] for r in rows}
    runtime = Runtime.detect(workdir, tags["operator"])
    yield Built(tags["operator"], tags["trainer"], rows, runtime)
