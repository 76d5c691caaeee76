"""Reading a finished run's result.json from object storage, for when no pod carries the result.

The trainer writes its result twice: compact, as the pod's termination message, and in full as
`<output.uri>/runs/<runId>/result.json`, before `manifest.json` (written last). The pod can be gone
before the operator reads it: the Job's ttlSecondsAfterFinished, the pod garbage collector, a
deleted Job, an operator that was down. Then the operator reads result.json, with the credentials
from the same Secret the trainer used (spec.output.credentialsSecret, in the job's namespace), and
trusts it only when the run's manifest is there.

The Secret is the tenant's: only the keys `kubetune.api.storage_keys` allows configure the client
(never a token file, a credential endpoint or a command), and the operator lends a tenant's store
no identity of its own: without credentials in the Secret it does not read, and obstore is kept
from filling in credentials from the operator's environment (for s3:// the credentials come
through a credential provider, which replaces obstore's environment chain).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store, from_url
from pydantic import ValidationError

from kubetune.api import TrainerResult, run_prefix
from kubetune.api.storage_keys import StorageConfig, storage_config
from kubetune.controller.errors import Retry

log = logging.getLogger("kubetune.operator")

_S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _store(root: str, bucket: str, storage: StorageConfig) -> Any:
    options: dict[str, Any] = {"timeout": "10s", "connect_timeout": "5s"}
    endpoints = [v for k, v in storage.config.items() if "ENDPOINT" in k or k.endswith("_URL")]
    if any(e.startswith("http://") for e in endpoints):
        options["allow_http"] = True
    # A reconcile waits for this read: retry briefly; the work queue retries the reconcile.
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
    if storage.scheme != "s3":
        return from_url(
            root, config=storage.obstore_config(), client_options=options, retry_config=retry
        )
    config = {k.lower(): v for k, v in storage.config.items() if k not in _S3_CREDENTIALS}
    keys = storage.config
    if not (keys.get("AWS_ACCESS_KEY_ID") and keys.get("AWS_SECRET_ACCESS_KEY")):  # unsigned
        return S3Store(bucket, config=config, client_options=options, retry_config=retry)

    def provider() -> dict[str, Any]:
        # Replaces obstore's chain: no AWS_SESSION_TOKEN, web identity or instance profile of
        # the operator's own is ever added to a request for a tenant's bucket.
        return {
            "access_key_id": keys["AWS_ACCESS_KEY_ID"],
            "secret_access_key": keys["AWS_SECRET_ACCESS_KEY"],
            "token": keys.get("AWS_SESSION_TOKEN") or None,
            "expires_at": None,
        }

    return S3Store(
        bucket,
        config=config,
        client_options=options,
        retry_config=retry,
        credential_provider=provider,
    )


def read_result(output_uri: str, run_id: str, credentials: dict[str, str]) -> TrainerResult | None:
    """The run's result.json when its manifest is there; None when it is not or cannot be read."""
    parts = urlsplit(run_prefix(output_uri, run_id))
    if parts.scheme not in ("s3", "gs", "az"):
        return None  # file:// lies inside the trainer pod; http(s) is read-only input
    root, prefix = f"{parts.scheme}://{parts.netloc}", parts.path.strip("/")
    storage = storage_config(parts.scheme, credentials)
    if storage.refused:
        log.warning("result.json of run %s not read: %s", run_id, storage.refusal("the Secret"))
        return None
    if not storage.signs_itself:
        # The operator's own identity (its ServiceAccount, IRSA, a metadata server) is never
        # lent to a tenant's bucket: without credentials in the Secret, the run ends without it.
        log.warning(
            "result.json of run %s not read: spec.output.credentialsSecret holds no credentials "
            "of its own, and the operator lends its identity to no tenant's store",
            run_id,
        )
        return None
    try:
        store = _store(root, parts.netloc, storage)
        obstore.head(store, f"{prefix}/manifest.json")
        raw = bytes(obstore.get(store, f"{prefix}/result.json").bytes())
        return TrainerResult.model_validate_json(raw)
    except (FileNotFoundError, NotFoundError):
        return None
    except (PermissionDeniedError, UnauthenticatedError, ValidationError, ValueError) as exc:
        # Permanent: the run ends without its metrics rather than waiting forever.
        log.warning("result.json of run %s not readable: %s", run_id, exc)
        return None
    except (BaseError, OSError) as exc:
        # A timeout, a 5xx, a connection refused: read it again later, before the run's final
        # status is written (a final status is never revisited).
        raise Retry(f"result.json of run {run_id} not read yet: {exc}", 5.0) from exc
