"""KUBETUNE_NAMESPACES: an operator watching a list of namespaces leaves the others alone.
(A separate emulated cluster and operator, and the fast fake trainer of the test node.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.integration.conftest import OperatorProcess
from tests.support.cluster import Client, running_cluster
from tests.support.kubelet import Kubelet
from tests.support.specs import minimal_job


def test_only_the_watched_namespaces_are_reconciled(tmp_path: Path) -> None:
    with running_cluster() as cluster:
        api = Client(cluster.url)
        kubelet = Kubelet(cluster.url, tmp_path / "node", fake_seconds=0.5).start()
        operator = OperatorProcess(cluster.kubeconfig(tmp_path / "kubeconfig"), tmp_path / "log")
        operator.extra_env = {"KUBETUNE_NAMESPACES": json.dumps(["team-a", "team-b"])}
        operator.start()
        try:
            for namespace in ("team-a", "team-b", "elsewhere"):
                api.create("finetunejobs", namespace, minimal_job("sql"))
            deadline = time.monotonic() + 60
            phases: dict[str, str | None] = {}
            while time.monotonic() < deadline:
                phases = {
                    ns: (api.get("finetunejobs", ns, "sql").get("status") or {}).get("phase")
                    for ns in ("team-a", "team-b", "elsewhere")
                }
                if phases["team-a"] == phases["team-b"] == "Succeeded":
                    break
                time.sleep(0.2)
            assert phases["team-a"] == phases["team-b"] == "Succeeded", (
                phases,
                operator.log.read_text()[-3000:],
            )
            time.sleep(1)
            assert api.get("finetunejobs", "elsewhere", "sql").get("status") is None
            assert api.list("jobs", "elsewhere") == []
        finally:
            operator.stop()
            kubelet.stop()
