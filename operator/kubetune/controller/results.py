"""Reading what the trainer wrote to a tenant's object storage: a finished run's result.json, for
when no pod carries the result, and an output's latest.json, for a schedule's rollback.

The trainer writes its result twice: compact, as the pod's termination message, and in full as
`<output.uri>/runs/<runId>/result.json`, before `manifest.json` (written last). The pod can be gone
before the operator reads it: the Job's ttlSecondsAfterFinished, the pod garbage collector, a
deleted Job, an operator that was down. Then the operator reads result.json, with the credentials
from the same Secret the trainer used (spec.output.credentialsSecret, in the job's namespace), and
trusts it only when the run's manifest is there. A FineTuneSchedule whose owner rolled back
(`kubetune rollback SCHEDULE`, which annotates it) has its output's latest.json read the same way,
once per annotation, and its status shows the rollback only when latest.json records it.

The Secret is the tenant's: only the keys `kubetune.api.storage_keys` allows configure the client
(never a token file, a credential endpoint or a command), and the operator lends a tenant's store
no identity of its own: without credentials in the Secret it does not read, and obstore is kept
from filling in credentials from the operator's environment (for s3:// the credentials come
through a credential provider, which replaces obstore's environment chain).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import from_url
from pydantic import BaseModel, ValidationError

from kubetune.api import PromotionRecord, TrainerResult, run_prefix
from kubetune.api.promotion import LATEST
from kubetune.api.storage_keys import (
    AZURE_ACCOUNT_KEYS,
    AZURE_SAS_KEYS,
    AZURE_SIGNING_KEYS,
    StorageConfig,
    storage_config,
)
from kubetune.controller.errors import Retry

log = logging.getLogger("kubetune.operator")

MAX_RESULT_BYTES = 1 << 20  # a result.json is a few KiB; a bigger one is not the trainer's
M = TypeVar("M", bound=BaseModel)
_CREDENTIAL_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "gs": ("GOOGLE_BEARER_TOKEN",),
    "az": AZURE_SIGNING_KEYS,
}


def _provider(storage: StorageConfig) -> Any:
    """The Secret's own credentials as an obstore credential provider, which replaces obstore's
    chain (the environment, a token file, a metadata server): nothing of the operator's own is
    added to a request for a tenant's store. None: the config itself carries what signs (a GCS
    service account key) or nothing signs (skip_signature)."""
    keys = storage.config

    def get(*names: str) -> str | None:
        return next((keys[n] for n in names if keys.get(n)), None)

    if storage.scheme == "s3" and get("AWS_ACCESS_KEY_ID") and get("AWS_SECRET_ACCESS_KEY"):
        found: dict[str, Any] = {
            "access_key_id": keys["AWS_ACCESS_KEY_ID"],
            "secret_access_key": keys["AWS_SECRET_ACCESS_KEY"],
            "token": get("AWS_SESSION_TOKEN"),
        }
    elif storage.scheme == "gs" and get("GOOGLE_BEARER_TOKEN"):
        found = {"token": keys["GOOGLE_BEARER_TOKEN"]}
    elif storage.scheme == "az" and (key := get(*AZURE_ACCOUNT_KEYS)):
        found = {"access_key": key}
    elif storage.scheme == "az" and (sas := get(*AZURE_SAS_KEYS)):
        found = {"sas_token": sas}
    elif storage.scheme == "az" and get("AZURE_STORAGE_TOKEN"):
        found = {"token": keys["AZURE_STORAGE_TOKEN"]}
    else:
        return None
    return lambda: {**found, "expires_at": None}


def _store(root: str, storage: StorageConfig) -> Any:
    """A client for the tenant's store, or None when the Secret holds nothing the operator may
    sign with: its own credentials only (the Azure client-secret flow is left to the trainer:
    obstore would pick among it and whatever identity the operator's environment offers)."""
    options: dict[str, Any] = {"timeout": "10s", "connect_timeout": "5s"}
    if storage.allow_http:
        options["allow_http"] = True
    # A reconcile waits for this read: retry briefly; the work queue retries the reconcile.
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
    provider = _provider(storage)
    unsigned = storage.unsigned
    keyed = storage.scheme == "gs" and bool(storage.config.get("GOOGLE_SERVICE_ACCOUNT_KEY"))
    if provider is None and not unsigned and not keyed:
        return None
    config = {
        k.lower(): v for k, v in storage.config.items() if k not in _CREDENTIAL_KEYS[storage.scheme]
    }
    for name in config:
        if name.endswith("_skip_signature"):  # as checked above, in obstore's spelling
            config[name] = "true" if unsigned else "false"
    extra = {"credential_provider": provider} if provider is not None else {}
    return from_url(root, config=config, client_options=options, retry_config=retry, **extra)


def _open(uri: str, credentials: dict[str, str], what: str) -> tuple[Any, str] | None:
    """The tenant's store holding `uri` (s3, gs, az), configured only from the Secret's own
    credentials, and the key prefix; None (logged) when the operator must not or cannot read
    it."""
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "gs", "az"):
        return None  # file:// lies inside the trainer pod; http(s) is read-only input
    root, prefix = f"{parts.scheme}://{parts.netloc}", parts.path.strip("/")
    storage = storage_config(parts.scheme, credentials)
    if storage.refused:
        log.warning("%s not read: %s", what, storage.refusal("the Secret"))
        return None
    if not storage.signs_itself:
        # The operator's own identity (its ServiceAccount, IRSA, a metadata server) is never
        # lent to a tenant's bucket: without credentials in the Secret, nothing is read.
        log.warning(
            "%s not read: spec.output.credentialsSecret holds no credentials of its own, and the "
            "operator lends its identity to no tenant's store",
            what,
        )
        return None
    try:
        store = _store(root, storage)
    except Exception as exc:  # obstore refused the configuration: the tenant's to fix
        log.warning("%s not read: the Secret's storage config: %s", what, type(exc).__name__)
        return None
    if store is None:
        log.warning(
            "%s not read: spec.output.credentialsSecret holds no credentials the operator signs "
            "with (keys, a SAS, a bearer token or a service account key)",
            what,
        )
        return None
    return store, prefix


