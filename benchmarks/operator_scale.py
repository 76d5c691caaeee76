"""Operator scale benchmark: N FineTuneJobs created at once on the real control plane.

The parts, as on a cluster (tests/support/control_plane.py): etcd, kube-apiserver,
kube-controller-manager (the real Job controller creates the pods) and kube-scheduler (binds
them) built from their Go modules; the chart installed with `helm install` (CRDs, RBAC, the
admission policies, as by default); the real operator (`kubetune operator`) with the chart's
settings and its ServiceAccount's token, so the chart's RBAC holds; one Node with room for every
pod and the node agent as its kubelet (tests/support/node.py) in fake mode: no process, each
container "trains" for --train-seconds and ends with a valid TrainerResult. Half of the fake
trainers serve Prometheus metrics on their pod IP (a step that grows every second), the other
half refuse connections, as a trainer still loading its model does.

Measured, from the API server's audit log (every request, with its user and its timestamps):
- time from each FineTuneJob's create to its batch Job's create by the operator (p50, p95,
  max), and until every status is final;
- lost or duplicated Jobs (each FineTuneJob must have exactly one Job, created once);
- the operator's requests over the whole run, reads (get, list) and writes separately, per
  FineTuneJob lifecycle, and its watch requests;
- the steady state: with every trainer running, the operator's requests per second over
  --steady-seconds, all verbs (the target: under 50 per second at 10,000 running jobs);
- the operator's peak memory (VmHWM; target: under 600 MB at 10,000 jobs), and the control
  plane's processes' peak memory beside it.

    .venv/bin/python benchmarks/operator_scale.py --jobs 10000 --namespaces 50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from resource import RLIMIT_NOFILE, getrlimit, setrlimit
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.client import Client  # noqa: E402
from tests.support.control_plane import ControlPlane  # noqa: E402
from tests.support.node import NodeAgent, PodRun  # noqa: E402
from tests.support.platform import chart_operator, installed  # noqa: E402

READS = ("get", "list")
WRITES = ("create", "patch", "update", "delete")
KINDS = ("finetunejobs", "jobs", "pods", "configmaps")  # what the operator watches
FINAL = ("Succeeded", "Failed")
LEASES = "leases"


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


def cpu_seconds(pid: int) -> float:
    ticks = 100  # os.sysconf("SC_CLK_TCK") on Linux
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Metrics(asyncio.Protocol):
    """One scrape: an HTTP/1.1 answer with the fake trainer's step, then close."""

    started = time.monotonic()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        step = int(time.monotonic() - self.started)
        body = (
            "# TYPE kubetune_trainer_step gauge\n"
            f"kubetune_trainer_step {step}\n"
            "# TYPE kubetune_trainer_total_steps gauge\n"
            "kubetune_trainer_total_steps 100000\n"
        ).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()


