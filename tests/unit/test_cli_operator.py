"""`kubetune operator` refuses bad settings with one line naming the variable, before it touches
the cluster."""

from __future__ import annotations

from pathlib import Path

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


def test_no_cluster_credentials_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Not in a pod and no kubeconfig: say so, and how to fix it, in one line."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    monkeypatch.setenv("KUBETUNE_HEALTH_PORT", "0")
    assert main(["operator"]) == ExitCode.RUNTIME_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("kubetune operator: no Kubernetes credentials")
    assert str(tmp_path / "missing-kubeconfig") in err[0] and "set KUBECONFIG" in err[0]
