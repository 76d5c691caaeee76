"""A watch gap on the emulated API server: 410 Gone while the API refuses the operator's lists
for a while (503, injected: what only the emulator gives), repaired by a relist that notices
what was deleted meanwhile. The caches' steady state, the gap after an API server restart and
leader election run on the real control plane (tests/e2e/test_cache.py)."""

from __future__ import annotations

from tests.integration.conftest import FINAL, Platform


def test_a_watch_gap_is_repaired_by_listing_again(platform: Platform, ns: str) -> None:
    platform.apply(platform.job(ns, "deleted-unseen", resources={"gpus": 4}))  # refused: Failed
    platform.wait_phase(ns, "deleted-unseen", "Failed", timeout=30)

    def failed_here() -> float:
        gauge = platform.operator_metric("kubetune_operator_finetunejobs")
        return gauge.get((("namespace", ns), ("phase", "Failed")), 0.0)

    platform.wait_for("the gauge to count it", lambda: failed_here() == 1.0, 10)
    lists_before = platform.operator_counts()[("list", "finetunejobs")]
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
    assert platform.operator_counts()[("list", "finetunejobs")] > lists_before + 2
    # The relist noticed the deletion it never saw as an event: the gauge forgot it.
    platform.wait_for("the gauge to forget it", lambda: failed_here() == 0.0, 10)
    assert platform.job_creates(ns, "created-unseen") == 1
