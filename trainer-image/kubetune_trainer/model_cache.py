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
- In object storage (`uri`): the lock is an object `<entry>.lock` naming its holder (a random
  token, the pod, the run) and a heartbeat time that a thread of the holder rewrites every
  HEARTBEAT_SECONDS while it fetches. Every write of the lock is conditional on the version
  last read or written (`If-None-Match: *` to create it; the ETag, or GCS's generation, to
  replace it), so of two runs that act on the same lock at once one wins and the other reads
  again. The holder fetches into the pod, uploads the files and then the marker, and releases
  the lock by replacing it, conditionally, with a released record (object stores offer no
  conditional delete, and an unconditional one could delete a successor's lock). Another run
  waits for the marker, and takes the lock over, by a conditional write on the version it
  read, when it is released; when its heartbeat is older than MISSED_BEATS beats, or it has not
  changed for that long while this run watched (a holder that died, or a lock that cannot be
  read as one); or at once when it names this run's own place (the same run and node, retried:
  its predecessor is dead). Readers download the entry into the pod.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import obstore

from kubetune.api import ModelCacheSpec
from kubetune_trainer import storage

log = logging.getLogger(__name__)

MARKER = ".kubetune-complete"
HEARTBEAT_SECONDS = 30.0  # how often a holder rewrites its lock
MISSED_BEATS = 4  # a lock whose heartbeat is this many beats old is a dead holder's
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


@dataclass(frozen=True)
class Clock:
    """Wall time (heartbeats, compared across pods), a monotonic clock (how long this process
    watched a lock) and sleeping; tests pass a fake one."""

    now: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


class ModelCache:
    """The cache of one profile; `local` is the pod's own directory for downloads; `holder`
    names this process's place in its run (run id and node), so that a retry of the same place
    takes over its predecessor's lock at once ("": no such claim)."""

    def __init__(
        self,
        spec: ModelCacheSpec,
        local: Path,
        holder: str = "",
        clock: Clock | None = None,
        heartbeat_seconds: float | None = None,
    ) -> None:
        self.spec = spec
        self.local = local
        self.holder = holder
        self.clock = clock or Clock()
        self.heartbeat_seconds = heartbeat_seconds or HEARTBEAT_SECONDS
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
        lock = StoreLock(f"{prefix.rstrip('/')}.lock", self.holder, self.clock)
        stale_after = MISSED_BEATS * self.heartbeat_seconds
        watched: tuple[tuple[str | None, str | None], float] | None = None  # version, since
        while not storage.exists(marker):
            current = lock.read()
            if current is not None:
                since = self.clock.monotonic()
                if watched is not None and watched[0] == (current.etag, current.version):
                    since = watched[1]
                watched = ((current.etag, current.version), since)
                why = current.free(lock, self.clock, stale_after, self.clock.monotonic() - since)
                if why is None:
                    log.info(
                        "Waiting for another run fetching the model into the cache %s",
                        current.describe(),
                    )
                    self.clock.sleep(POLL_SECONDS)
                    continue
                if why != "released":
                    log.warning(
                        "Taking over the model cache lock lock=%s reason=%s %s",
                        lock.uri,
                        why,
                        current.describe(),
                    )
            if not lock.acquire(current):
                continue  # another run acted on the lock meanwhile: read it again
            beating = lock.heartbeat(self.heartbeat_seconds)
            try:
                if not storage.exists(marker):
                    return self._fill(prefix, name, uri, revision, fetch)
            finally:
                beating.set()
                lock.release()
            break
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


