"""One storage client for every scheme: s3://, gs://, az://, file:// and https:// (obstore).

Credentials: a URI of a source whose Secret the pod loaded (the model's, the data's, the
output's, the model cache's: kubetune.api.credential_routes) is read and written with that
Secret's keys, found in the environment under the source's prefix (KUBETUNE_MODEL_AWS_ACCESS_KEY_ID,
...). Any other URI uses obstore's default chain: the standard variables (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, GOOGLE_SERVICE_ACCOUNT, AZURE_STORAGE_ACCOUNT_NAME, ...), then the pod's
identity (a web identity token: IRSA's AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE, Azure
Workload Identity's AZURE_FEDERATED_TOKEN_FILE; the metadata server: GKE Workload Identity,
EC2 instance profiles). An S3-compatible endpoint over plain http (MinIO, SeaweedFS on a private
network) is allowed when its AWS_ENDPOINT_URL says http://.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import obstore
from obstore.store import from_url

from kubetune.api import CREDENTIAL_ENV
from kubetune.api.storage_keys import ENDPOINT_KEYS, storage_config
from kubetune_trainer.errors import SpecError, TrainerError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Location:
    """A store (one bucket or root) and a key prefix inside it."""

    store: Any
    prefix: str

    def key(self, relative: str = "") -> str:
        return "/".join(p for p in (self.prefix.strip("/"), relative.strip("/")) if p)


def _store_root(uri: str) -> tuple[str, str]:
    """('s3://bucket/a/b') -> ('s3://bucket', 'a/b'); file URIs keep the whole path as prefix."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return "file:///", parts.path.lstrip("/")
    if parts.scheme in ("s3", "gs", "az", "https", "http"):
        return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/")
    raise TrainerError(f"unsupported storage URI {uri!r}")


# (URI, environment prefix) of the sources with credentials of their own; set per process.
_routes: list[tuple[str, str]] = []
# Where those prefixed keys are read: the process's environment (the trainer pod's envFrom), or
# the keys of the Secrets a client read with its user's identity (kubetune.client).
_environ: list[Mapping[str, str]] = [os.environ]


def use_credentials(
    routes: list[tuple[str, str]], environ: Mapping[str, str] | None = None
) -> None:
    """Which URIs take which source's credentials (kubetune.api.credential_routes), and where
    their keys are (default: the environment)."""
    _routes[:] = routes
    _environ[:] = [os.environ if environ is None else environ]


def _route(uri: str) -> str | None:
    """The environment prefix of the source uri belongs to (the longest matching route)."""
    best: tuple[str, str] | None = None
    for base, env_prefix in _routes:
        base = base.rstrip("/")
        if (uri.rstrip("/") == base or uri.startswith(base + "/")) and (
            best is None or len(base) > len(best[0])
        ):
            best = (base, env_prefix)
    return best[1] if best else None


def credentials(uri: str) -> dict[str, str]:
    """The configuration of the source uri belongs to, from its Secret's keys in the
    environment; empty: the default chain. The Secret is the tenant's: a key that names a file,
    a command or a credential endpoint (kubetune.api.storage_keys) would make this pod send its
    own identity (the profile's ServiceAccount token, IRSA) where the tenant says, so such a
    Secret is refused as the user's error, naming the keys (never their values)."""
    env_prefix = _route(uri)
    scheme = urlsplit(uri).scheme
    if env_prefix is None:
        return {}
    keys = {
        key[len(env_prefix) :]: v for key, v in _environ[0].items() if key.startswith(env_prefix)
    }
    storage = storage_config(scheme, keys)
    if storage.refused:
        raise SpecError(
            storage.refusal(f"the Secret of {whose(uri).removeprefix('the credentials of ')}")
        )
    return storage.config


