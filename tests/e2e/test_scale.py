"""The operator at a few hundred FineTuneJobs on a control plane of its own: the scale benchmark
(benchmarks/operator_scale.py) at a small N, as a test of what must hold at any N. Its figures
at 10,000 are in docs/benchmarks.md; timings are not asserted here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_300_jobs_no_lost_or_duplicated_job_and_no_reads_in_steady_state() -> None:
    spec = importlib.util.spec_from_file_location(
        "operator_scale", ROOT / "benchmarks" / "operator_scale.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run(
        jobs=300, namespaces=6, train_seconds=90, poll_seconds=2, steady_seconds=10, timeout=600
    )
    assert results["phases"] == {"Succeeded": 300}, results
    assert results["lostJobs"] == 0 and results["duplicateJobs"] == 0, results
    lifecycle = results["operatorPerLifecycle"]
    assert lifecycle["reads"] == 0, lifecycle  # every reconcile read the caches
    assert lifecycle["byKind"]["create jobs"] == 300, lifecycle
    assert results["nodeErrors"] == 0, results["nodeErrorSamples"]
    steady = results["steadyState"]
    assert steady is not None, results  # every trainer ran at once
    assert steady["runningAtWindowEnd"] == 300, steady  # and still ran when it was measured
    assert steady["readsPerSecond"] == 0, steady
    # The scraper's budget (20 reads a second by default) bounds the progress writes; half of
    # the trainers serve metrics, so progress is written.
    assert 0 < steady["writesPerSecond"] <= 20, steady
