"""The two Dockerfiles: hadolint-clean, and consistent with the packaging and the pod specs.
tests/images builds and runs them; these are the checks that need no builder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from kubetune.api import FineTuneJob
from kubetune.cli import build_parser
from kubetune.controller import build
from kubetune.controller.settings import OperatorSettings
from tests.conftest import ROOT, valid_job

DOCKERFILES = {
    "operator": ROOT / "operator" / "Dockerfile",
    "trainer": ROOT / "trainer-image" / "Dockerfile",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def exec_form(path: Path, keyword: str) -> list[str]:
    (value,) = [rest for kw, rest in instructions(path) if kw == keyword]
    return json.loads(value)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_is_clean(image: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("image", DOCKERFILES)
def test_copied_files_exist_and_user_is_non_root(image: str) -> None:
    path = DOCKERFILES[image]
    for keyword, rest in instructions(path):
        if keyword == "COPY":
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
    (user,) = [rest for kw, rest in instructions(path) if kw == "USER"]
    assert user == f"{build.RUN_AS}:{build.RUN_AS}"


def test_operator_image_runs_the_kubetune_operator_command() -> None:
    path = DOCKERFILES["operator"]
    (entrypoint,) = exec_form(path, "ENTRYPOINT")
    assert entrypoint in PYPROJECT["project"]["scripts"]
    command = exec_form(path, "CMD")
    args = build_parser().parse_args(command)
    assert args.command == "operator"
    exposed = {int(p) for kw, rest in instructions(path) if kw == "EXPOSE" for p in rest.split()}
    defaults = OperatorSettings()
    assert exposed == {defaults.metrics_port, defaults.health_port}
    assert _installs_extras(path) == ["operator"]


def test_trainer_image_runs_what_the_operator_puts_in_the_pod() -> None:
    path = DOCKERFILES["trainer"]
    entrypoint = exec_form(path, "ENTRYPOINT")
    doc = valid_job()
    doc["metadata"]["uid"] = "uid-1"
    job = build.build_job(FineTuneJob.model_validate(doc), "0123abcd", OperatorSettings())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["command"]  # what the operator runs in the trainer pod
    assert command[: len(entrypoint)] == entrypoint
    assert (ROOT / "trainer-image" / "kubetune_trainer" / "__main__.py").exists()
    exposed = {int(p) for kw, rest in instructions(path) if kw == "EXPOSE" for p in rest.split()}
    assert exposed == {OperatorSettings().trainer_metrics_port}
    (torch,) = re.findall(r"^ARG TORCH=torch==([\d.]+)$", path.read_text(), re.MULTILINE)
    (wanted,) = [
        d for d in PYPROJECT["project"]["optional-dependencies"]["trainer"] if d.startswith("torch")
    ]
    assert torch in SpecifierSet(wanted.removeprefix("torch"))
    assert _installs_extras(path) == ["trainer", "tracking"]


def _installs_extras(path: Path) -> list[str]:
    """The extras whose dependencies the image installs before its code (the layer a code
    change reuses), and the code itself installed with --no-deps after."""
    runs = [rest for kw, rest in instructions(path) if kw == "RUN"]
    (deps,) = [r for r in runs if "tomllib" in r]
    extras = re.findall(r'\["optional-dependencies"\]\["(\w+)"\]', deps)
    copies = [rest for kw, rest in instructions(path) if kw == "COPY"]
    assert copies[0] == "pyproject.toml ./"  # the dependencies' layer sees nothing else
    assert any("pip install --no-deps ." in r for r in runs)
    return extras
