"""Operator scale benchmark: N FineTuneJobs created at once against the emulated API server.

Three processes, as on a cluster: the emulated API server (kmock with tests/support/cluster.py,
in this process, which also counts every request and watches the phases in memory); the test
node (tests/support/kubelet.py as its own process: the Job controller and a kubelet whose fake
trainer "trains" for --train-seconds and ends with a valid TrainerResult); and the real operator
(`kubetune operator`). Half of the fake trainers serve Prometheus metrics (a step that grows
every second, from a few shared metrics servers here), the other half refuse connections, as a
trainer still loading its model does.

Measured:
- time from each FineTuneJob's creation to its batch Job's (p50, p95, max), and until every
  status is final;
- lost or duplicated Jobs (each FineTuneJob must have exactly one Job, created once);
- the operator's requests over the whole run, reads (get, list) and writes separately, per
  FineTuneJob lifecycle, and its watch requests; told apart from the node's and this script's
  requests by User-Agent at the emulator;
- the steady state: with every trainer running, the operator's requests per second over
  --steady-seconds, all verbs (the target: under 50 per second at 10,000 running jobs);
- the operator's peak memory (VmHWM; target: under 600 MB at 10,000 jobs).

    .venv/bin/python benchmarks/operator_scale.py --jobs 10000 --namespaces 50
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cluster import Client, Cluster  # noqa: E402

READS = ("get", "list")
KINDS = ("finetunejobs", "jobs", "pods", "configmaps")
WRITES = ("create", "patch", "update", "delete")


def manifest(index: int, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"job-{index:05d}", "namespace": namespace},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": f"s3://data/team-{index % 10}/train.jsonl"},
            "method": {"type": "lora"},
            "hyperparameters": {"epochs": 1},
            "gates": [{"metric": "loss", "max": 10}],
            "output": {"uri": f"s3://models/job-{index:05d}"},
        },
    }


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Metrics(BaseHTTPRequestHandler):
    started = time.monotonic()

    def do_GET(self) -> None:
        step = int(time.monotonic() - self.started)
        body = (
            "# TYPE kubetune_trainer_step gauge\n"
            f"kubetune_trainer_step {step}\n"
            "# TYPE kubetune_trainer_total_steps gauge\n"
            "kubetune_trainer_total_steps 100000\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a scrape the operator gave up on (its 3 s timeout) is not news


def metrics_ports(serving: int) -> tuple[list[int], list[ThreadingHTTPServer]]:
    """`serving` metrics servers and as many ports where nothing listens, interleaved."""
    servers, ports = [], []
    for _ in range(serving):
        server = _Quiet(("127.0.0.1", 0), _Metrics)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        with closing(socket.socket()) as closed:
            closed.bind(("127.0.0.1", 0))
            refused = closed.getsockname()[1]
        ports += [server.server_address[1], refused]
    return ports, servers


def phases(cluster: Cluster) -> collections.Counter[str | None]:
    def count(emulator: Any) -> collections.Counter[str | None]:
        out: collections.Counter[str | None] = collections.Counter()
        for (resource, _, _), obj in emulator.objects.items():
            if resource.plural == "finetunejobs" and not obj.deleted:
                out[((obj.raw.get("status")) or {}).get("phase")] += 1
        return out

    return cluster.call(count)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="how long each fake trainer runs (default: long enough for "
                        "every trainer to run at once, plus the steady-state window)")  # fmt: skip
    parser.add_argument("--poll-seconds", type=float, default=15.0)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = run(args.jobs, args.namespaces, args.train_seconds, args.poll_seconds,
                  args.steady_seconds, args.timeout)  # fmt: skip
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    steady = results["steadyState"] or {}
    ok = (
        results["allFinalSeconds"] is not None
        and results["lostJobs"] == 0
        and results["duplicateJobs"] == 0
        and bool(steady)
        and steady["requestsPerSecond"] < 50
        and results["operatorPeakRssMB"] < 600
    )
    print("targets met" if ok else "TARGETS MISSED", file=sys.stderr)
    return 0 if ok else 1


def run(
    jobs: int,
    namespaces: int,
    train_seconds: float | None = None,
    poll_seconds: float = 15.0,
    steady_seconds: float = 60.0,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """One benchmark run; the results as main prints them (tests call this at a small N)."""
    train_seconds = train_seconds or max(60.0, jobs / 40) + steady_seconds + 60

    workdir = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    cluster = Cluster().start()
    emulator = cluster.emulator
    assert emulator is not None
    kubeconfig = cluster.kubeconfig(workdir / "kubeconfig.json")
    ports, servers = metrics_ports(4)
    node_stats = workdir / "node.json"
    node = subprocess.Popen(
        [sys.executable, "-m", "tests.support.kubelet", cluster.url, str(workdir / "node"),
         "--fake-seconds", str(train_seconds), "--interval", "1", "--parallel", "8",
         "--metrics-ports", ",".join(map(str, ports)), "--stats", str(node_stats)],
        cwd=ROOT, stdout=(workdir / "node.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        KUBECONFIG=str(kubeconfig),
        KUBETUNE_HEALTH_PORT="0",
        KUBETUNE_METRICS_PORT="0",
        KUBETUNE_PROGRESS_POLL_SECONDS=str(poll_seconds),
    )
    log = workdir / "operator.log"
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "kubetune"), "operator"],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    api = Client(cluster.url)
    deadline = time.monotonic() + 120
    while not all(emulator.operator_counts[("watch", p)] for p in KINDS):
        if time.monotonic() > deadline or operator.poll() is not None:
            raise SystemExit(f"the operator did not start watching: {log.read_text()[-3000:]}")
        time.sleep(0.2)  # until the operator has listed everything and watches
    teams = [f"team-{i:03d}" for i in range(namespaces)]
    docs = [manifest(i, teams[i % len(teams)]) for i in range(jobs)]
    before = collections.Counter(emulator.operator_counts)

    def alive() -> None:
        if operator.poll() is not None:
            raise SystemExit(f"the operator exited: {log.read_text()[-3000:]}")
        if node.poll() is not None:
            raise SystemExit(f"the node exited: {(workdir / 'node.log').read_text()[-3000:]}")

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda d: api.create("finetunejobs", d["metadata"]["namespace"], d), docs))
    created = time.monotonic() - start

    # Wait until every trainer runs, then measure the steady state.
    all_jobs_at = running_at = None
    steady: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        alive()
        jobs_made = emulator.operator_counts[("create", "jobs")] - before[("create", "jobs")]
        if all_jobs_at is None and jobs_made >= jobs:
            all_jobs_at = time.monotonic() - start
        counted = phases(cluster)
        if counted.get("Running", 0) == jobs:
            running_at = time.monotonic() - start
            break
        if counted.get("Succeeded", 0):
            break  # trainers started finishing before all ran: no steady state to measure
        time.sleep(2)
    if running_at is not None:
        time.sleep(2 * poll_seconds)  # the first scrapes of the last trainers
        window_start = collections.Counter(emulator.operator_counts)
        rss_start = peak_rss_mb(operator.pid, "VmRSS")
        time.sleep(steady_seconds)
        window = collections.Counter(emulator.operator_counts) - window_start
        total = sum(window.values())
        steady = {
            "runningJobs": jobs,
            "windowSeconds": steady_seconds,
            "requestsPerSecond": round(total / steady_seconds, 2),
            "readsPerSecond": round(
                sum(n for (v, k), n in window.items() if v in READS and k) / steady_seconds,
                2,
            ),
            "writesPerSecond": round(
                sum(n for (v, _), n in window.items() if v in WRITES) / steady_seconds, 2
            ),
            "byKind": {
                f"{v} {p or '(discovery)'}": n for (v, p), n in sorted(window.items(), key=str)
            },
            "operatorRssMB": round(max(rss_start, peak_rss_mb(operator.pid, "VmRSS")), 1),
        }

    final_at = None
    counted = collections.Counter()
    while time.monotonic() - start < timeout:
        alive()
        counted = phases(cluster)
        if counted.get("Succeeded", 0) + counted.get("Failed", 0) == jobs:
            final_at = time.monotonic() - start
            break
        time.sleep(2)
    time.sleep(5)  # anything still writing?
    rss = peak_rss_mb(operator.pid)
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime = Path(f"/proc/{operator.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]
    operator_cpu = (int(utime) + int(stime)) / ticks
    operator.terminate()
    operator.wait(30)
    node.terminate()
    node.wait(60)
    for server in servers:
        server.shutdown()

    def children(emulator: Any) -> tuple[collections.Counter[tuple[str, str]], dict[str, float]]:
        per_owner: collections.Counter[tuple[str, str]] = collections.Counter()
        for (resource, namespace, _), obj in emulator.objects.items():
            if resource.plural == "jobs":
                labels = ((obj.last.raw.get("metadata")) or {}).get("labels") or {}
                per_owner[(namespace, labels.get("kubetune.dev/finetunejob"))] += 1
        return per_owner, dict(emulator.created_at)

    per_owner, created_at = cluster.call(children)  # Jobs ever created (deleted ones too)
    creates = collections.Counter(
        (body["metadata"]["namespace"], body["metadata"]["labels"]["kubetune.dev/finetunejob"])
        for verb, plural, _, body in emulator.write_log
        if (verb, plural) == ("create", "jobs")
    )
    first_job: dict[tuple[str | None, str], float] = {}
    for (plural, namespace, name), at in created_at.items():
        if plural == "jobs":
            owner = (namespace, name.rsplit("-", 1)[0])
            first_job[owner] = min(at, first_job.get(owner, at))
    to_job = [
        first_job[(ns, name)] - created_at[("finetunejobs", ns, name)]
        for ns, name in ((d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs)
        if (ns, name) in first_job and ("finetunejobs", ns, name) in created_at
    ]
    requests = collections.Counter(emulator.operator_counts) - before
    # Object reads; API discovery (kopf's one GET of /apis at start-up) is listed in byKind.
    reads = sum(n for (v, k), n in requests.items() if v in READS and k)
    writes = sum(n for (v, _), n in requests.items() if v in WRITES)
    node_passes = json.loads(node_stats.read_text())["passes"] if node_stats.exists() else []
    results = {
        "jobs": jobs,
        "namespaces": namespaces,
        "trainSeconds": train_seconds,
        "pollSeconds": poll_seconds,
        "createSeconds": round(created, 1),
        "allJobsExistSeconds": None if all_jobs_at is None else round(all_jobs_at, 1),
        "allRunningSeconds": None if running_at is None else round(running_at, 1),
        "allFinalSeconds": None if final_at is None else round(final_at, 1),
        "createToJobSeconds": {
            "p50": round(percentile(to_job, 0.5), 2),
            "p95": round(percentile(to_job, 0.95), 2),
            "max": round(max(to_job), 2),
        }
        if to_job
        else None,
        "phases": {str(k): v for k, v in counted.items()},
        "lostJobs": sum(
            1 for d in docs if per_owner[d["metadata"]["namespace"], d["metadata"]["name"]] == 0
        ),
        "duplicateJobs": sum(1 for n in creates.values() if n > 1),
        "operatorPerLifecycle": {
            "reads": round(reads / jobs, 3),
            "writes": round(writes / jobs, 2),
            "watchRequests": sum(
                n for (v, _), n in emulator.operator_counts.items() if v == "watch"
            ),
            "byKind": {
                f"{v} {p or '(discovery)'}": n for (v, p), n in sorted(requests.items(), key=str)
            },
        },
        "steadyState": steady or None,
        "operatorPeakRssMB": round(rss, 1),
        "operatorCpuSeconds": round(operator_cpu, 1),
        "nodePassSeconds": {
            "mean": round(statistics.mean(node_passes), 2) if node_passes else None,
            "max": round(max(node_passes), 2) if node_passes else None,
        },
    }
    cluster.stop()
    return results


if __name__ == "__main__":
    sys.exit(main())
