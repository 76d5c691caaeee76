"""A work queue of FineTuneJob keys, as client-go's (k8s.io/client-go/util/workqueue) behaves:

- deduplicating: a key queued twice is reconciled once; a key added while it is being reconciled
  is reconciled again after (never two reconciles of one key at a time, so no lock per object);
- delayed adds (a retry's backoff, a poll's next turn), kept in a heap;
- rate-limited retries: per key, exponential from `base_delay` to `max_delay` (client-go's
  ItemExponentialFailureRateLimiter), and for all keys together a token bucket of `rate` per
  second with `burst` (its BucketRateLimiter; controller-runtime's default combines the two as
  this does, the larger delay winning). A success forgets the key's failures.

Thread-safe: the informers' threads add, the reconcile workers get and mark done.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Hashable

Key = Hashable


class WorkQueue:
    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 60.0,
        rate: float = 10.0,
        burst: int = 100,
        clock: object = time.monotonic,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._cond = threading.Condition()
        self._ready: list[Key] = []  # FIFO of keys ready now
        self._queued: set[Key] = set()  # in _ready
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()  # added while processing: queue again when done
        self._waiting: list[tuple[float, int, Key]] = []  # (when, seq, key) heap
        self._due: dict[Key, float] = {}  # the earliest pending delayed add per key
        self._seq = itertools.count()
        self._failures: dict[Key, int] = {}
        self._tokens = float(burst)
        self._refilled = self._now()
        self._shut = False

    def _now(self) -> float:
        return self._clock()  # type: ignore[operator]

    def __len__(self) -> int:
        with self._cond:
            return len(self._ready) + len(self._due)

    def add(self, key: Key) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Key) -> None:
        if self._shut or key in self._queued:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        self._queued.add(key)
        self._ready.append(key)
        self._cond.notify()

    def add_after(self, key: Key, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            when = self._now() + delay
            if self._due.get(key, float("inf")) <= when:
                return  # already due sooner
            self._due[key] = when
            heapq.heappush(self._waiting, (when, next(self._seq), key))
            self._cond.notify()

    def retry(self, key: Key, at_least: float = 0.0) -> float:
        """Queue the key again after its backoff (or `at_least`); returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            self._failures[key] = failures + 1
            delay = min(self.max_delay, self.base_delay * 2**failures)
            now = self._now()
            self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            self._tokens -= 1
            bucket = 0.0 if self._tokens >= 0 else -self._tokens / self.rate
            delay = max(delay, bucket, at_least)
        self.add_after(key, delay)
        return delay

    def forget(self, key: Key) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Key) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def get(self, timeout: float | None = None) -> Key | None:
        """The next ready key (now being processed), or None on shutdown or timeout."""
        deadline = None if timeout is None else self._now() + timeout
        with self._cond:
            while True:
                self._promote()
                if self._ready:
                    key = self._ready.pop(0)
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if self._shut:
                    return None
                wait = None
                if self._waiting:
                    wait = max(0.0, self._waiting[0][0] - self._now())
                if deadline is not None:
                    left = deadline - self._now()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def _promote(self) -> None:
        now = self._now()
        while self._waiting and self._waiting[0][0] <= now:
            when, _, key = heapq.heappop(self._waiting)
            if self._due.get(key) == when:
                del self._due[key]
                self._add(key)

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add(key)

    def shut_down(self) -> None:
        with self._cond:
            self._shut = True
            self._cond.notify_all()
