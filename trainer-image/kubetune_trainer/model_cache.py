"""A shared cache of base models (a FineTuneProfile's modelCache): each model is fetched once,
by one run, and later runs (and the other pods of the same run) load it from the cache.

An entry is named after the model and a hash of its URI and revision, and is complete only
when its marker (`.kubetune-complete`, a JSON record of what was fetched) is there; the marker
is written last, so a reader never takes a half-fetched model.

- On a volume (`path`, e.g. a ReadWriteMany PersistentVolumeClaim): the fetcher holds an
  exclusive `flock` on `<entry>.lock` while it fetches into `<entry>.partial-<random>` and
  renames that to `<entry>`; another run blocks on the lock, then finds the entry complete. The
  kernel releases the lock when its holder dies (NFSv4 implements flock with its own locks), so
  a killed run never leaves the cache locked.
- In object storage (`uri`): the lock is an object created only if absent (a conditional PUT,
  `If-None-Match: *`); its holder fetches into the pod, uploads the files and then the marker,
  and deletes the lock. Another run waits for the marker while the lock is younger than
  STALE_SECONDS; an older lock is taken as its holder's death and replaced. Readers download
  the entry into the pod.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import obstore

from kubetune.api import ModelCacheSpec
from kubetune_trainer import storage

log = logging.getLogger(__name__)

MARKER = ".kubetune-complete"
STALE_SECONDS = 6 * 3600  # a lock this old is its holder's, dead: no fetch takes this long
POLL_SECONDS = 5.0

Fetch = Callable[[Path], None]  # fills a directory with the model's files


def entry_name(uri: str, revision: str | None) -> str:
    """`<model name>-<hash>`: readable in a listing, unique per URI and revision."""
    digest = hashlib.sha256(f"{uri}@{revision or ''}".encode()).hexdigest()[:12]
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:60] or "model"
    return f"{slug}-{digest}"


def _record(uri: str, revision: str | None, directory: Path) -> bytes:
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return json.dumps(
        {"uri": uri, "revision": revision, "files": files, "fetchedAt": time.time()}
    ).encode()


class ModelCache:
    """The cache of one profile; `local` is the pod's own directory for downloads."""

    def __init__(self, spec: ModelCacheSpec, local: Path) -> None:
        self.spec = spec
        self.local = local
        self.fetched = False  # whether this process fetched (a miss) rather than read (a hit)

    def get(self, uri: str, revision: str | None, fetch: Fetch) -> Path:
        """A local directory with the model: from the cache, or fetched once into it."""
        name = entry_name(uri, revision)
        if self.spec.path is not None:
            return self._on_volume(Path(self.spec.path), name, uri, revision, fetch)
        assert self.spec.uri is not None
        return self._in_storage(storage.join(self.spec.uri, name), name, uri, revision, fetch)

    # -- on a volume ------------------------------------------------------------------------

    def _on_volume(
        self, root: Path, name: str, uri: str, revision: str | None, fetch: Fetch
    ) -> Path:
        entry = root / name
        if (entry / MARKER).is_file():
            log.info("Model from the cache uri=%s entry=%s", uri, entry)
            return entry
        root.mkdir(parents=True, exist_ok=True)
        waiting = f"Waiting for another run fetching the model into the cache uri={uri}"
        with storage.file_lock(root / f"{name}.lock", waiting):
            if (entry / MARKER).is_file():  # another run fetched it while this one waited
                log.info("Model from the cache uri=%s entry=%s", uri, entry)
                return entry
            partial = root / f"{name}.partial-{secrets.token_hex(4)}"
            try:
                log.info("Fetching the model into the cache uri=%s entry=%s", uri, entry)
                fetch(partial)
                (partial / MARKER).write_bytes(_record(uri, revision, partial))
                if entry.exists():  # an entry without its marker: a fetch that died
                    shutil.rmtree(entry)
                partial.rename(entry)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        self.fetched = True
        return entry

    # -- in object storage --------------------------------------------------------------------

    def _in_storage(
        self, prefix: str, name: str, uri: str, revision: str | None, fetch: Fetch
    ) -> Path:
        marker = storage.join(prefix, MARKER)
        lock = f"{prefix.rstrip('/')}.lock"
        while not storage.exists(marker):
            if _create(lock):
                try:
                    if not storage.exists(marker):
                        return self._fill(prefix, name, uri, revision, fetch)
                finally:
                    storage.delete(lock)
                break
            age = _age(lock)
            if age is not None and age > STALE_SECONDS:
                log.warning("Replacing a stale model cache lock lock=%s age=%.0fs", lock, age)
                storage.delete(lock)
                continue
            log.info("Waiting for another run fetching the model into the cache lock=%s", lock)
            time.sleep(POLL_SECONDS)
        target = self.local / "model-cache" / name
        if not (target / MARKER).is_file():
            log.info("Model from the cache uri=%s entry=%s", uri, prefix)
            partial = target.with_name(f"{name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            storage.download(prefix, partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
        return target

    def _fill(self, prefix: str, name: str, uri: str, revision: str | None, fetch: Fetch) -> Path:
        target = self.local / "model-cache" / name
        partial = target.with_name(f"{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        log.info("Fetching the model into the cache uri=%s entry=%s", uri, prefix)
        fetch(partial)
        record = _record(uri, revision, partial)
        storage.upload_dir(partial, prefix)
        (partial / MARKER).write_bytes(record)
        storage.write_bytes(storage.join(prefix, MARKER), record)  # last: the entry is complete
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        self.fetched = True
        return target


def _create(uri: str) -> bool:
    """Creates the object only if it does not exist (a conditional PUT); whether it did."""
    loc = storage.locate(uri)
    body = json.dumps({"createdAt": time.time()}).encode()
    try:
        obstore.put(loc.store, loc.key(), body, mode="create")
    except obstore.exceptions.AlreadyExistsError:
        return False
    return True


def _age(uri: str) -> float | None:
    try:
        return time.time() - float(json.loads(storage.read_bytes(uri))["createdAt"])
    except (FileNotFoundError, ValueError, KeyError):
        return None
