"""Leader election on a coordination.k8s.io/v1 Lease, with the kubernetes client's own elector
(kubernetes.leaderelection, a port of client-go's): the replica that holds the Lease reconciles;
the others keep their caches warm and try every `retry_period_seconds`; one takes over once the
Lease has not been renewed for `lease_duration_seconds`. Updates are PUTs carrying the Lease's
resourceVersion, so of two standbys racing for an expired Lease only one wins (the other gets a
409). A leader that cannot renew within `renew_deadline_seconds` exits the process at once, as
controller-runtime's manager does ("leader election lost"): a replica that might no longer be
the leader must not write.

Why a Lease and not kopf's peering: kopf's peering pauses operators of a lower priority while one
of a higher priority is alive, but replicas of one Deployment share a priority, and then kopf
lets all of them run (it only warns); it also needs its own cluster-wide CRD. A Lease is what
Kubernetes' own controllers, controller-runtime (Kueue, KubeRay, Kubeflow Trainer) and client-go
use, and `kubectl get lease` shows who leads.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable

import kubernetes
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from kubetune.controller.settings import OperatorSettings

log = logging.getLogger("kubetune.operator")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def lease_namespace(settings: OperatorSettings) -> str:
    if settings.leader_election_namespace:
        return settings.leader_election_namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return "default"


def identity() -> str:
    """The pod's name (HOSTNAME in a pod) and a random suffix, as client-go's id_uuid does."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _lead(me: str, lock: LeaseLock, on_started: Callable[[], None]) -> None:
    log.info("%s leads (Lease %s/%s)", me, lock.namespace, lock.name)
    on_started()


def elect(
    client: kubernetes.client.ApiClient,
    settings: OperatorSettings,
    on_started: Callable[[], None],
    on_lost: Callable[[], None],
) -> threading.Thread:
    """Start campaigning in a daemon thread: on_started once this replica leads, on_lost if it
    then fails to renew (the caller exits)."""
    me = identity()
    lock = LeaseLock(settings.lease_name, lease_namespace(settings), me)
    lock.api_instance = kubernetes.client.CoordinationV1Api(client)
    config = electionconfig.Config(
        lock,
        lease_duration=settings.lease_duration_seconds,
        renew_deadline=settings.renew_deadline_seconds,
        retry_period=settings.retry_period_seconds,
        onstarted_leading=lambda: _lead(me, lock, on_started),
        onstopped_leading=on_lost,
    )
    log.info("%s campaigns for Lease %s/%s", me, lock.namespace, lock.name)
    election = leaderelection.LeaderElection(config)

    def campaign() -> None:
        try:
            election.run()
        except Exception:  # a replica that can no longer campaign must not linger as a standby
            log.exception("leader election failed")
            on_lost()

    thread = threading.Thread(target=campaign, name="kubetune-leader", daemon=True)
    thread.start()
    return thread