@dataclass(frozen=True)
class LockState:
    """A lock object as read: what it says (None: it cannot be read as a lock) and its version."""

    body: dict[str, Any] | None
    etag: str | None
    version: str | None
    modified: float  # the store's time of the last write

    @classmethod
    def parse(cls, data: bytes, meta: dict[str, Any]) -> LockState:
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or not (
            body.get("released") is True or isinstance(body.get("heartbeatAt"), int | float)
        ):
            body = None
        modified = meta.get("last_modified")
        when = modified.timestamp() if isinstance(modified, datetime) else 0.0
        return cls(body, meta.get("e_tag"), meta.get("version"), when)

    def describe(self) -> str:
        if self.body is None:
            return "holder=unreadable"
        keys = ("holder", "host", "heartbeatAt")
        return " ".join(f"{k}={self.body.get(k)}" for k in keys if self.body.get(k) is not None)

    def free(
        self, mine: StoreLock, clock: Clock, stale_after: float, unchanged: float
    ) -> str | None:
        """Why this lock may be taken over (None: its holder is alive, wait)."""
        if self.body is not None and self.body.get("released") is True:
            return "released"
        if self.body is not None and mine.holder and self.body.get("holder") == mine.holder:
            return "held by this run's own earlier attempt"
        beat = self.body["heartbeatAt"] if self.body is not None else self.modified
        if clock.now() - beat > stale_after:
            return f"no heartbeat for {clock.now() - beat:.0f}s"
        if unchanged > stale_after:  # a holder's clock behind ours, or an unreadable lock
            return f"unchanged for {unchanged:.0f}s"
        return None


class StoreLock:
    """One process's hold on a lock object. Every write is conditional on the version this
    process last read or wrote, so it never replaces a lock it has not seen."""

    def __init__(self, uri: str, holder: str, clock: Clock) -> None:
        self.uri = uri
        self.holder = holder
        self.clock = clock
        self.token = secrets.token_hex(16)
        self.lost = threading.Event()  # another run took the lock over while this one held it
        self._loc = storage.locate(uri)
        self._mode: dict[str, str] | None = None  # the version of this process's last write
        self._mutex = threading.Lock()

    def read(self) -> LockState | None:
        try:
            got = obstore.get(self._loc.store, self._loc.key())
        except FileNotFoundError:
            return None
        return LockState.parse(bytes(got.bytes()), got.meta)

    def _body(self, **extra: Any) -> bytes:
        now = self.clock.now()
        return json.dumps(
            {
                "token": self.token,
                "holder": self.holder,
                "host": socket.gethostname(),
                "heartbeatAt": now,
                **extra,
            }
        ).encode()

    def _put(self, body: bytes, mode: Any) -> bool:
        try:
            result = obstore.put(self._loc.store, self._loc.key(), body, mode=mode)
        except (obstore.exceptions.PreconditionError, obstore.exceptions.AlreadyExistsError):
            return False
        except FileNotFoundError:  # a conditional update of an object gone meanwhile
            return False
        self._mode = _update_mode(result.get("e_tag"), result.get("version"))
        return True

    def acquire(self, seen: LockState | None) -> bool:
        """Takes the lock: creates it when none was seen, else replaces exactly the version
        seen. False: another process wrote it meanwhile."""
        mode = "create" if seen is None else _update_mode(seen.etag, seen.version)
        with self._mutex:
            return self._put(self._body(acquiredAt=self.clock.now()), mode)

    def beat(self) -> bool:
        """Rewrites the heartbeat, conditionally; False (and `lost`) when another run took
        the lock over (this one looked dead to it)."""
        with self._mutex:
            if self.lost.is_set() or self._mode is None:
                return False
            if not self._put(self._body(), self._mode):
                self.lost.set()
                log.warning("Lost the model cache lock to another run lock=%s", self.uri)
                return False
            return True

    def heartbeat(self, interval: float) -> threading.Event:
        """Beats every interval in a thread until the returned event is set."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval) and self.beat():
                pass

        threading.Thread(target=run, name="model-cache-heartbeat", daemon=True).start()
        return stop

    def release(self) -> bool:
        """Marks this process's lock released, only if it is still this process's."""
        with self._mutex:
            if self.lost.is_set() or self._mode is None:
                return False
            body = json.dumps(
                {"released": True, "token": self.token, "releasedAt": self.clock.now()}
            ).encode()
            released = self._put(body, self._mode)
            self._mode = None
            return released


def _update_mode(etag: str | None, version: str | None) -> dict[str, str]:
    """obstore's put mode that replaces exactly this version: the ETag (S3's and Azure's
    If-Match) and the store's version (GCS's generation), whichever the store gave."""
    return {k: v for k, v in (("e_tag", etag), ("version", version)) if v}
