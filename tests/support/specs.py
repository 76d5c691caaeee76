"""Test manifests: change a spec in place with `a__b=value` keyword paths."""

from __future__ import annotations

import copy
from typing import Any


def override(spec: dict[str, Any], **paths: Any) -> dict[str, Any]:
    """Set spec.a.b = value for each a__b=value (creating the parents); returns spec."""
    for path, value in paths.items():
        node = spec
        *parents, last = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = copy.deepcopy(value)
    return spec
