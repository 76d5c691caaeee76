"""Builds the two kubetune images: `make images` runs this. Standard library only: it runs with
the machine's python3, before any virtual environment exists.

    python3 hack/images.py [--trainer-variant cuda|cpu] [--registry R] [--tag T] [--only NAME]

Builder: docker when a Docker engine answers (`docker info`), else buildah (daemonless; here,
`buildah bud --layers --isolation chroot`). The Dockerfiles take the base image as a build
argument; their defaults come from Docker Hub (python:*-slim, nvidia/cuda). Where Docker Hub
cannot be reached and the builder is buildah, the operator and the CPU trainer build on a local
Debian base that `mmdebstrap` makes from Debian's packages (made once, kept as
localhost/kubetune-base:bookworm). The CUDA trainer needs nvidia/cuda and PyTorch's CUDA index.

With buildah, the RUN steps see this machine's pip configuration (`pip config list`, written to
/etc/pip.conf for the build only, with the local paths it names mounted read-only), so pip inside
the build reaches the same indexes and wheelhouses as pip here. Nothing of it enters a layer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BASE = "localhost/kubetune-base:bookworm"
# What the local base holds: Python 3.11 with venv (the python:3.11-slim image's Python), and CA
# certificates; documentation and translations left out, as the slim images do.
MMDEBSTRAP = [
    "mmdebstrap",
    "--variant=apt",
    "--include=python3,python3-venv,ca-certificates",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "bookworm",
]
DOCKER_HUB = "https://registry-1.docker.io/v2/"
TORCH_INDEX = {
    "cuda": "https://download.pytorch.org/whl/cu128",
    "cpu": "https://download.pytorch.org/whl/cpu",
}


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def torch_pin() -> str:
    """The torch release the images install: the trainer Dockerfile's default TORCH argument."""
    text = (ROOT / "trainer-image" / "Dockerfile").read_text()
    match = re.search(r"^ARG TORCH=(torch==[\w.+]+)$", text, re.MULTILINE)
    if match is None:
        raise SystemExit("trainer-image/Dockerfile: no `ARG TORCH=torch==X` line")
    return match.group(1)


@dataclass
class Image:
    name: str  # operator | trainer
    dockerfile: Path  # relative to the build context
    tag: str
    build_args: dict[str, str] = field(default_factory=dict)


def reachable(url: str, timeout: float = 5.0) -> bool:
    """An HTTP answer of any status counts: the registry or index is there."""
    try:
        urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    print("+", " ".join(argv), flush=True)
    return subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(["docker", "info"], capture_output=True)
    return done.returncode == 0


def pick_builder(wanted: str) -> str:
    if wanted == "auto":
        if docker_engine():
            return "docker"
        if shutil.which("buildah"):
            return "buildah"
        raise SystemExit(
            "make images needs a Docker engine (`docker info` must answer) or buildah "
            "(Debian/Ubuntu: apt-get install buildah; Fedora: dnf install buildah)"
        )
    if wanted == "docker" and not docker_engine():
        raise SystemExit("--builder docker: no Docker engine answers `docker info`")
    if wanted == "buildah" and shutil.which("buildah") is None:
        raise SystemExit("--builder buildah: buildah is not installed (apt-get install buildah)")
    return wanted


def image_exists(builder: str, ref: str) -> bool:
    cmd = (
        ["docker", "image", "inspect", ref] if builder == "docker" else ["buildah", "inspect", ref]
    )
    return subprocess.run(cmd, capture_output=True).returncode == 0


def local_base(builder: str) -> str:
    """localhost/kubetune-base:bookworm, made once with mmdebstrap and imported."""
    if image_exists(builder, LOCAL_BASE):
        return LOCAL_BASE
    if shutil.which("mmdebstrap") is None:
        raise SystemExit(
            "Docker Hub cannot be reached and there is no local base image: install mmdebstrap "
            "(apt-get install mmdebstrap) to make one from Debian's packages, or pass "
            "--base-image with an image you have"
        )
    with tempfile.TemporaryDirectory(prefix="kubetune-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        run([*MMDEBSTRAP, str(tar)])
        if builder == "docker":
            run(["docker", "import", str(tar), LOCAL_BASE])
        else:
            # buildah has no import; podman shares its storage.
            run(["podman", "import", str(tar), LOCAL_BASE])
    return LOCAL_BASE


# What the Dockerfiles COPY (and .dockerignore lets through), for a build from a copy.
CONTEXT_FILES = ("pyproject.toml", "README.md", ".dockerignore")
CONTEXT_TREES = ("operator", "trainer-image")


def copy_context(dest: Path) -> Path:
    """A copy of the build context (to change a file and rebuild without touching the repo)."""
    dest.mkdir(parents=True)
    for name in CONTEXT_FILES:
        shutil.copy(ROOT / name, dest / name)
    for tree in CONTEXT_TREES:
        shutil.copytree(ROOT / tree, dest / tree, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def host_pip_config(workdir: Path) -> list[str]:
    """buildah --volume arguments that give the build this machine's pip configuration."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    settings: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        name = key.rsplit(".", 1)[-1]
        settings[name] = value.strip().strip("'\"")
    # The environment's PIP_* settings count too (pip config list shows only some of them).
    for key, value in os.environ.items():
        if key.startswith("PIP_") and key not in ("PIP_CONFIG_FILE",):
            settings[key.removeprefix("PIP_").lower().replace("_", "-")] = value
    if not settings:
        return []
    conf = workdir / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    volumes = [f"{conf}:/etc/pip.conf:ro"]
    seen: set[Path] = set()
    for value in settings.values():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if path.name == "simple" and path.is_dir():
                path = path.parent  # a file index: its pages link to files beside it
            if path.is_absolute() and path.exists() and path not in seen:
                # A wheelhouse or index folder, or a constraints file: the same path inside.
                if any(path.is_relative_to(s) for s in seen):
                    continue
                seen.add(path)
                volumes.append(f"{path}:{path}:ro")
    return volumes


def build(builder: str, image: Image, context: Path, volumes: list[str]) -> float:
    args = [a for k, v in image.build_args.items() for a in ("--build-arg", f"{k}={v}")]
    if builder == "docker":
        argv = ["docker", "build", "-f", str(image.dockerfile), *args, "-t", image.tag, "."]
    else:
        argv = ["buildah", "bud", "--layers", "--isolation", "chroot", "-f", str(image.dockerfile)]
        argv += [a for v in volumes for a in ("--volume", v)]
        argv += [*args, "-t", image.tag, "."]
    started = time.monotonic()
    run(argv, cwd=context)
    return time.monotonic() - started


def size_bytes(builder: str, ref: str) -> int:
    """The image's size unpacked, as `docker images` shows it."""
    if builder == "docker":
        out = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Size}}", ref],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(out)
    out = subprocess.run(
        ["podman", "image", "inspect", ref], check=True, capture_output=True, text=True
    ).stdout
    return int(json.loads(out)[0]["Size"])


