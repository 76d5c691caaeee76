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


def minimal_job(name: str) -> dict[str, Any]:
    """The smallest valid FineTuneJob, for tests where the test node's fake trainer runs it."""
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "method": {"type": "lora"},
            "output": {"uri": f"s3://models/{name}"},
        },
    }
