"""Operator scale benchmark: N FineTuneJobs created at once against the emulated API server.

The real operator (`kubetune operator`, a subprocess) against kmock with the test layer of
tests/support/cluster.py; the test node of tests/support/kubelet.py plays the Job controller and
kubelet with a fast fake trainer (each pod "trains" for --train-seconds and ends with a valid
TrainerResult). Measured:
- time until every FineTuneJob has its batch Job, and until every status is final;
- lost or duplicated Jobs (each FineTuneJob must have exactly one Job, created once);
- the operator's API requests per job lifecycle, counted at the emulator (writes by the
  operator only: the test node's and this script's requests are told apart by User-Agent);
- the operator's peak memory (VmHWM of its process).

    .venv/bin/python benchmarks/operator_scale.py --jobs 500
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Client, Cluster  # noqa: E402
from tests.support.kubelet import Kubelet  # noqa: E402


def manifest(index: int, namespace: str) -> dict:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"job-{index:04d}", "namespace": namespace},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": f"s3://data/team-{index % 10}/train.jsonl"},
            "method": {"type": "lora"},
            "hyperparameters": {"epochs": 1},
            "gates": [{"metric": "loss", "max": 10}],
            "output": {"uri": f"s3://models/job-{index:04d}"},
        },
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=5)
    parser.add_argument("--train-seconds", type=float, default=5.0)
    parser.add_argument("--poll-seconds", type=float, default=15.0)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    cluster = Cluster().start()
    kubeconfig = cluster.kubeconfig(workdir / "kubeconfig.json")
    kubelet = Kubelet(
        cluster.url, workdir / "node", fake_seconds=args.train_seconds, interval=0.5
    ).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        KUBECONFIG=str(kubeconfig),
        KUBETUNE_HEALTH_PORT="0",
        KUBETUNE_PROGRESS_POLL_SECONDS=str(args.poll_seconds),
    )
    log = workdir / "operator.log"
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "kubetune"), "operator"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    api = Client(cluster.url)
    emulator = cluster.emulator
    assert emulator is not None
    time.sleep(3)  # let the operator connect and start watching
    namespaces = [f"team-{i}" for i in range(args.namespaces)]
    docs = [manifest(i, namespaces[i % len(namespaces)]) for i in range(args.jobs)]
    before = collections.Counter(emulator.counts)

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: api.create("finetunejobs", d["metadata"]["namespace"], d), docs))
    created = time.monotonic() - start

    all_jobs_at = final_at = None
    phases: collections.Counter[str] = collections.Counter()
    while time.monotonic() - start < args.timeout:
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited: {log.read_text()[-3000:]}")
        if all_jobs_at is None and len(api.list("jobs")) >= args.jobs:
            all_jobs_at = time.monotonic() - start
        phases = collections.Counter(
            (f.get("status") or {}).get("phase") for f in api.list("finetunejobs")
        )
        if phases.get("Succeeded", 0) + phases.get("Failed", 0) == args.jobs:
            final_at = time.monotonic() - start
            break
        time.sleep(1)
    time.sleep(2 * args.poll_seconds if args.poll_seconds < 5 else 5)  # anything still writing?
    rss = peak_rss_mb(operator.pid)
    operator.terminate()
    operator.wait(30)
    kubelet.stop()

    jobs = api.list("jobs")
    per_owner = collections.Counter(
        (j["metadata"]["namespace"], j["metadata"]["labels"]["kubetune.dev/finetunejob"])
        for j in jobs
    )
    creates = collections.Counter(
        (body["metadata"]["namespace"], body["metadata"]["labels"]["kubetune.dev/finetunejob"])
        for verb, plural, _, body in emulator.write_log
        if (verb, plural) == ("create", "jobs")
    )
    writes = [
        emulator.writes_by_owner[f"{d['metadata']['namespace']}/{d['metadata']['name']}"]
        for d in docs
    ]
    by_kind = collections.Counter((verb, plural) for verb, plural, _, _ in emulator.write_log)
    requests = emulator.counts - before
    results = {
        "jobs": args.jobs,
        "namespaces": args.namespaces,
        "trainSeconds": args.train_seconds,
        "createSeconds": round(created, 1),
        "allJobsExistSeconds": None if all_jobs_at is None else round(all_jobs_at, 1),
        "allFinalSeconds": None if final_at is None else round(final_at, 1),
        "phases": dict(phases),
        "lostJobs": sum(
            1 for d in docs if per_owner[d["metadata"]["namespace"], d["metadata"]["name"]] == 0
        ),
        "duplicateJobs": sum(1 for n in per_owner.values() if n > 1),
        "jobCreatesPerJob": max(creates.values()) if creates else 0,
        "operatorWritesPerJob": {
            "mean": round(statistics.mean(writes), 2),
            "max": max(writes),
            "min": min(writes),
        },
        "operatorWritesByKind": {f"{v} {p}": n for (v, p), n in sorted(by_kind.items())},
        "requestsPerJobAllClients": round(sum(requests.values()) / args.jobs, 1),
        "operatorPeakRssMB": round(rss, 1),
        # The test node (Job controller + kubelet) is one thread: its passes bound the pace.
        "nodePassSeconds": {
            "mean": round(sum(kubelet.pass_seconds) / max(1, len(kubelet.pass_seconds)), 2),
            "max": round(max(kubelet.pass_seconds, default=0.0), 2),
            "passes": len(kubelet.pass_seconds),
        },
    }
    cluster.stop()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (
        final_at is not None
        and results["lostJobs"] == 0
        and results["duplicateJobs"] == 0
        and results["operatorWritesPerJob"]["max"] <= 12
        and rss < 300
    )
    print("targets met" if ok else "TARGETS MISSED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
