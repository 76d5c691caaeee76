"""A real Prometheus server for tests (Debian's `prometheus` package) on 127.0.0.1, scraping
static targets and a file of targets the test rewrites as pods come and go."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, workdir: Path, static: dict[str, str], interval: str = "1s") -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(
                "prometheus is not installed: `make test` installs Debian's package "
                "(apt-get install prometheus)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.targets = workdir / "targets.json"
        self.targets.write_text("[]")
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                *(
                    {"job_name": job, "static_configs": [{"targets": [target]}]}
                    for job, target in static.items()
                ),
                {
                    "job_name": "trainers",
                    "file_sd_configs": [{"files": [str(self.targets)], "refresh_interval": "1s"}],
                },
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus did not start: {self.log.read_text()[-2000:]}")

    def set_targets(self, targets: dict[str, dict[str, str]]) -> None:
        """target address -> labels, for the `trainers` job."""
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [t], "labels": lb} for t, lb in targets.items()]))
        tmp.replace(self.targets)  # atomic: Prometheus never reads half a file

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
