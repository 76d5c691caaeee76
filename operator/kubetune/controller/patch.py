"""The one status writer of every kind: a JSON merge patch from the status a reconcile decided
from to the one it decided now, written onto the version it read."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel


def finite(value: Any) -> Any:
    """JSON (and so the API server) has no NaN or infinity: such a number becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def status_dict(status: BaseModel) -> dict[str, Any]:
    """A status model as the API server stores it: camelCase, no nulls, finite numbers."""
    return finite(status.model_dump(by_alias=True, exclude_none=True, mode="json"))


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns old into new."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            nested = merge_patch(old[key], value)
            if nested:
                patch[key] = nested
        elif old.get(key) != value:
            patch[key] = value
    return patch


def write_status(
    raw: dict[str, Any],
    previous: dict[str, Any],
    new: dict[str, Any],
    patch_status: Callable[[str, str, dict[str, Any], str | None], Any],
) -> bool:
    """The merge patch from the status decided from (`previous`, as the model reads it) to the
    one decided now, with the keys the model does not know (left by an older operator, or
    garbage) dropped too; written only onto the version decided from (a 409 means it changed
    meanwhile). True when a patch was written: what a reconcile's Events wait for (an
    unchanged status announces nothing)."""
    patch = merge_patch(previous, new)
    for key in raw.get("status") or {}:
        if key not in new and key not in patch:
            patch[key] = None
    if not patch:
        return False
    meta = raw["metadata"]
    return bool(patch_status(meta["namespace"], meta["name"], patch, meta.get("resourceVersion")))
