"""Image build benchmark: how long `make images TRAINER_VARIANT=cpu` takes, and how long a
rebuild takes after a one-line change to one .py file (the layers are ordered so that the
dependencies are not reinstalled), with the images' sizes.

    python3 benchmarks/image_builds.py [--fresh]

--fresh first removes the local base image and every cached layer of buildah's storage
(`buildah rmi --all --force`), as on a new machine. Builds with hack/images.py (docker or
buildah) into the tags localhost/kubetune-bench/*; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hack import images  # noqa: E402


def build(context: Path, tag: str, report: Path) -> tuple[float, list[dict]]:
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "hack" / "images.py"),
            "--trainer-variant",
            "cpu",
            "--registry",
            "localhost/kubetune-bench",
            "--tag",
            tag,
            "--context",
            str(context),
            "--report",
            str(report),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started, json.loads(report.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="start from empty image storage")
    args = parser.parse_args()
    if args.fresh:
        subprocess.run(["buildah", "rm", "--all"], check=False, capture_output=True)
        subprocess.run(["buildah", "rmi", "--all", "--force"], check=False, capture_output=True)
    out: dict = {"fresh": args.fresh}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        context = images.copy_context(Path(tmp) / "context")
        seconds, rows = build(context, "first", Path(tmp) / "first.json")
        out["first_build_seconds"] = round(seconds, 1)
        out["images"] = {
            r["tag"]: {"MB": round(r["bytes"] / 1e6), "seconds": r["seconds"]} for r in rows
        }
        seconds, _ = build(context, "unchanged", Path(tmp) / "unchanged.json")
        out["unchanged_rebuild_seconds"] = round(seconds, 1)
        touched = context / "operator" / "kubetune" / "api" / "__init__.py"
        touched.write_text(touched.read_text() + "\n# a code change\n")
        seconds, rows = build(context, "touched", Path(tmp) / "touched.json")
        out["rebuild_after_one_py_change_seconds"] = round(seconds, 1)
        out["rebuild_per_image_seconds"] = {r["name"]: r["seconds"] for r in rows}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
