"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune.api import ExitCode


def _write(text: str, output: str | None) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune.codegen.crd import KINDS, render_crd

    (kind,) = [k for k in KINDS if k.singular == args.kind]
    _write(render_crd(kind), args.output)
    return 0


def cmd_api_docs(args: argparse.Namespace) -> int:
    from kubetune.codegen.apidoc import render_api_docs

    _write(render_api_docs(), args.output)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import json

    from kubetune.manifests import check_against_cluster, load_manifests, settings_from_values

    settings = None
    if args.settings:
        settings, values = settings_from_values(args.settings)
        if settings is None:  # nothing is checked against settings that cannot be read
            if args.output == "json":
                print(json.dumps([values.to_json()], indent=2))
            else:
                for problem in values.problems:
                    print(problem, file=sys.stderr)
            return int(ExitCode.INVALID_SPEC)
    failed = False
    report = []
    docs = [doc for path in args.files for doc in load_manifests(path)]
    check_against_cluster(docs, settings, args.settings or "")
    for doc in docs:
        failed = failed or bool(doc.problems)
        report.append(doc.to_json())
        if args.output == "json":
            continue
        for problem in doc.problems:
            print(problem, file=sys.stderr)
        for warning in doc.warnings:
            print(str(warning).replace(": ", ": warning: ", 1), file=sys.stderr)
        if doc.valid:
            under = f" under FineTuneProfile {doc.under_profile}" if doc.under_profile else ""
            warned = f" ({len(doc.warnings)} warning{'s' * (len(doc.warnings) > 1)})"
            print(
                f"{doc.source}:{doc.line}: {doc.kind} {doc.display_name} is valid{under}"
                + (warned if doc.warnings else "")
            )
        elif doc.skipped_kind and args.verbose:
            print(f"{doc.source}:{doc.line}: skipped {doc.skipped_kind} (not a kubetune kind)")
    if args.output == "json":
        print(json.dumps(report, indent=2))
    return int(ExitCode.INVALID_SPEC) if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from kubetune.local import run

    return run(args)


def cmd_operator(args: argparse.Namespace) -> int:
    import logging
    import re

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from kubetune.api import describe_errors
    from kubetune.controller.settings import OperatorSettings

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        settings = OperatorSettings()
    except ValidationError as exc:
        for line in describe_errors(exc):
            field, _, problem = line.partition(": ")
            print(f"KUBETUNE_{field.upper()}: {problem}", file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    except SettingsError as exc:  # a list or object setting that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1).upper() if field else "?"
        print(f'KUBETUNE_{name}: must be JSON, e.g. ["ml", "research"]', file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    from kubetune.controller.errors import NoCredentials
    from kubetune.controller.handlers import run

    try:
        run(settings)
    except NoCredentials as exc:
        print(f"kubetune operator: {exc}", file=sys.stderr)
        return int(ExitCode.RUNTIME_ERROR)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(
        prog="kubetune", description="Fine-tune LLMs from a FineTuneJob manifest."
    )
    parser.add_argument("--version", action="version", version=f"kubetune {version('kubetune')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "validate",
        help="check FineTuneJob, FineTuneProfile and FineTuneSchedule manifests",
        description=(
            "Checks FineTuneJob, FineTuneProfile and FineTuneSchedule manifests as the API "
            "server would admit them (kubectl's strict field validation), a schedule's cron "
            "expression and time zone, a job (or a schedule's template) against a profile "
            "given beside it and against the operator's policy (the chart's defaults, or "
            "--settings): one `file:line: field: problem` line per problem; what only the "
            "cluster can decide (a profile not given) is a warning. Exit codes: 0 all valid "
            "(warnings too), 2 a problem (or no kubetune object at all)."
        ),
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - reads standard input")
    p.add_argument("-v", "--verbose", action="store_true", help="also list skipped documents")
    p.add_argument(
        "--settings",
        metavar="VALUES.yaml",
        help="the chart's values your cluster was installed with (helm get values RELEASE): "
        "its trainer.image, allowedImages, maxGpusPerJob, allowFileOutput and requireProfile "
        "are checked; by default the chart's defaults",
    )
    p.add_argument(
        "-o",
        "--output",
        choices=["text", "json"],
        default="text",
        help="json: one object per document on standard output (file, line, kind, name, "
        "valid, problems with line and field)",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "run",
        help="run a FineTuneJob on this machine with the real trainer",
        description=(
            "Runs a FineTuneJob locally: validation, data, training with a progress bar, "
            "evaluation against the base model, gates, artifacts. Exit codes: 0 succeeded "
            "(promoted), 1 runtime failure, 2 invalid spec, 3 data error, 4 gates failed, "
            "5 training diverged, 6 another process of a distributed run lost."
        ),
    )
    p.add_argument("file", metavar="JOB.yaml")
    p.add_argument("--name", help="the FineTuneJob to run when the file holds several")
    p.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a field, e.g. --set spec.hyperparameters.maxSteps=20 (repeatable); "
        "setting epochs or maxSteps clears the other",
    )
    p.add_argument("--model", help="override spec.model.uri (a URI or a local path)")
    p.add_argument("--dataset", help="override spec.dataset.uri (a URI or a local path)")
    p.add_argument(
        "--output",
        metavar="DIR",
        help="override spec.output.uri (a URI or a local directory); as in the cluster, a run "
        "is written to DIR/runs/<runId>/ and a promoted one is named by DIR/latest.json",
    )
    p.add_argument("--run-id", help="use this run id (8 hex characters) instead of the derived one")
    p.add_argument("--fresh", action="store_true", help="start a new run instead of resuming")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on 127.0.0.1"
    )
    p.add_argument("--workdir", help="local working directory (default ~/.cache/kubetune)")
    p.add_argument(
        "--print-notification",
        action="store_true",
        help="when the run is promoted, print the CloudEvent the operator would POST to "
        "spec.notify.webhook (headers and body; unsigned here: the key is the cluster's)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine (DDP, or FSDP for full; one per GPU, or "
        "N CPU processes over gloo), as a pod of a distributed run does; the batch stays "
        "spec.hyperparameters.batchSize",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "operator",
        help="run the operator against the current cluster (in-cluster or kubeconfig)",
        description="Runs the FineTuneJob operator. Settings come from KUBETUNE_* variables "
        "(see docs/operator.md); credentials from the service account or KUBECONFIG.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("crd", help="print a CRD generated from the API types")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument(
        "--kind",
        choices=["finetunejob", "finetuneprofile", "finetuneschedule"],
        default="finetunejob",
        help="which kind's CRD (default: finetunejob)",
    )
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("api-docs", help="print the API reference (docs/api.md)")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_api_docs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
