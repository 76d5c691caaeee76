"""The operator's watch-fed caches and its leader election, against the emulated cluster: no API
reads in steady state, a watch gap (410 Gone while the API refuses lists) repaired by a relist
that notices what was deleted meanwhile, and two replicas where killing the leader mid-run hands
the run to the other with no second Job and no lost status."""

from __future__ import annotations

import collections
import time

from tests.integration.conftest import FINAL, POLL_SECONDS, OperatorProcess, Platform

LEASE_NAMESPACE = "kubetune-system"


def _operator_requests(platform: Platform) -> collections.Counter[tuple[str, str]]:
    assert platform.cluster.emulator is not None
    return collections.Counter(platform.cluster.emulator.operator_counts)


def test_a_running_job_costs_no_api_reads(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "steady-state", hyperparameters__maxSteps=400))
    platform.wait_phase(ns, "steady-state", "Running")
    platform.wait_for(
        "progress", lambda: (platform.status(ns, "steady-state").get("progress") or {}).get("step")
    )
    before = _operator_requests(platform)
    step = platform.status(ns, "steady-state")["progress"]["step"]
    time.sleep(10 * POLL_SECONDS)
    during = _operator_requests(platform) - before
    assert platform.status(ns, "steady-state")["progress"]["step"] > step  # progress went on
    reads = {k: n for k, n in during.items() if k[0] in ("get", "list")}
    assert reads == {}, during  # no GET, no LIST: the caches answered
    # What it did write: status progress (one patch per changed step at most), nothing else.
    assert set(during) <= {("patch", "finetunejobs"), ("watch", "finetunejobs"),
                           ("watch", "jobs"), ("watch", "pods"), ("watch", "configmaps")}  # fmt: skip
    assert during[("patch", "finetunejobs")] <= 10 + 1
    platform.api.delete("finetunejobs", ns, "steady-state")


def test_a_watch_gap_is_repaired_by_listing_again(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "deleted-unseen", resources={"gpus": 4}))  # refused: Failed
    platform.wait_phase(ns, "deleted-unseen", "Failed", timeout=30)

    def failed_here() -> float:
        gauge = platform.operator_metric("kubetune_operator_finetunejobs")
        return gauge.get((("namespace", ns), ("phase", "Failed")), 0.0)

    platform.wait_for("the gauge to count it", lambda: failed_here() == 1.0, 10)
    lists_before = _operator_requests(platform)[("list", "finetunejobs")]
    # The watches' history is compacted and every watch closed: the operator resumes from its
    # last version, gets 410 Gone, and must list again; the API refuses the lists for a while.
    refusals = [
        platform.cluster.inject("list", plural, 503, times=2, operator_only=True)
        for plural in ("finetunejobs", "jobs")
    ]
    platform.cluster.expire_watches()
    # Meanwhile, unseen: one FineTuneJob deleted, another created.
    platform.api.delete("finetunejobs", ns, "deleted-unseen")
    platform.apply(platform.job(ns, "created-unseen"))
    status = platform.wait_phase(ns, "created-unseen", FINAL, timeout=120)
    assert status["phase"] == "Succeeded", status
    assert [f.remaining for f in refusals] == [0, 0]
    assert _operator_requests(platform)[("list", "finetunejobs")] > lists_before + 2
    # The relist noticed the deletion it never saw as an event: the gauge forgot it.
    platform.wait_for("the gauge to forget it", lambda: failed_here() == 0.0, 10)
    assert platform.job_creates(ns, "created-unseen") == 1


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
            replica = OperatorProcess(shared.kubeconfig, shared.log.with_name(f"{name}.log"))
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
