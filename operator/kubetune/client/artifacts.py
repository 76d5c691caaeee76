"""What the client reads and writes in object storage: a run's archived trainer.log, its files
(`pull`, checked against its manifest.json) and latest.json (`rollback`).

Storage is reached exactly as the trainer reaches it (kubetune_trainer.storage): the output's
credentials are the keys of the Secret spec.output.credentialsSecret names, read with the
user's own identity, under the same routes; with no Secret named (or for a bare output URI) the
user's own environment (AWS_*, GOOGLE_*, AZURE_* and their default chains). The Secret is
shared in the namespace, so its keys pass the trainer's checks: a key that names a file, a
command or a credential endpoint is refused, never followed.

latest.json is replaced only by the trainer's conditional write (kubetune_trainer.promotion),
so a rollback and a promotion at the same moment cannot both win: the one whose write lands
first decides, the other re-reads and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore

from kubetune.api import (
    CREDENTIAL_ENV,
    RUN_ID_LENGTH,
    RUN_RECORD,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneSchedule,
    PromotionRecord,
    Rollback,
    credential_routes,
    run_prefix,
)
from kubetune.client.kube import ClientError, Conflict, NotFound
from kubetune_trainer import promotion, storage
from kubetune_trainer.errors import SpecError, TrainerError

if TYPE_CHECKING:
    from kubetune.client import Client

LOG_FILE = "trainer.log"  # kubetune_trainer.pipeline.LOG_FILE
MANIFEST = "manifest.json"
# What `pull` fetches besides the model: the run's report, its loss curve, its metrics and result.
PULLED = ("report.md", "loss.png", "metrics.json", "result.json")
MODEL_DIRS = ("adapter/", "merged/")
CHUNK = 1 << 20
# The environment variables obstore reads credentials and endpoints from (object_store's
# from_env for each cloud).
AMBIENT = ("AWS_", "AZURE_", "GOOGLE_", "OBJECT_STORE_")
MAX_REASON = 1024  # Rollback.reason's bound
RUN_ID = re.compile(rf"^[0-9a-f]{{{RUN_ID_LENGTH}}}$")  # what make_run_id makes


class ChecksumMismatch(ClientError):
    pass


@contextmanager
def output_credentials(client: Client, namespace: str, spec: FineTuneJobSpec) -> Iterator[None]:
    """The output's Secret (read as the user), routed as the trainer routes it."""
    environ: dict[str, str] = {}
    secret = spec.output.credentials_secret
    if secret:
        prefix = CREDENTIAL_ENV["output"]
        keys = client.kube.secret(namespace, secret)
        environ = {prefix + k: v for k, v in keys.items()}
    routes = [r for r in credential_routes(spec) if r[0] == spec.output.uri]
    storage.use_credentials(routes, environ)
    # obstore fills in what a config leaves out from the environment (a session token, a
    # bearer token): with a Secret's keys, none of the user's own may join them, or a Secret
    # that names an endpoint would carry the user's credentials to it.
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if secret and k.startswith(AMBIENT)}
    try:
        yield
    finally:
        os.environ.update(hidden)
        storage.use_credentials([])


def _storage_error(exc: Exception) -> ClientError:
    return ClientError(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)


def archived_log(client: Client, job: FineTuneJob, rank: int) -> Iterator[str]:
    """The run's trainer.log as it stored it beside its artifacts (rank 0's)."""
    run_id = job.status.run_id if job.status else None
    assert run_id is not None
    name = job.metadata.name
    if rank != 0:
        raise NotFound(
            f"the pod of rank {rank} of {name} is gone and only rank 0's log is archived "
            f"(kubetune logs {name})"
        )
    uri = storage.join(run_prefix(job.spec.output.uri, run_id), LOG_FILE)
    try:
        with output_credentials(client, job.metadata.namespace or client.namespace, job.spec):
            data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise NotFound(
            f"no log of {name}: its trainer pod is gone and {uri} does not exist (a run stores "
            f"its log when it ends; kubetune describe {name} says how it went)"
        ) from None
    except (TrainerError, SpecError) as exc:
        raise _storage_error(exc) from exc
    yield from data.decode("utf-8", "replace").splitlines()