def locate(uri: str) -> Location:
    root, prefix = _store_root(uri)
    config = credentials(uri)
    options: dict[str, Any] = {"config": config} if config else {}
    scheme = urlsplit(uri).scheme
    named = [config[k] for k in ENDPOINT_KEYS.get(scheme, ()) if config.get(k)]
    # The Secret's endpoint, else (s3) the pod's own AWS_ENDPOINT_URL, which obstore reads too.
    ambient = os.environ.get("AWS_ENDPOINT_URL", "") if scheme == "s3" else ""
    endpoint = named[0] if named else ambient
    if endpoint.startswith("http://") or root.startswith("http://"):
        options["client_options"] = {"allow_http": True}
    try:
        return Location(from_url(root, **options), prefix)
    except (ValueError, obstore.exceptions.BaseError) as exc:
        keys = ", ".join(sorted(config)) or "none"
        raise TrainerError(
            f"cannot use the credentials for {uri} (keys: {keys}): {first_line(exc)}"
        ) from exc


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def whose(uri: str) -> str:
    """Whose credentials a URI is used with, for messages."""
    env_prefix = _route(uri)
    if env_prefix is None:
        return "the pod's identity (the default credential chain; no Secret named for it)"
    source = next(k for k, v in CREDENTIAL_ENV.items() if v == env_prefix)
    field = "the profile's modelCache" if source == "cache" else f"spec.{source}"
    return f"the credentials of {field}.credentialsSecret"


def _problem(verb: str, uri: str, exc: BaseException) -> TrainerError:
    text = f"cannot {verb} {uri}: {first_line(exc)}"
    if isinstance(
        exc, obstore.exceptions.PermissionDeniedError | obstore.exceptions.UnauthenticatedError
    ):
        text = f"cannot {verb} {uri} with {whose(uri)}: {first_line(exc)}"
    return TrainerError(text)


def read_bytes(uri: str) -> bytes:
    loc = locate(uri)
    try:
        return bytes(obstore.get(loc.store, loc.key()).bytes())
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise _problem("read", uri, exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    loc = locate(uri)
    try:
        obstore.put(loc.store, loc.key(), data)
    except Exception as exc:
        raise _problem("write", uri, exc) from exc


def exists(uri: str) -> bool:
    loc = locate(uri)
    try:
        obstore.head(loc.store, loc.key())
    except FileNotFoundError:
        return False
    return True


def list_keys(uri: str) -> list[str]:
    """Every object under the prefix uri, as paths relative to it."""
    loc = locate(uri)
    prefix = loc.key()
    try:
        keys = [
            m["path"] for batch in obstore.list(loc.store, prefix=prefix or None) for m in batch
        ]
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise _problem("list", uri, exc) from exc
    base = prefix.rstrip("/") + "/" if prefix else ""
    return sorted(k[len(base) :] for k in keys if k.startswith(base))


def newest(uri: str, suffixes: tuple[str, ...]) -> str | None:
    """The URI of the newest object under the prefix uri whose name ends in one of suffixes
    (the latest modification time; the greatest key on a tie), or None when there is none."""
    loc = locate(uri)
    prefix = loc.key()
    base = prefix.rstrip("/") + "/" if prefix else ""
    try:
        metas = [m for batch in obstore.list(loc.store, prefix=prefix or None) for m in batch]
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _problem("list", uri, exc) from exc
    found = [
        (m["last_modified"], m["path"])
        for m in metas
        if m["path"].startswith(base) and m["path"].endswith(suffixes)
    ]
    if not found:
        return None
    _, key = max(found)
    return join(uri, key[len(base) :])


def download(uri: str, dest: Path) -> Path:
    """Copies one object (when uri names one) or every object under a prefix into dest."""
    keys = list_keys(uri)
    if not keys:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(uri))
        return dest
    for key in keys:
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(join(uri, key)))
    return dest


def delete(uri: str) -> None:
    """Deletes one object (nothing if it does not exist)."""
    loc = locate(uri)
    with contextlib.suppress(FileNotFoundError):
        obstore.delete(loc.store, loc.key())


def delete_prefix(uri: str) -> int:
    """Deletes every object under the prefix uri; returns how many."""
    loc = locate(uri)
    keys = [loc.key(k) for k in list_keys(uri)]
    if keys:
        obstore.delete(loc.store, keys)
    return len(keys)


@dataclass(frozen=True)
class Uploaded:
    path: str  # relative to the prefix
    size: int
    sha256: str


def upload_dir(local: Path, uri: str) -> list[Uploaded]:
    """Uploads every file under local to uri/<path>; returns what was written, sorted."""
    out = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = path.relative_to(local).as_posix()
        data = path.read_bytes()
        write_bytes(join(uri, rel), data)
        out.append(Uploaded(rel, len(data), hashlib.sha256(data).hexdigest()))
    return out


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """An exclusive flock on path (created, with its directory, if absent), released when the
    block ends or the process dies; waiting is logged when another holder makes this one wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.info("%s", waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
