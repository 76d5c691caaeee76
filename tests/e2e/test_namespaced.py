"""An operator installed for some namespaces only (the chart's watchNamespaces): Roles in those
namespaces instead of a ClusterRole, KUBETUNE_NAMESPACES from the chart, and the FineTuneJobs
elsewhere left alone. A control plane of its own (the session's operator watches every
namespace), the node agent's fast fake trainer."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.conftest import wait_for
from tests.support.node import NodeAgent
from tests.support.platform import chart_operator, installed
from tests.support.specs import minimal_job

WATCHED = ["team-a", "team-b"]


def test_only_the_watched_namespaces_are_reconciled(tmp_path: Path) -> None:
    values = ["--set-json", f"watchNamespaces={json.dumps(WATCHED)}"]
    with installed(tmp_path, values, [*WATCHED, "elsewhere"]) as plane:
        api = plane.client()
        roles = api.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles")["items"]
        assert "kubetune" not in {r["metadata"]["name"] for r in roles}  # Roles instead:
        for namespace in WATCHED:
            path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"
            assert "kubetune" in {r["metadata"]["name"] for r in api.request("GET", path)["items"]}
        node = NodeAgent(plane.node_client(), tmp_path / "node", fake_seconds=0.5).start()
        operator = chart_operator(plane, tmp_path)
        assert json.loads(operator.base["KUBETUNE_NAMESPACES"]) == WATCHED
        operator.start()
        try:
            for namespace in (*WATCHED, "elsewhere"):
                api.create("finetunejobs", namespace, minimal_job("sql"))

            def phases() -> dict[str, str | None]:
                return {
                    ns: (api.get("finetunejobs", ns, "sql").get("status") or {}).get("phase")
                    for ns in (*WATCHED, "elsewhere")
                }

            wait_for(
                "the watched namespaces' runs to succeed",
                lambda: phases()["team-a"] == phases()["team-b"] == "Succeeded",
                timeout=90,
            )
            assert operator.alive(), operator.log.read_text()[-3000:]
            assert api.get("finetunejobs", "elsewhere", "sql").get("status") is None
            assert api.list("jobs", "elsewhere") == []
            assert "forbidden" not in operator.log.read_text().lower()
        finally:
            operator.stop()
            node.stop()
    assert not node.errors, node.errors
