from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubetune.codegen.crd import crd
from tests.support.apiserver import ApiServer

ROOT = Path(__file__).resolve().parent.parent


def valid_job() -> dict[str, Any]:
    """A small valid FineTuneJob that each table case changes in one place."""
    return copy.deepcopy(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "sql-lora", "namespace": "ml"},
            "spec": {
                "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
                "dataset": {"uri": "s3://data/sql/train.jsonl"},
                "method": {"type": "lora"},
                "hyperparameters": {"epochs": 2, "batchSize": 8},
                "evaluation": {"metrics": ["loss", "exactMatch"]},
                "gates": [{"metric": "exactMatch", "min": 0.5}],
                "output": {"uri": "s3://models/sql"},
            },
        }
    )


@pytest.fixture(scope="session")
def apiserver() -> ApiServer:
    return ApiServer(crd())
