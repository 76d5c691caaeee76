"""Each adapter method's training time in float32 and bfloat16 on this machine, through
`kubetune run`: the measurement behind model.dtype auto choosing bfloat16 for the adapter methods
on a CPU with AMX or AVX512-BF16 (docs/benchmarks.md).

The quickstart (SmolLM2-135M-Instruct, the demo's data) with the method set (lora and dora keep
r 16, alpha 32), model.dtype float32 then bfloat16, 10 steps, seed 1, 24 test questions, no gates
and no evaluation or checkpoint during training; one run at a time, each in its own process.
Reported from each run's result.json: training seconds and exactMatch.

  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/method_dtype.py [--methods lora dora ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from trainer_throughput import DATA, QUICKSTART, smollm2_gguf

METHODS = ["lora", "dora", "ia3", "prefix", "prompt"]
DTYPES = ["float32", "bfloat16"]


def manifest(base: dict, method: str, dtype: str, steps: int, seed: int) -> dict:
    doc = copy.deepcopy(base)
    spec = doc["spec"]
    lora = spec["method"].get("lora")
    spec["method"] = {"type": method, **({"lora": lora} if method in ("lora", "dora") else {})}
    spec["model"]["dtype"] = dtype
    spec["hyperparameters"].update(
        maxSteps=steps, seed=seed, evalEverySteps=None, checkpointEverySteps=None
    )
    spec["evaluation"]["maxSamples"] = 24
    spec["gates"] = []
    return doc


def run(doc: dict, tmp: Path, name: str) -> dict:
    job, out = tmp / f"{name}.yaml", tmp / name
    job.write_text(yaml.safe_dump(doc))
    cli = "import sys; from kubetune.cli import main; sys.exit(main())"
    done = subprocess.run(
        [
            *(sys.executable, "-c", cli, "run", str(job), "--fresh"),
            *("--model", str(smollm2_gguf()), "--dataset", str(DATA), "--output", str(out)),
            *("--workdir", str(tmp / f"work-{name}")),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
    return json.loads(next(out.glob("runs/*/result.json")).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    base = yaml.safe_load(QUICKSTART.read_text())
    print(
        "| method | float32 train s | bfloat16 train s | speed-up | exactMatch float32 / bfloat16 |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            results = {
                dtype: run(
                    manifest(base, method, dtype, args.steps, args.seed),
                    Path(tmp),
                    f"{method}-{dtype}",
                )
                for dtype in DTYPES
            }
            f32, bf16 = (results[d] for d in DTYPES)
            em = " / ".join(f"{r['metrics']['tuned']['exactMatch']:.2f}" for r in (f32, bf16))
            print(
                f"| {method} | {f32['trainSeconds']:.1f} | {bf16['trainSeconds']:.1f} "
                f"| {f32['trainSeconds'] / bf16['trainSeconds']:.2f}x | {em} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
