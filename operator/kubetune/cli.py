"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def _cluster(verb: str, args: argparse.Namespace, act: Any) -> int:
    """Runs act(client) for a cluster verb; a ClientError is one line on stderr (exit 1),
    an invalid manifest its problems (exit 2)."""
    from kubetune.client import Client, ClientError, Invalid

    try:
        client = Client(args.namespace, context=args.context, kubeconfig=args.kubeconfig)
        return int(act(client) or 0)
    except Invalid as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    except (ClientError, TimeoutError) as exc:
        print(f"kubetune {verb}: {exc}", file=sys.stderr)
        return int(ExitCode.RUNTIME_ERROR)
    except KeyboardInterrupt:
        return 130


def _duration(text: str) -> float:
    """30m, 1h30m, 90s, 600 (seconds): as kubectl's --timeout."""
    import re

    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30m, 1h, 90s)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def cmd_submit(args: argparse.Namespace) -> int:
    from kubetune.api import FineTuneJob
    from kubetune.client import ClientError, Invalid
    from kubetune.client.manifests import bodies
    from kubetune.client.show import follow
    from kubetune.manifests import settings_from_values

    policy = None
    if args.settings:
        policy, values = settings_from_values(args.settings)
        if policy is None:
            for problem in values.problems:
                print(problem, file=sys.stderr)
            return int(ExitCode.INVALID_SPEC)
    try:
        docs = bodies(args.file, policy)
    except Invalid as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    except ClientError as exc:
        print(f"kubetune submit: {exc}", file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)
    jobs = [d for d in docs if d.get("kind") == "FineTuneJob"]
    if args.wait and len(jobs) != 1:
        print(
            f"kubetune submit: --wait follows one FineTuneJob; {args.file} has {len(jobs)}",
            file=sys.stderr,
        )
        return int(ExitCode.INVALID_SPEC)

    def act(client: Any) -> int:
        created = client.create_all(docs, args.namespace)
        for obj in created:
            kind = "finetunejob" if isinstance(obj, FineTuneJob) else "finetuneschedule"
            print(f"{kind}.kubetune.dev/{obj.metadata.name} created", file=sys.stderr)
            if not args.wait:
                print(obj.metadata.name)
        if not args.wait:
            return 0
        (job,) = [c for c in created if isinstance(c, FineTuneJob)]
        return follow(client, job.metadata.name, job.metadata.namespace, args.timeout)

    return _cluster("submit", args, act)


def cmd_get(args: argparse.Namespace) -> int:
    import json

    import yaml

    from kubetune.client.show import table

    def act(client: Any) -> int:
        jobs = [client.get(args.name)] if args.name else client.list(
            all_namespaces=args.all_namespaces)  # fmt: skip
        if args.output in ("yaml", "json"):
            dumped = [j.model_dump(mode="json", by_alias=True, exclude_none=True) for j in jobs]
            data: Any = dumped[0] if args.name else {"apiVersion": "v1", "kind": "List",
                                                      "items": dumped}  # fmt: skip
            text = json.dumps(data, indent=2) if args.output == "json" else yaml.safe_dump(
                data, sort_keys=False)  # fmt: skip
            print(text.rstrip())
        elif not jobs:
            where = "any namespace" if args.all_namespaces else f"namespace {client.namespace}"
            print(f"No FineTuneJobs in {where}.", file=sys.stderr)
        else:
            print(table(jobs, namespaces=args.all_namespaces))
        return 0

    return _cluster("get", args, act)


def cmd_describe(args: argparse.Namespace) -> int:
    from kubetune.client.show import describe

    return _cluster("describe", args, lambda c: print(describe(c.describe(args.name))))


def cmd_wait(args: argparse.Namespace) -> int:
    from kubetune.api import PHASES
    from kubetune.client import Ended

    key, _, phase = args.condition.partition("=")
    if key != "phase" or phase not in PHASES:
        print(
            f"kubetune wait: --for {args.condition}: expected phase=PHASE, one of "
            f"{', '.join(PHASES)}",
            file=sys.stderr,
        )
        return int(ExitCode.INVALID_SPEC)

    def act(client: Any) -> int:
        try:
            job = client.wait(args.name, phase=phase, timeout=args.timeout)
        except Ended as exc:
            print(f"kubetune wait: {exc}", file=sys.stderr)
            return int(ExitCode.RUNTIME_ERROR)
        print(f"finetunejob.kubetune.dev/{job.metadata.name} condition met (phase={phase})")
        return 0

    return _cluster("wait", args, act)


def cmd_cancel(args: argparse.Namespace) -> int:
    return _cluster("cancel", args, lambda c: print(c.cancel(args.name, delete=args.delete)))


def cmd_resume(args: argparse.Namespace) -> int:
    return _cluster("resume", args, lambda c: print(c.resume(args.name)))


def cmd_logs(args: argparse.Namespace) -> int:
    def act(client: Any) -> int:
        for line in client.logs(args.name, follow=args.follow, rank=args.rank):
            print(line, flush=args.follow)
        return 0

    return _cluster("logs", args, act)


