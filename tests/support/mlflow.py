"""A real MLflow tracking server for tests: `mlflow server` on 127.0.0.1 with a SQLite backend
store and proxied artifacts (the default of `mlflow server`: clients upload files through it),
its data in a temporary directory.

The server (the full `mlflow` distribution, ~50 packages with scikit-learn and pyarrow) lives in
its own virtual environment under .cache/tools, created once with pip from the project's own
registry; the trainer itself needs only the client, mlflow-skinny, from its extra.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.support.s3 import _free_ports
from tests.support.tools import TOOLS

# The server's version matches the client's (pyproject.toml's mlflow-skinny).
SERVER = "mlflow==3.17.2"


def server_python() -> Path:
    """The tool environment's python, with `mlflow` installed (created once)."""
    venv = TOOLS / f"mlflow-{SERVER.split('==')[1]}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", SERVER],
        check=True,
    )
    stamp.touch()
    return python


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start(workdir: Path, timeout: float = 120.0) -> MlflowServer:
    python = server_python()
    workdir.mkdir(parents=True, exist_ok=True)
    (port,) = _free_ports(1)
    log = workdir / "mlflow.log"
    args = [
        str(python),
        "-m",
        "mlflow",
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--backend-store-uri=sqlite:///{workdir / 'mlflow.db'}",
        f"--artifacts-destination={workdir / 'artifacts'}",
        "--workers=1",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return MlflowServer(uri, process, log)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"mlflow server not ready in {timeout} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)
