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
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack import images
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
    return images.docker_engine() or shutil.which("buildah") is not None


def build_argv(*args: str, report: Path, context: Path = ROOT, tag: str = TAG) -> list[str]:
    return [
        sys.executable, str(ROOT / "hack" / "images.py"), "--trainer-variant", "cpu",
        "--registry", REGISTRY, "--tag", tag, "--context", str(context), "--report", str(report),
        *args,
    ]  # fmt: skip


def build(
    *args: str, report: Path, context: Path = ROOT, tag: str = TAG
) -> subprocess.CompletedProcess[str]:
    argv = build_argv(*args, report=report, context=context, tag=tag)
    return subprocess.run(argv, capture_output=True, text=True)


class Background:
    """The build, started when collection ends (tests/conftest.py) so that it runs beside the
    rest of the suite; the image tests, ordered last, wait for it."""

    process: subprocess.Popen[bytes] | None = None
    report: Path | None = None
    log: Path | None = None

    @classmethod
    def start(cls) -> None:
        if cls.process is not None or not builder_available():
            return
        workdir = Path(tempfile.mkdtemp(prefix="kubetune-images-"))
        cls.report, cls.log = workdir / "report.json", workdir / "build.log"
        with cls.log.open("wb") as out:
            cls.process = subprocess.Popen(
                build_argv(report=cls.report), stdout=out, stderr=subprocess.STDOUT
            )

    @classmethod
    def stop(cls) -> None:
        if cls.process is not None and cls.process.poll() is None:
            cls.process.terminate()
            cls.process.wait(60)
        if cls.log is not None:
            shutil.rmtree(cls.log.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if not builder_available():
        if os.environ.get("KUBETUNE_IMAGES") == "required":
            pytest.fail("KUBETUNE_IMAGES=required but neither a Docker engine nor buildah is here")
        pytest.skip("no image builder here: install buildah (make sysdeps) or run a Docker engine")
    Background.start()  # a no-op when collection already started it
    assert Background.process is not None and Background.report and Background.log
    code = Background.process.wait()
    assert code == 0, Background.log.read_text(errors="replace")[-6000:]
    rows = json.loads(Background.report.read_text())
    tags = {r["name"]: r["tag"] for r in rows}
    runtime = Runtime.detect(tmp_path_factory.mktemp("runtime"), tags["operator"])
    yield Built(tags["operator"], tags["trainer"], rows, runtime)