def cmd_pull(args: argparse.Namespace) -> int:
    from pathlib import Path

    if bool(args.name) == bool(args.promoted):
        print("kubetune pull: give a FineTuneJob NAME or --promoted OUTPUT_URI", file=sys.stderr)
        return int(ExitCode.INVALID_SPEC)

    def act(client: Any) -> int:
        to = Path(args.to) if args.to else None
        pulled = client.pull(args.name, to, promoted=args.promoted)
        for path, size in pulled.files:
            print(f"  {path}  ({size:,} bytes)", file=sys.stderr)
        print(f"run {pulled.run_id}: {len(pulled.files)} files checked against its manifest",
              file=sys.stderr)  # fmt: skip
        print(pulled.directory)
        return 0

    return _cluster("pull", args, act)


def cmd_rollback(args: argparse.Namespace) -> int:
    def act(client: Any) -> int:
        done = client.rollback(args.target, to=args.to, reason=args.reason)
        record = done.record
        print(
            f"{done.output_uri}: run {record.run_id} is the promoted run again "
            f"(replacing run {record.previous_run_id})"
        )
        print(f"notification: {done.notification}")
        if done.schedule:
            print(f"schedule {args.target}: {done.schedule}")
        return 0

    return _cluster("rollback", args, act)


def _cluster_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="the namespace (default: the context's)")
    common.add_argument("--context", help="the kubeconfig context (default: the current one)")
    common.add_argument("--kubeconfig", help="the kubeconfig file (default: $KUBECONFIG, "
                        "~/.kube/config; in a pod its ServiceAccount)")  # fmt: skip
    return common


def _add_cluster_verbs(sub: Any) -> None:
    common = [_cluster_options()]
    p = sub.add_parser(
        "submit",
        parents=common,
        help="create a FineTuneJob (or FineTuneSchedule) in the cluster; --wait follows it",
        description=(
            "Checks the file as the API server would admit it (with --settings, also as "
            "`kubetune validate --settings` does), creates each FineTuneJob and "
            "FineTuneSchedule in it (generateName supported) and prints each name. With "
            "--wait, follows the one FineTuneJob with the progress bar and summary of "
            "`kubetune run` and exits as it does: 0 promoted, 1 runtime failure (or "
            "--timeout), 2 invalid spec or refused by the operator's policy or profile, "
            "3 data error, 4 gates failed, 5 training diverged."
        ),
    )
    p.add_argument("file", metavar="JOB.yaml", help="a YAML file; - reads standard input")
    p.add_argument("--wait", action="store_true", help="follow the run until it finishes")
    p.add_argument("--timeout", type=_duration, default=None, help="with --wait: give up after "
                   "this long (30m, 1h); the run goes on")  # fmt: skip
    p.add_argument(
        "--settings",
        metavar="VALUES.yaml",
        help="the chart's values your cluster "
        "was installed with: check against its policy first, as validate does",
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("get", parents=common, help="list FineTuneJobs, or show one")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser(
        "describe",
        parents=common,
        help="a FineTuneJob's conditions, pods, gates, artifacts and Events",
        description="What the run is and why it is where it is: its conditions (the profile, "
        "policy and queue verdicts), its trainer pods (why one waits), gates, artifact URIs, "
        "promotion and Events.",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("wait", parents=common, help="wait until a FineTuneJob reaches a phase")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--for", dest="condition", default="phase=Succeeded",
                   help="phase=PHASE (default phase=Succeeded); a run that ends in another "
                   "phase exits 1 at once")  # fmt: skip
    p.add_argument("--timeout", type=_duration, default=None, help="e.g. 30m (default: none)")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser(
        "cancel",
        parents=common,
        help="stop a run: suspend it (resumable), or --delete it",
        description="Suspends the run (spec.suspend): its pods are removed, its status and "
        "checkpoints stay, nothing is promoted; `kubetune resume` continues it from its last "
        "checkpoint. --delete deletes the FineTuneJob (its pods go with it; what it wrote to "
        "object storage stays). A finished run has nothing to cancel.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--delete", action="store_true", help="delete the FineTuneJob instead")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", parents=common, help="continue a suspended FineTuneJob")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser(
        "logs",
        parents=common,
        help="the trainer's log: from its pod, or archived in object storage once it is gone",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--follow", action="store_true", help="stream the live pod's log")
    p.add_argument("--rank", type=int, default=0, help="the node rank's pod (default 0)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser(
        "pull",
        parents=common,
        help="fetch a finished run's model, report, loss curve and metrics",
        description="Downloads the run's adapter/ (or merged/), report.md, loss.png, "
        "metrics.json and result.json, each checked against the run's manifest.json; a "
        "mismatch leaves nothing behind. Storage credentials: the Secret the run names "
        "(spec.output.credentialsSecret, read as you), else your environment's.",
    )
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--to", metavar="DIR", help="where (default: ./NAME-RUNID); must be empty")
    p.add_argument(
        "--promoted",
        metavar="OUTPUT_URI",
        help="the run latest.json at this output names (your credentials)",
    )
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "rollback",
        parents=common,
        help="make the previous champion the promoted run again",
        description="Rewrites <output>/latest.json to name an earlier promoted run (its "
        "previousRunId, or --to), with the conditional write the trainer uses: a promotion at "
        "the same moment and the rollback cannot both win. Records who and why in latest.json "
        "and sends the job's promotion webhook, signed, so that serving follows.",
    )
    p.add_argument("target", metavar="OUTPUT_URI|SCHEDULE")
    p.add_argument("--to", metavar="RUN_ID", help="the run to promote again")
    p.add_argument("--reason", help="why, recorded in latest.json")
    p.set_defaults(func=cmd_rollback)


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

    _add_cluster_verbs(sub)

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
