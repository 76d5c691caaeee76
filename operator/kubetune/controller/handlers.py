"""The kopf wiring: kopf runs the process (credentials, liveness endpoint, start-up, clean-up,
signals); the operator's own runtime (runtime.py) does the watching and reconciling.

kopf's resource handlers are not used: after a 410 Gone kopf lists again without telling its
handlers or indexes which objects vanished meanwhile (benchmarks/kopf_relist.py, measured with
kopf itself: the vanished FineTuneJob stays in its index and no handler hears of it), and it
writes its own annotations onto every object it handles. The runtime's informers (cache.py)
replace their store on a relist instead, as client-go's do. So kopf watches nothing and writes
nothing on FineTuneJobs (no finalizer, no annotations): children carry controller
ownerReferences, and deleting a FineTuneJob lets the garbage collector delete its ConfigMap, Job
and pods.

With `KUBETUNE_LEADER_ELECTION=true` (the chart's default, with two replicas) the runtime
reconciles only while this replica holds the Lease (leader.py); the liveness endpoint reports
whether the caches are synced and whether this replica leads.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from kubetune.controller.finetunejob_controller import FineTuneJobController
from kubetune.controller.kube import Kube, load_client
from kubetune.controller.leader import elect
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.runtime import Runtime
from kubetune.controller.schedule_controller import ScheduleController
from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")


def build_registry(
    operator_settings: OperatorSettings,
    kube: Kube,
    metrics: OperatorMetrics,
    client: Any = None,
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    runtime = Runtime(kube, operator_settings, metrics, [FineTuneJobController, ScheduleController])

    @kopf.on.startup(registry=registry)
    def start(settings: kopf.OperatorSettings, **_: Any) -> None:  # kopf's own settings
        settings.posting.enabled = False
        settings.scanning.disabled = True  # kopf watches nothing: no CRD or namespace scans
        runtime.start()
        if operator_settings.leader_election:
            elect(client, operator_settings, runtime.lead, _lost)
        else:
            runtime.lead()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.probe(id="runtime", registry=registry)
    def probe(**_: Any) -> dict[str, Any]:
        return runtime.stats()

    @kopf.on.cleanup(registry=registry)
    def stop(**_: Any) -> None:
        runtime.stop()

    return registry


def _lost() -> None:
    # Another replica may lead by now: stop writing at once (controller-runtime exits too).
    log.error("lost the leader election Lease; exiting")
    logging.shutdown()
    os._exit(1)


def run(settings: OperatorSettings) -> None:
    """Run the operator until interrupted (the `kubetune operator` command)."""
    metrics = OperatorMetrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.bind_address)
    client = load_client()
    kube = Kube(client, metrics)
    registry = build_registry(settings, kube, metrics, client)
    namespaces = settings.namespaces
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,  # leader election is the Lease's (leader.py), not kopf's peering
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=f"http://{settings.bind_address}:{settings.health_port}/healthz"
            if settings.health_port
            else None,
        )
    )