@dataclass(frozen=True)
class Pulled:
    """What `pull` wrote: the directory, the run, and each file with its size."""

    directory: Path
    run_id: str
    files: list[tuple[str, int]]


def _manifest(run: str) -> dict[str, dict[str, Any]]:
    uri = storage.join(run, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise NotFound(
            f"{uri} does not exist: the run has not published its files (not finished yet?), "
            "or they were deleted"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ClientError(f"{uri} is not a manifest (not JSON): {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        raise ClientError(f"{uri} is not a manifest: it has no files list")
    return {f["path"]: f for f in files if isinstance(f, dict) and isinstance(f.get("path"), str)}


def _fetch(uri: str, dest: Path) -> str:
    """Streams one object into dest; its sha256."""
    loc = storage.locate(uri)
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    got = obstore.get(loc.store, loc.key())
    with dest.open("wb") as out:
        for chunk in got.stream(min_chunk_size=CHUNK):
            out.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


def pull(
    client: Client, name: str | None, to: Path | None, promoted: str | None, namespace: str
) -> Pulled:
    if promoted:
        spec = None
        output = promoted
        try:
            champion = promotion.read_champion(output)
        except (TrainerError, SpecError, obstore.exceptions.BaseError) as exc:
            raise _storage_error(exc) from exc
        if champion.record is None:
            raise NotFound(f"nothing is promoted at {output}: it has no latest.json")
        run_id, label = champion.record.run_id, "promoted"
        if not RUN_ID.match(run_id):
            raise ClientError(f"{output}/latest.json names run {run_id!r}, not a run id")
        return _pull_run(run_prefix(output, run_id), run_id, to or Path(f"{label}-{run_id}"))
    assert name is not None
    job = client.get(name, namespace)
    run_id = job.status.run_id if job.status else None
    if not run_id:
        raise NotFound(f"FineTuneJob {name} has no run yet (kubetune describe {name} says why)")
    spec = job.spec
    with output_credentials(client, namespace, spec):
        return _pull_run(
            run_prefix(spec.output.uri, run_id), run_id, to or Path(f"{name}-{run_id}")
        )


def _pull_run(run: str, run_id: str, directory: Path) -> Pulled:
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        raise ClientError(f"{directory} exists and is not empty; choose another --to")
    try:
        entries = _manifest(run)
        wanted = [p for p in sorted(entries) if p in PULLED or p.startswith(MODEL_DIRS)]
        directory.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            files = []
            for path in wanted:
                target = (partial / path).resolve()
                if partial.resolve() not in target.parents:
                    raise ClientError(f"{run}/{MANIFEST} names a file outside the run: {path!r}")
                try:
                    digest = _fetch(storage.join(run, path), target)
                except FileNotFoundError:
                    raise NotFound(
                        f"{run}/{path} is listed in the run's manifest but gone from storage: the "
                        "run's artifacts were deleted (or are being rewritten); nothing pulled"
                    ) from None
                expected = entries[path].get("sha256")
                if digest != expected:
                    raise ChecksumMismatch(
                        f"{run}/{path}: sha256 {digest}, but the run's manifest says {expected}: "
                        "the file changed after the run published it; nothing pulled"
                    )
                files.append((path, target.stat().st_size))
            (partial / MANIFEST).write_text(json.dumps({"runId": run_id, "files": [
                entries[p] for p in wanted]}, indent=2))  # fmt: skip
            if directory.exists():
                directory.rmdir()
            partial.rename(directory)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except (TrainerError, SpecError, obstore.exceptions.BaseError) as exc:
        raise _storage_error(exc) from exc
    return Pulled(directory, run_id, files)


@dataclass(frozen=True)
class RolledBack:
    """A rollback done: latest.json's new record, and the notification's fate (delivered,
    or why not)."""

    output_uri: str
    record: PromotionRecord
    notification: str
    schedule: str | None = None  # for a schedule named: whether its status will show it


def _target(client: Client, target: str, namespace: str) -> tuple[str, FineTuneJobSpec | None, str]:
    """(output URI, the spec whose output Secret and webhook apply, what it was named by)."""
    from kubetune.api import SCHEDULE_PLURAL

    if "://" in target:
        return target, None
    raw = client.kube.get(namespace, target, SCHEDULE_PLURAL)
    schedule = FineTuneSchedule.model_validate(
        {k: v for k, v in raw.items() if k != "status"}, by_name=False
    )
    spec = schedule.spec.job_template.spec
    return spec.output.uri, spec


def rollback(
    client: Client, target: str, to: str | None, reason: str | None, namespace: str
) -> RolledBack:
    if reason is not None and len(reason) > MAX_REASON:
        raise ClientError(f"--reason is at most {MAX_REASON} characters (it is {len(reason)})")
    output, spec = _target(client, target, namespace)
    try:
        if spec is not None:
            with output_credentials(client, namespace, spec):
                record = _rollback(client, output, to, reason)
        else:
            record = _rollback(client, output, to, reason)
    except (TrainerError, SpecError, obstore.exceptions.BaseError) as exc:
        raise _storage_error(exc) from exc
    note = "not sent: "
    if spec is None and record.job and record.namespace == namespace:
        try:  # the job of this namespace that made the run names the webhook
            job = client.get(record.job, namespace).spec
            spec = job if job.output.uri.rstrip("/") == output.rstrip("/") else None
        except ClientError as exc:
            note += f"the run's FineTuneJob cannot be read ({exc})"
    elif spec is None:  # a record may name any job: only this namespace's is asked
        note += f"the run's FineTuneJob is not in namespace {namespace} (-n)"
    if spec is not None:
        note = _notify(client, namespace, spec, record, output) or "not sent: no webhook"
    elif note == "not sent: ":
        note += "its FineTuneJob writes to another output now"
    shown = None if "://" in target else _annotate(client, namespace, target, record)
    return RolledBack(output, record, note, shown)


def _annotate(client: Client, namespace: str, schedule: str, record: PromotionRecord) -> str:
    """Ask the operator to show the rollback in the schedule's status: it checks the
    annotation against latest.json before it does (a RolledBack Event, else RollbackNotFound)."""
    from kubetune.api import ROLLBACK_ANNOTATION, SCHEDULE_PLURAL

    at = record.promoted_at.strftime("%Y-%m-%dT%H:%M:%SZ") if record.promoted_at else ""
    body = {"metadata": {"annotations": {ROLLBACK_ANNOTATION: f"{record.run_id}@{at}"}}}
    try:
        client.kube.patch(namespace, schedule, body, SCHEDULE_PLURAL)
    except ClientError as exc:
        return f"its status will not show the rollback: {exc}"
    return (
        f"annotated {ROLLBACK_ANNOTATION}; its status shows the rollback once the operator "
        "has checked latest.json"
    )


def _rollback(client: Client, output: str, to: str | None, reason: str | None) -> PromotionRecord:
    current = promotion.read_champion(output).record
    if current is None:
        raise NotFound(f"nothing is promoted at {output} (no latest.json): nothing to roll back")
    if to is None and current.rollback is not None:
        raise ClientError(
            f"latest.json at {output} is itself a rollback (from run "
            f"{current.rollback.from_run_id}, by {current.rollback.by}): its previous run is the "
            "one rolled back from; give --to RUN_ID"
        )
    dest = to or current.previous_run_id
    if not dest or not RUN_ID.match(dest):
        raise ClientError(
            f"latest.json at {output} names run {current.run_id} and no run before it: give "
            "--to RUN_ID (8 hex characters)"
        )
    if dest == current.run_id:
        raise ClientError(f"run {dest} is already the promoted run of {output}")
    run = run_prefix(output, dest)
    entries = _manifest(run)
    stored = entries.get(RUN_RECORD)
    if stored is None:
        raise ClientError(
            f"run {dest} cannot be rolled back to: its manifest lists no {RUN_RECORD} (only a "
            "run that was promoted has one, and only since kubetune wrote it)"
        )
    for path in entries:  # a run whose artifacts are gone is no model to serve
        if not storage.exists(storage.join(run, path)):
            raise NotFound(f"run {dest}'s {path} is gone from {run}: it cannot be served again")
    body = storage.read_bytes(storage.join(run, RUN_RECORD))
    if hashlib.sha256(body).hexdigest() != stored.get("sha256"):
        raise ChecksumMismatch(
            f"{run}/{RUN_RECORD} does not match the run's manifest: it changed after the run "
            "published it; not rolled back"
        )
    record = PromotionRecord.model_validate_json(body)
    # The bucket is writable by whoever holds its keys, the manifest too: the record must be
    # this run's, and name only this run's files.
    own = [record.adapter_uri, record.merged_uri, record.manifest_uri]
    if record.run_id != dest or any(
        uri and (not uri.startswith(run + "/") or "/../" in uri) for uri in own
    ):
        raise ClientError(
            f"{run}/{RUN_RECORD} is not run {dest}'s record (it names run {record.run_id} or "
            "files outside the run): not rolled back"
        )
    record = record.model_copy(
        update={
            "promoted_at": datetime.now(UTC).replace(microsecond=0),
            "rollback": Rollback(
                by=client.kube.whoami(), reason=reason, from_run_id=current.run_id
            ),
        }
    )

    def decide(now: PromotionRecord | None) -> str | None:
        if (
            now is not None
            and now.run_id == current.run_id
            and now.promoted_at == current.promoted_at
        ):
            return None
        shown = f"run {now.run_id}" if now is not None else "nothing"
        return (
            f"latest.json at {output} changed meanwhile ({shown} is promoted now, not run "
            f"{current.run_id}); nothing rolled back: look at it again, then roll back from it"
        )

    outcome = promotion.promote(output, record, decide)
    if not outcome.promoted:
        raise Conflict(outcome.reason)
    return record.model_copy(update={"previous_run_id": current.run_id})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _notify(
    client: Client, namespace: str, spec: FineTuneJobSpec, record: PromotionRecord, output: str
) -> str | None:
    """The promotion's notification for the run now promoted again, signed with the job's
    signing key (read as the user), POSTed from here. Its id is the rollback's own: a receiver
    that deduplicates by webhook-id would drop a second event with the run's id."""
    from kubetune.notify import promotion_event, signed, signing_key

    hook = spec.notify.webhook if spec.notify else None
    if hook is None:
        return None
    url = hook.url
    try:
        if hook.url_secret is not None:
            url = client.kube.secret(namespace, hook.url_secret.name).get(hook.url_secret.key)
        key = None
        if hook.signing_secret is not None:
            value = client.kube.secret(namespace, hook.signing_secret.name).get(
                hook.signing_secret.key, ""
            )
            key = signing_key(value)
    except (ClientError, ValueError) as exc:
        return f"not sent: {exc}"
    if not url:
        return "not sent: the webhook's URL Secret has no such key"
    if not url.startswith(("https://", "http://")):
        return "not sent: the webhook's URL is not http(s)"
    now = datetime.now(UTC)
    event_id = f"{record.run_id}-rollback-{int(now.timestamp())}"
    message = signed(promotion_event(record, output), key, event_id, now)
    request = urllib.request.Request(url, data=message.body, headers=message.headers)
    try:  # no redirects: the signed event goes to the URL the job names, nowhere else
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=10) as response:
            return f"delivered to the webhook (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        return f"not delivered: the webhook answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"not delivered: {exc}"
