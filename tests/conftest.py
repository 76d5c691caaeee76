from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.codegen.crd import crd
from tests.support import mlflow, s3
from tests.support.apiserver import ApiServer
from tests.support.tiny import build_tiny_model, poison, task_records, write_jsonl

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The image suite last (a stable sort): its build runs beside everything before it."""
    items.sort(key=lambda item: item.get_closest_marker("images") is not None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the images now if the image suite is to run (tests/images/conftest.py)."""
    if any(item.get_closest_marker("images") for item in session.items):
        from tests.images.conftest import Background

        Background.start()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The tests that ran on the real control plane (the e2e marker), by name and outcome:
    make test's output says which of them met a real API server."""
    rows = [
        (report.outcome.upper(), report.nodeid, report.duration)
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport)  # not the deselected items
        and report.keywords.get("e2e")
        and (report.when == "call" or (report.when == "setup" and report.outcome != "passed"))
    ]
    if rows:
        terminalreporter.section(f"real control plane: {len(rows)} tests (-m e2e)")
        for outcome, nodeid, duration in sorted(rows, key=lambda row: row[1]):
            terminalreporter.write_line(f"{outcome:8} {nodeid} ({duration:.1f} s)")


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.images.conftest import Background

    Background.stop()


@pytest.fixture(scope="session")
def apiserver() -> ApiServer:
    return ApiServer(crd())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("task") / "reviews.jsonl", task_records(400, seed=1))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3.S3Server]:
    server = s3.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mlflow.MlflowServer]:
    server = mlflow.start(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: s3.S3Server, monkeypatch: pytest.MonkeyPatch) -> s3.S3Server:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def nan_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model with NaN embeddings: training on it diverges at once."""
    return poison(tiny_model, tmp_path_factory.mktemp("nan") / "model")
