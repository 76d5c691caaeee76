"""Reading a finished run's result.json from object storage, for when no pod carries the result.

The trainer writes its result twice: compact, as the pod's termination message, and in full as
`<output.uri>/runs/<runId>/result.json`, before `manifest.json` (written last). The pod can be gone
before the operator reads it: the Job's ttlSecondsAfterFinished, the pod garbage collector, a
deleted Job, an operator that was down. Then the operator reads result.json, with the credentials
from the same Secret the trainer used (spec.output.credentialsSecret, in the job's namespace), and
trusts it only when the run's manifest is there.
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
from obstore.store import from_url
from pydantic import ValidationError

from kubetune.api import TrainerResult, run_prefix
from kubetune.controller.errors import Retry

log = logging.getLogger("kubetune.operator")

# Secret keys that configure a store (the trainer reads the same names from its environment).
CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def _store(root: str, credentials: dict[str, str]) -> Any:
    config = {k.lower(): v for k, v in credentials.items() if k.startswith(CREDENTIAL_PREFIXES)}
    options: dict[str, Any] = {"timeout": "10s", "connect_timeout": "5s"}
    if credentials.get("AWS_ENDPOINT_URL", "").startswith("http://") or root.startswith("http://"):
        options["allow_http"] = True
    # A reconcile waits for this read: retry briefly; the work queue retries the reconcile.
    retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
    return from_url(root, config=config or None, client_options=options, retry_config=retry)


def read_result(output_uri: str, run_id: str, credentials: dict[str, str]) -> TrainerResult | None:
    """The run's result.json when its manifest is there; None when it is not or cannot be read."""
    parts = urlsplit(run_prefix(output_uri, run_id))
    if parts.scheme not in ("s3", "gs", "az"):
        return None  # file:// lies inside the trainer pod; http(s) is read-only input
    root, prefix = f"{parts.scheme}://{parts.netloc}", parts.path.strip("/")
    try:
        store = _store(root, credentials)
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
