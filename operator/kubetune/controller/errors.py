"""The two ways an API call can fail, as the reconcile and the handlers see them."""

from __future__ import annotations


class Retry(Exception):
    """A transient failure (conflict, throttling, 5xx, network): the same call can succeed later."""

    def __init__(self, message: str, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class Rejected(Exception):
    """The API server refused an object for good (4xx other than conflict and throttling)."""
