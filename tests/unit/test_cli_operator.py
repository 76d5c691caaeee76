"""`kubetune operator` refuses bad settings with one line naming the variable, before it touches
the cluster."""

from __future__ import annotations

import pytest

from kubetune.api import ExitCode
from kubetune.cli import main


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUBETUNE_MAX_GPUS_PER_JOB", "many"),
        ("KUBETUNE_NAMESPACES", "ml,research"),  # must be a JSON list
        ("KUBETUNE_PROGRESS_POLL_SECONDS", "0"),
    ],
)
def test_bad_setting_names_the_variable(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["operator"]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{variable}: "), err