def _small(store: Any, key: str, what: str) -> bytes | None:
    """A small object's bytes; None when it is bigger than any file the trainer writes there."""
    meta = obstore.head(store, key)
    size = int(meta["size"])
    if not 0 < size <= MAX_RESULT_BYTES:
        log.warning("%s not read: %d bytes", what, size)
        return None
    # A range: a store that said one size in HEAD and sends more is refused, not read.
    return bytes(obstore.get_range(store, key, start=0, end=size))


def _read(
    uri: str,
    name: str,
    credentials: dict[str, str],
    what: str,
    model: type[M],
    manifest_first: bool = False,
) -> M | None:
    """`<uri>/<name>` as `model` (with manifest_first, only once `<uri>/manifest.json` is
    there: a run's files count once the run published them); None when it is not there or
    cannot be read for good; Retry when the store may answer later."""
    opened = _open(uri, credentials, what)
    if opened is None:
        return None
    store, prefix = opened
    try:
        if manifest_first:
            obstore.head(store, f"{prefix}/manifest.json")
        body = _small(store, f"{prefix}/{name}", what)
        return None if body is None else model.model_validate_json(body)
    except (FileNotFoundError, NotFoundError):
        return None
    except (PermissionDeniedError, UnauthenticatedError, ValidationError, ValueError) as exc:
        # Permanent: given up rather than waited for forever. The error's class only: its text
        # can quote what the tenant's store answered.
        log.warning("%s not readable: %s", what, type(exc).__name__)
        return None
    except (BaseError, OSError) as exc:
        # A timeout, a 5xx, a connection refused: read it again later (for a run, before its
        # final status is written: a final status is never revisited).
        raise Retry(f"{what} not read yet: {exc}", 5.0) from exc


def read_result(output_uri: str, run_id: str, credentials: dict[str, str]) -> TrainerResult | None:
    """The run's result.json when its manifest is there; None when it is not or cannot be read."""
    what = f"result.json of run {run_id}"
    run = run_prefix(output_uri, run_id)
    return _read(run, "result.json", credentials, what, TrainerResult, manifest_first=True)


def read_latest(output_uri: str, credentials: dict[str, str]) -> PromotionRecord | None:
    """The output's latest.json (what is promoted there now), or None."""
    what = f"latest.json of {output_uri}"
    return _read(output_uri.rstrip("/"), LATEST, credentials, what, PromotionRecord)