class MetricsFarm:
    """The fake trainers' metrics endpoints: for the FineTuneJobs of even index, a listening
    socket on the pod's IP and metrics port while its fake container runs (one event loop for
    all of them); the others' pods refuse connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.servers: dict[str, asyncio.AbstractServer] = {}
        threading.Thread(target=self.loop.run_forever, name="metrics", daemon=True).start()

    def started(self, run: PodRun) -> None:
        owner = (run.pod["metadata"].get("labels") or {}).get("kubetune.dev/finetunejob", "")
        if not owner.startswith("job-") or int(owner[4:]) % 2:
            return
        ports = run.pod["spec"]["containers"][0].get("ports") or []
        port = next(int(p["containerPort"]) for p in ports if p.get("name") == "metrics")
        serve = self.loop.create_server(_Metrics, run.ip, port)
        self.servers[run.uid] = asyncio.run_coroutine_threadsafe(serve, self.loop).result(10)

    def finished(self, run: PodRun) -> None:
        server = self.servers.pop(run.uid, None)
        if server is not None:
            self.loop.call_soon_threadsafe(server.close)

    def close(self) -> None:
        for server in list(self.servers.values()):
            self.loop.call_soon_threadsafe(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


class Phases:
    """Every FineTuneJob's phase, from a watch of all of them as the admin (a list, then a
    watch from its resourceVersion, listed again after 410 Gone)."""

    def __init__(self, api: Client) -> None:
        self.api = api
        self.phase: dict[tuple[str, str], str | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="phases", daemon=True).start()

    def counts(self) -> collections.Counter[str | None]:
        with self._lock:
            return collections.Counter(self.phase.values())

    def stop(self) -> None:
        self._stop.set()

    def _note(self, obj: dict[str, Any], deleted: bool = False) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            if deleted:
                self.phase.pop(key, None)
            else:
                self.phase[key] = (obj.get("status") or {}).get("phase")

    def _run(self) -> None:
        path = self.api.path("finetunejobs")
        while not self._stop.is_set():
            try:
                listing = self.api.request("GET", path)
                with self._lock:
                    self.phase = {}
                for item in listing["items"]:
                    self._note(item)
                url = f"{self.api.url}{path}?watch=true&allowWatchBookmarks=true"
                url += f"&resourceVersion={listing['metadata']['resourceVersion']}"
                request = urllib.request.Request(url)
                with urllib.request.urlopen(request, timeout=600, context=self.api.context) as w:
                    for line in w:
                        event = json.loads(line) if line.strip() else {}
                        if self._stop.is_set() or event.get("type") == "ERROR":
                            break
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self._note(event["object"], event["type"] == "DELETED")
            except Exception:
                self._stop.wait(1)


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["stageTimestamp"]).timestamp()


def main() -> int:
    # Half the fake trainers listen on a socket of this process, and each scrape opens one.
    soft, hard = getrlimit(RLIMIT_NOFILE)
    setrlimit(RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="how long each fake trainer runs (default: long enough for "
                        "every trainer to run at once, plus the steady-state window)")  # fmt: skip
    parser.add_argument("--poll-seconds", type=float, default=15.0)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--api-qps", type=int, default=200,
                        help="the controller manager's and scheduler's client rate")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=5400.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = run(args.jobs, args.namespaces, args.train_seconds, args.poll_seconds,
                  args.steady_seconds, args.timeout, args.api_qps)  # fmt: skip
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
        and steady["runningAtWindowEnd"] == steady["runningJobs"]
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
    timeout: float = 5400.0,
    api_qps: int = 200,
) -> dict[str, Any]:
    """One benchmark run; the results as main prints them (tests call this at a small N)."""
    train_seconds = train_seconds or max(60.0, jobs / 15) + steady_seconds + 60
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-scale-"))
    teams = [f"team-{i:03d}" for i in range(namespaces)]
    values = ["--set-json", f"progressPollSeconds={poll_seconds}"]
    farm = MetricsFarm()
    try:
        with installed(workdir, values, teams, api_qps) as plane, ExitStack() as stack:
            return _run(plane, stack, farm, workdir, jobs, teams, train_seconds, poll_seconds,
                        steady_seconds, timeout)  # fmt: skip
    finally:
        farm.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(
    plane: ControlPlane,
    stack: ExitStack,
    farm: MetricsFarm,
    workdir: Path,
    jobs: int,
    teams: list[str],
    train_seconds: float,
    poll_seconds: float,
    steady_seconds: float,
    timeout: float,
) -> dict[str, Any]:
    # Room on the one Node for every pod (one GPU each, no CPU or memory requests by default).
    plane.add_node(gpus=jobs, pods=jobs + 110)
    api = plane.client()
    operator = chart_operator(plane, workdir).start()
    stack.callback(operator.stop)
    user = operator.account
    assert operator.process is not None
    pid = operator.process.pid
    node = NodeAgent(
        plane.node_client(),
        workdir / "node",
        fake_seconds=train_seconds,
        interval=1.0,
        parallel=8,
        fake_hooks=(farm.started, farm.finished),
    ).start()
    stack.callback(node.stop)

    def mine() -> list[dict[str, Any]]:
        return [e for e in once(plane.audit()) if e["user"]["username"] == user]

    def alive() -> None:
        if not operator.alive():
            raise SystemExit(f"the operator exited: {operator.log.read_text()[-3000:]}")

    deadline = time.monotonic() + 120
    watching: set[str] = set()
    while not watching >= set(KINDS):  # until the operator has listed everything and watches
        alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"the operator is not watching: {operator.log.read_text()[-3000:]}")
        watching = {e["objectRef"]["resource"] for e in mine() if e["verb"] == "watch"}
        time.sleep(0.5)
    before = len(plane.audit())
    phases = Phases(api)
    stack.callback(phases.stop)
    docs = [manifest(i, teams[i % len(teams)]) for i in range(jobs)]

    start = time.monotonic()
    clients = threading.local()

    def create(doc: dict[str, Any]) -> None:
        if not hasattr(clients, "api"):
            clients.api = plane.client()
        clients.api.create("finetunejobs", doc["metadata"]["namespace"], doc)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, docs))
    created = time.monotonic() - start

    # Wait until every trainer runs, then measure the steady state.
    running_at = None
    steady: dict[str, Any] = {}
    while time.monotonic() - start < timeout:
        alive()
        counted = phases.counts()
        if counted.get("Running", 0) == jobs:
            running_at = time.monotonic() - start
            break
        if counted.get("Succeeded", 0):
            break  # trainers started finishing before all ran: no steady state to measure
        time.sleep(2)
    if running_at is not None:
        time.sleep(2 * poll_seconds)  # the first scrapes of the last trainers
        window_from = time.time()
        rss_start = peak_rss_mb(pid, "VmRSS")
        time.sleep(steady_seconds)
        window_to = time.time()
        still = phases.counts().get("Running", 0)  # a window with trainers ending is not steady
        window = collections.Counter(
            (e["verb"], resource(e)) for e in mine() if window_from <= stamp(e) < window_to
        )
        steady = {
            "runningJobs": jobs,
            "runningAtWindowEnd": still,
            "windowSeconds": steady_seconds,
            "requestsPerSecond": round(sum(window.values()) / steady_seconds, 2),
            "readsPerSecond": round(count(window, READS) / steady_seconds, 2),
            "writesPerSecond": round(count(window, WRITES) / steady_seconds, 2),
            "leaderElectionPerSecond": round(
                count(window, READS + WRITES, LEASES) / steady_seconds, 2
            ),
            "byKind": {f"{v} {r}": n for (v, r), n in sorted(window.items())},
            "operatorRssMB": round(max(rss_start, peak_rss_mb(pid, "VmRSS")), 1),
        }

    final_at = None
    counted = collections.Counter()
    while time.monotonic() - start < timeout:
        alive()
        counted = phases.counts()
        if sum(counted.get(p, 0) for p in FINAL) == jobs:
            final_at = time.monotonic() - start
            break
        time.sleep(2)
    time.sleep(5)  # anything still writing?
    operator_rss, operator_cpu = peak_rss_mb(pid), cpu_seconds(pid)
    plane_rss = {name: round(peak_rss_mb(p.pid), 1) for name, p in plane.processes.items()}
    plane_cpu = {name: round(cpu_seconds(p.pid), 1) for name, p in plane.processes.items()}
    phases.stop()
    operator.stop()
    node.stop()

    audit = plane.audit()
    created_at = {
        (e["objectRef"]["namespace"], e["objectRef"]["name"]): stamp(e)
        for e in audit
        if e["verb"] == "create"
        and resource(e) == "finetunejobs"
        and e["responseStatus"]["code"] == 201
    }
    job_creates: collections.defaultdict[tuple[str, str], list[float]] = collections.defaultdict(
        list
    )
    for e in audit:
        if (e["verb"], resource(e), e["user"]["username"]) == ("create", "jobs", user) and e[
            "responseStatus"
        ]["code"] == 201:
            ref = e["objectRef"]
            job_creates[(ref["namespace"], ref["name"].rsplit("-", 1)[0])].append(stamp(e))
    to_job = [min(job_creates[key]) - at for key, at in created_at.items() if key in job_creates]
    requests = collections.Counter((e["verb"], resource(e)) for e in once(audit[before:]) if
                                   e["user"]["username"] == user)  # fmt: skip
    keys = [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs]
    return {
        "jobs": jobs,
        "namespaces": len(teams),
        "trainSeconds": train_seconds,
        "pollSeconds": poll_seconds,
        "createSeconds": round(created, 1),
        "allJobsExistSeconds": round(
            max(max(v) for v in job_creates.values()) - min(created_at.values()), 1
        )
        if job_creates and created_at
        else None,
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
        "lostJobs": sum(1 for key in keys if not job_creates.get(key)),
        "duplicateJobs": sum(1 for key in keys if len(job_creates.get(key, [])) > 1),
        "operatorPerLifecycle": {
            "reads": round(count(requests, READS) / jobs, 3),
            "writes": round(count(requests, WRITES) / jobs, 2),
            "watchRequests": count(requests, ("watch",)),
            "leaderElection": count(requests, READS + WRITES, LEASES),
            "byKind": {f"{v} {r}": n for (v, r), n in sorted(requests.items())},
        },
        "steadyState": steady or None,
        "operatorPeakRssMB": round(operator_rss, 1),
        "operatorCpuSeconds": round(operator_cpu, 1),
        "controlPlanePeakRssMB": plane_rss,
        "controlPlaneCpuSeconds": plane_cpu,
        "nodeErrors": len(node.errors),
        "nodeErrorSamples": node.errors[:3],  # what broke, for whoever reads a failure
        "nodeRetries": len(node.transient),  # 429/5xx answers the node retried
    }


def once(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One event per request: a watch has two (ResponseStarted when it opens, ResponseComplete
    when it ends; every other request only ResponseComplete), so the first of each auditID."""
    seen: set[str] = set()
    first = []
    for event in events:
        if event["auditID"] not in seen:
            seen.add(event["auditID"])
            first.append(event)
    return first


def resource(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    name = ref.get("resource") or "(non-resource)"
    return f"{name}/{ref['subresource']}" if ref.get("subresource") else name


def count(
    counts: collections.Counter[tuple[str, str]], verbs: tuple[str, ...], only: str = ""
) -> int:
    """Requests with these verbs: of the resource `only`, or (by default) of every resource but
    the leader election's Lease (the chart runs two replicas; the leader renews every 2 s)."""
    return sum(
        n for (v, r), n in counts.items() if v in verbs and ((r == only) if only else r != LEASES)
    )


if __name__ == "__main__":
    sys.exit(main())
