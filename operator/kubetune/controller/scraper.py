"""The trainers' metrics, read within a budget: which running trainers are due, how many at a
time, how often; a changed step or stage is handed to the FineTuneJob controller."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kubetune.controller.cache import Key
from kubetune.progress import parse_metrics


@dataclass
class Target:
    """A running trainer whose metrics are read."""

    address: tuple[str, int]
    due: float = 0.0
    last: tuple[int, str | None] | None = None  # (step, stage) at the last scrape
    unchanged: int = 0  # scrapes in a row that saw the same step
    busy: bool = False


class Scraper:
    """Reads running trainers' metrics: each due every `interval` seconds, at most `rate` scrapes
    per second in all (a token bucket, so 10,000 trainers are spread over 10,000 / rate seconds
    rather than hit at once), at most `concurrency` at a time, each with a timeout. A trainer
    whose step did not change is read less often (the interval doubles, up to 4x); only a
    changed step or stage queues a reconcile, so status.progress is written at most once per
    scrape and never for a trainer that made no progress."""

    def __init__(
        self,
        fetch: Callable[[str, int], str | None],
        on_progress: Callable[[Key, str], None],
        interval: float,
        rate: float,
        concurrency: int,
        tick: float = 0.1,
    ) -> None:
        self.fetch = fetch
        self.on_progress = on_progress
        self.interval = interval
        self.rate = rate
        self.tick = tick
        self._targets: dict[Key, Target] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="kubetune-scrape")
        self._slots = threading.BoundedSemaphore(concurrency)
        self._thread = threading.Thread(target=self._run, name="kubetune-scraper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._targets)

    def set(self, key: Key, address: tuple[str, int] | None) -> None:
        with self._lock:
            if address is None:
                self._targets.pop(key, None)
                return
            target = self._targets.get(key)
            if target is None or target.address != address:  # a new pod: read it at once
                self._targets[key] = Target(address, due=time.monotonic())

    def _run(self) -> None:
        tokens, refilled = 1.0, time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            tokens = min(max(1.0, self.rate), tokens + (now - refilled) * self.rate)
            refilled = now
            with self._lock:
                due = sorted(
                    (t.due, key) for key, t in self._targets.items() if t.due <= now and not t.busy
                )
                picked = []
                for _, key in due:
                    if tokens < 1:
                        break
                    tokens -= 1
                    self._targets[key].busy = True
                    picked.append((key, self._targets[key].address))
            for key, address in picked:
                self._slots.acquire()
                try:
                    self._pool.submit(self._scrape, key, address)
                except RuntimeError:  # shut down
                    self._slots.release()
                    return

    def _scrape(self, key: Key, address: tuple[str, int]) -> None:
        try:
            text = self.fetch(*address)
        finally:
            self._slots.release()
        reading = None
        if text:
            progress, stage = parse_metrics(text)
            reading = ((progress.step if progress else -1), stage)
        with self._lock:
            target = self._targets.get(key)
            if target is None or target.address != address:
                return
            target.busy = False
            changed = reading is not None and reading != target.last
            target.unchanged = 0 if changed or reading is None else target.unchanged + 1
            target.last = reading or target.last
            target.due = time.monotonic() + self.interval * min(4, 2**target.unchanged)
        if changed and text:
            self.on_progress(key, text)
