"""The operator's watch-fed caches and its leader election on the real control plane, with the
real API server's audit log counting the operator's requests: no reads in steady state, and two
replicas on a real Lease, where killing the leader mid-run hands the run to the other with
no second Job and no lost status."""

from __future__ import annotations

import time

from tests.support.platform import FINAL, POLL_SECONDS, OperatorProcess, Platform

LEASE_NAMESPACE = "kubetune-system"


def test_a_running_job_costs_no_api_reads(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "steady-state", hyperparameters__maxSteps=400))
    platform.wait_phase(ns, "steady-state", "Running")
    platform.wait_for(
        "progress", lambda: (platform.status(ns, "steady-state").get("progress") or {}).get("step")
    )
    before = platform.operator_counts()
    step = platform.status(ns, "steady-state")["progress"]["step"]
    time.sleep(10 * POLL_SECONDS)
    during = platform.operator_counts() - before
    assert platform.status(ns, "steady-state")["progress"]["step"] > step  # progress went on
    # No GET, no LIST: the caches answered. The chart runs two replicas, so the leader renews
    # its Lease (a GET and an UPDATE each retry period, as client-go's elector does).
    reads = {k: n for k, n in during.items() if k[0] in ("get", "list") and k[1] != "leases"}
    assert reads == {}, during
    # What it did: status progress (one patch per changed step at most), the Lease, and
    # watches (each is made again when the server ends it at its timeout).
    assert {k for k in during if k[0] != "watch"} <= {
        ("patch", "finetunejobs"),
        ("get", "leases"),
        ("update", "leases"),
    }, during
    assert during[("patch", "finetunejobs")] <= 10 + 1
    platform.api.delete("finetunejobs", ns, "steady-state")


def _holder(platform: Platform) -> str | None:
    lease = platform.api.request(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
    )["items"]
    return lease[0]["spec"].get("holderIdentity") if lease else None


def test_the_standby_takes_over_when_the_leader_dies(platform: Platform, ns: str) -> None:
    shared = platform.operator
    shared.stop()
    replicas: dict[str, OperatorProcess] = {}
    try:
        for name in ("replica-a", "replica-b"):
            replica = shared.replica(shared.log.with_name(f"{name}.log"))
            replica.extra_env = {
                "HOSTNAME": name,
                "KUBETUNE_LEADER_ELECTION": "true",
                "KUBETUNE_LEADER_ELECTION_NAMESPACE": LEASE_NAMESPACE,
                "KUBETUNE_LEASE_DURATION_SECONDS": "4",
                "KUBETUNE_RENEW_DEADLINE_SECONDS": "3",
                "KUBETUNE_RETRY_PERIOD_SECONDS": "1",
            }
            replicas[name] = replica.start()
        platform.operator = replicas["replica-a"]  # what wait_for checks is alive, for now
        leader_id = platform.wait_for("a leader", lambda: _holder(platform), 30)
        leader = replicas[leader_id.split("_")[0]]
        standby = next(r for r in replicas.values() if r is not leader)
        platform.operator = leader
        platform.apply(platform.job(ns, "handed-over", hyperparameters__maxSteps=300))
        platform.wait_phase(ns, "handed-over", "Running")
        platform.wait_for("progress", lambda: _step(platform, ns) > 0)
        # The standby watches (its caches stay warm) but writes nothing: the reconcile logs
        # each status write it makes, and the standby has made none.
        assert "status of " in leader.log.read_text(errors="replace")
        assert "status of " not in standby.log.read_text(errors="replace")
        step_at_kill = _step(platform, ns)
        leader.kill()  # SIGKILL: the Lease is not released; the standby waits it out
        killed = time.monotonic()
        platform.operator = standby
        new_id = platform.wait_for(
            "the standby to lead", lambda: (h := _holder(platform)) != leader_id and h, 30
        )
        took_over = time.monotonic() - killed
        assert new_id.split("_")[0] != leader_id.split("_")[0]
        assert took_over < 4 + 3, took_over  # the lease duration, plus a retry period or two
        # The new leader goes on reporting progress, and the run finishes once, as one Job.
        platform.wait_for("progress after the takeover", lambda: _step(platform, ns) > step_at_kill)
        status = platform.wait_phase(ns, "handed-over", FINAL, timeout=180)
        assert status["phase"] == "Succeeded", status
        assert status["attempts"] == 1
        assert platform.job_creates(ns, "handed-over") == 1
        assert len(platform.children(ns, "jobs", "handed-over")) == 1
    finally:
        for replica in replicas.values():
            replica.stop()
        platform.operator = shared
        shared.start()


def _step(platform: Platform, ns: str) -> int:
    return int((platform.status(ns, "handed-over").get("progress") or {}).get("step") or 0)