def local_wheel(requirement: str) -> bool:
    """Whether pip's configured wheelhouses (find-links) hold the wheel `torch==X+cpu` names."""
    name, _, wanted = requirement.partition("==")
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    places = [os.environ.get("PIP_FIND_LINKS", "")]
    places += re.findall(r"find-links='([^']*)'", listed)
    for place in " ".join(places).split():
        if Path(place).is_dir() and any(Path(place).glob(f"{name}-{wanted}-*.whl")):
            return True
    return False


def plan(args: argparse.Namespace, builder: str) -> list[Image]:
    tag = args.tag or version()
    operator_base = args.base_image
    trainer_base = args.base_image
    torch_index = TORCH_INDEX[args.trainer_variant]
    wants_operator = args.only in (None, "operator")
    wants_trainer = args.only in (None, "trainer")
    if args.base_image is None and not reachable(DOCKER_HUB):
        if args.trainer_variant == "cuda" and wants_trainer:
            raise SystemExit(
                "the CUDA trainer image builds on nvidia/cuda from Docker Hub, which cannot be "
                "reached from here; build the CPU variant: make images TRAINER_VARIANT=cpu"
            )
        print(f"Docker Hub cannot be reached: building on {LOCAL_BASE} (mmdebstrap)", flush=True)
        operator_base = trainer_base = local_base(builder)
    torch = torch_pin()
    if args.trainer_variant == "cpu":
        if trainer_base is None:
            trainer_base = "python:3.11.14-slim-bookworm"
        cpu = torch + "+cpu"
        if not wants_trainer or reachable(torch_index) or local_wheel(cpu):
            torch = cpu
        else:
            # PyPI's Linux wheel of torch is the CUDA build: it runs on the CPU too, with the
            # CUDA libraries (nvidia-*, triton: about 3.4 GB) beside it (docs/install.md).
            print(
                f"neither {torch_index} nor a local wheelhouse has {cpu}: the CPU trainer "
                f"installs PyPI's {torch} (the CUDA build, which runs on the CPU too)",
                flush=True,
            )
    if wants_trainer and not reachable(torch_index):
        print(
            f"{torch_index} cannot be reached: {torch} must come from pip's own configuration",
            flush=True,
        )
        torch_index = ""
    images = []
    if wants_operator:
        build_args = {"BASE_IMAGE": operator_base} if operator_base else {}
        images.append(
            Image(
                "operator",
                Path("operator/Dockerfile"),
                f"{args.registry}/operator:{tag}",
                build_args,
            )
        )
    if wants_trainer:
        suffix = "-cpu" if args.trainer_variant == "cpu" else ""
        build_args = {"TORCH": torch, "TORCH_INDEX": torch_index}
        if trainer_base:
            build_args["BASE_IMAGE"] = trainer_base
        images.append(
            Image(
                "trainer",
                Path("trainer-image/Dockerfile"),
                f"{args.registry}/trainer:{tag}{suffix}",
                build_args,
            )
        )
    return images


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hack/images.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer-variant", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--registry", default="ghcr.io/kubetune", help="image names' prefix")
    p.add_argument("--tag", help="default: the project's version (the chart's appVersion)")
    p.add_argument("--only", choices=["operator", "trainer"], help="build just one image")
    p.add_argument("--builder", choices=["auto", "docker", "buildah"], default="auto")
    p.add_argument("--base-image", help="the base image of both (default: the Dockerfiles')")
    p.add_argument(
        "--context", type=Path, default=ROOT, help="the build context (default: the repository)"
    )
    p.add_argument(
        "--no-host-pip-config",
        action="store_true",
        help="buildah: do not give the build this machine's pip configuration",
    )
    p.add_argument("--report", type=Path, help="write the tags, sizes and build times as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    builder = pick_builder(args.builder)
    images = plan(args, builder)
    report = []
    with tempfile.TemporaryDirectory(prefix="kubetune-images-") as tmp:
        volumes = (
            [] if builder == "docker" or args.no_host_pip_config else host_pip_config(Path(tmp))
        )
        for image in images:
            seconds = build(builder, image, args.context, volumes)
            report.append(
                {
                    "name": image.name,
                    "tag": image.tag,
                    "builder": builder,
                    "seconds": round(seconds, 1),
                    "bytes": size_bytes(builder, image.tag),
                }
            )
    for row in report:
        print(f"{row['tag']}: {row['bytes'] / 1e6:.0f} MB, built in {row['seconds']:.0f} s")
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
