"""hack/images.py's decisions, without building: which base, which torch, which tags, what the
build sees of this machine's pip configuration. (tests/images builds for real.)"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from hack import images


def _plan(monkeypatch: pytest.MonkeyPatch, *argv: str, online: bool) -> list[images.Image]:
    monkeypatch.setattr(images, "reachable", lambda url, timeout=5.0: online)
    monkeypatch.setattr(images, "local_base", lambda builder: images.LOCAL_BASE)
    return images.plan(images.parser().parse_args(list(argv)), "buildah")


def test_online_the_dockerfiles_defaults_build_the_release(monkeypatch: pytest.MonkeyPatch) -> None:
    operator, trainer = _plan(monkeypatch, online=True)
    version = images.version()
    assert operator.tag == f"ghcr.io/kubetune/operator:{version}" and operator.build_args == {}
    assert trainer.tag == f"ghcr.io/kubetune/trainer:{version}"
    assert trainer.build_args == {
        "TORCH": images.torch_pin(),
        "TORCH_INDEX": "https://download.pytorch.org/whl/cu128",
    }


def test_the_cpu_variant_is_tagged_and_takes_cpu_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _, trainer = _plan(
        monkeypatch, "--trainer-variant", "cpu", "--registry", "r.example/k", "--tag", "7",
        online=True,
    )  # fmt: skip
    assert trainer.tag == "r.example/k/trainer:7-cpu"
    assert trainer.build_args["TORCH"] == images.torch_pin() + "+cpu"
    assert trainer.build_args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert trainer.build_args["BASE_IMAGE"].startswith("python:3.11")


def test_offline_cpu_builds_on_the_local_debian_base_with_pips_own_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator, trainer = _plan(monkeypatch, "--trainer-variant", "cpu", online=False)
    assert operator.build_args == {"BASE_IMAGE": images.LOCAL_BASE}
    assert trainer.build_args["BASE_IMAGE"] == images.LOCAL_BASE
    assert trainer.build_args["TORCH_INDEX"] == ""  # the Dockerfile then adds no --index-url


@pytest.mark.parametrize(
    ("wheelhouse", "torch"),
    [
        pytest.param(True, "+cpu", id="a-local-cpu-wheel"),
        pytest.param(False, "", id="none-pypis-build"),
    ],
)
def test_offline_cpu_torch_is_the_cpu_wheel_only_where_one_can_be_had(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wheelhouse: bool, torch: str
) -> None:
    """PyTorch's CPU index unreachable: the +cpu wheel from a wheelhouse pip is configured
    with, else PyPI's torch (the CUDA build, which runs on the CPU), not a +cpu pin pip cannot
    find (which failed the image build)."""
    if wheelhouse:
        (
            tmp_path / f"torch-{images.torch_pin().split('==')[1]}+cpu-cp311-cp311-linux_x86_64.whl"
        ).touch()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    _, trainer = _plan(monkeypatch, "--trainer-variant", "cpu", online=False)
    assert trainer.build_args["TORCH"] == images.torch_pin() + torch


def test_offline_cuda_says_what_to_do_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match="make images TRAINER_VARIANT=cpu"):
        _plan(monkeypatch, online=False)
    (operator,) = _plan(monkeypatch, "--only", "operator", online=False)
    assert operator.name == "operator"


def test_no_builder_names_both_ways_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "docker_engine", lambda: False)
    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match=r"Docker engine .* or buildah"):
        images.pick_builder("auto")


def test_the_build_sees_this_machines_pip_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    listed = (
        f"global.find-links='{wheels}'\n"
        f"global.extra-index-url='file://{index} https://mirror.example/simple'\n"
        f"global.constraint='{constraints}'\n"
    )

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[1:] == ["-m", "pip", "config", "list"]
        return subprocess.CompletedProcess(argv, 0, listed, "")

    monkeypatch.setattr(images.subprocess, "run", fake_run)
    for key in [k for k in images.os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    volumes = images.host_pip_config(tmp_path)
    conf = (tmp_path / "pip.conf").read_text()
    assert f"find-links = {wheels}" in conf and f"constraint = {constraints}" in conf
    assert volumes[0] == f"{tmp_path / 'pip.conf'}:/etc/pip.conf:ro"
    # each local path at the same path inside, read-only; a file index by its parent (its pages
    # link to files beside it); a remote URL is not a mount
    assert set(volumes[1:]) == {
        f"{wheels}:{wheels}:ro",
        f"{index.parent}:{index.parent}:ro",
        f"{constraints}:{constraints}:ro",
    }
