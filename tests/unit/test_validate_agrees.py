"""`kubetune validate` and `kubetune run` accept exactly what the API server admits from
`kubectl create -f` (strict field validation, kubectl's default): a table of manifests, each
through validate's loader and through the API-server emulator (tests/support/apiserver.py, which
takes the YAML text as kubectl sends it). Both accept, or both reject naming the same field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.local import UsageError, ValidationProblems, load_job
from kubetune.manifests import load_manifests
from tests.support.apiserver import ApiServer

BASE = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: sql-lora
  namespace: ml
spec:
  model:
    uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct
  dataset:
    uri: s3://data/sql/train.jsonl
  method:
    type: lora
  hyperparameters:
    epochs: 2
    batchSize: 8
  evaluation:
    metrics: [loss, exactMatch]
  gates:
    - metric: exactMatch
      min: 0.5
  output:
    uri: s3://models/sql
    credentialsSecret: s3-credentials
"""
TRACKING = """\
  tracking:
    mlflow:
      trackingUri: http://mlflow.mlflow:5000
      credentialsSecret: mlflow-auth
    wandb:
      project: sql
      mode: offline
"""


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


# (manifest, the field both must blame, or None when both accept; the hint validate gives)
# fmt: off
TABLE = [
    pytest.param(BASE, None, None, id="valid"),
    pytest.param(edit("  name: sql-lora\n", "  generateName: sql-lora-\n"), None, None, id="generateName"),
    pytest.param(edit("  name: sql-lora\n", f"  generateName: {'x' * 60}-\n"), "metadata", "at most", id="generateName-too-long"),
    pytest.param(edit("    batchSize: 8\n", "    batch_size: 8\n"), "spec.hyperparameters.batch_size", "did you mean `batchSize`?", id="snake-case"),
    pytest.param(edit("    batchSize: 8\n", "    batchSize: 8\n    learning_rate: 2e-4\n"), "spec.hyperparameters.learning_rate", "did you mean `learningRate`?", id="snake-case-2"),
    pytest.param(edit("    credentialsSecret:", "    credentials_secret:"), "spec.output.credentials_secret", "did you mean `credentialsSecret`?", id="snake-case-output"),
    pytest.param(edit("    batchSize: 8\n", "    bacthSize: 8\n"), "spec.hyperparameters.bacthSize", "did you mean `batchSize`?", id="misspelt"),
    pytest.param(edit("  namespace: ml\n", "  namespace: ml\n  lables: {team: a}\n"), "metadata.lables", "did you mean `labels`?", id="metadata-typo"),
    pytest.param(edit("spec:\n", "specs:\n  x: 1\nspec:\n"), "specs", "unknown field", id="top-level-unknown"),
    pytest.param(edit("    epochs: 2\n", "    epochs: 2\n    epochs: 3\n"), "epochs", "duplicate key 'epochs' (first at line 14)", id="duplicate-key"),
    pytest.param(edit("    epochs: 2\n", "    epochs: 2\n    maxSteps: 10\n"), "spec.hyperparameters.maxSteps", "not both", id="exclusive-pair"),
    pytest.param(BASE + TRACKING, None, None, id="tracking"),
    pytest.param(BASE + TRACKING.replace("trackingUri", "tracking_uri"), "spec.tracking.mlflow.tracking_uri", "did you mean `trackingUri`?", id="tracking-snake-case"),
    pytest.param(BASE + TRACKING.replace("http://mlflow", "http://me:pw@mlflow"), "spec.tracking.mlflow.trackingUri", "put them in the Secret named by credentialsSecret", id="tracking-credentials-in-uri"),
    pytest.param(BASE + TRACKING.replace("offline", "dry-run"), "spec.tracking.wandb.mode", "online", id="wandb-mode"),
]
# fmt: on


@pytest.mark.parametrize(("text", "field", "hint"), TABLE)
def test_validate_and_the_api_server_agree(
    text: str, field: str | None, hint: str | None, apiserver: ApiServer, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    (doc,) = load_manifests(path)
    _, server_errors = apiserver.admit_manifest(text, strict=True)
    if field is None:
        assert doc.problems == [] and doc.job is not None
        assert server_errors == []
        return
    assert doc.problems and server_errors, (doc.problems, server_errors)
    said = "\n".join(map(str, doc.problems))
    assert field in said and field in "\n".join(server_errors), (said, server_errors)
    assert hint in said


@pytest.mark.parametrize(("text", "field", "hint"), [p for p in TABLE if p.id != "exclusive-pair"])
def test_run_loads_what_validate_accepts_and_nothing_else(
    text: str, field: str | None, hint: str | None, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    overrides = {"sets": [], "model": None, "dataset": None, "output": None}
    if field is None:
        job = load_job(str(path), None, overrides)
        assert job.spec.hyperparameters.batch_size == 8
        return
    with pytest.raises((ValidationProblems, UsageError)) as caught:
        load_job(str(path), None, overrides)
    assert hint in str(caught.value)


def test_a_generated_name_follows_the_api_servers_rule(apiserver: ApiServer) -> None:
    text = edit("  name: sql-lora\n", "  generateName: sql-lora-\n")
    stored, errors = apiserver.admit_manifest(text)
    assert errors == []
    name = stored["metadata"]["name"]
    assert name.startswith("sql-lora-") and len(name) == len("sql-lora-") + 5
    assert set(name[len("sql-lora-") :]) <= set("bcdfghjklmnpqrstvwxz2456789")


def test_an_override_of_one_exclusive_field_clears_the_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's own command: a job that sets epochs, run with --set ...maxSteps=50."""
    path = tmp_path / "job.yaml"
    path.write_text(BASE)
    sets = ["spec.hyperparameters.maxSteps=50"]
    job = load_job(str(path), None, {"sets": sets, "model": None, "dataset": None, "output": None})
    assert (job.spec.hyperparameters.max_steps, job.spec.hyperparameters.epochs) == (50, None)
    assert "replaces spec.hyperparameters.epochs" in capsys.readouterr().err
    sets = ["spec.hyperparameters.maxSteps=50", "spec.hyperparameters.epochs=1"]
    job = load_job(str(path), None, {"sets": sets, "model": None, "dataset": None, "output": None})
    assert (job.spec.hyperparameters.max_steps, job.spec.hyperparameters.epochs) == (None, 1)


def test_validate_reads_stdin_and_writes_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    text = BASE + "---\n" + edit("    batchSize: 8\n", "    batch_size: 8\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["validate", "-o", "json", "-"]) == 2
    first, second = json.loads(capsys.readouterr().out)
    assert first == {
        "file": "<stdin>",
        "document": 0,
        "line": 1,
        "kind": "FineTuneJob",
        "name": "sql-lora",
        "generateName": None,
        "valid": True,
        "skipped": False,
        "problems": [],
        "warnings": [],
    }
    assert second["valid"] is False and second["line"] == 25
    assert second["problems"] == [
        {
            "line": 39,
            "field": "spec.hyperparameters.batch_size",
            "message": "unknown field; did you mean `batchSize`?",
        }
    ]


def test_a_file_without_a_finetunejob_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["validate", str(path)]) == 2
    assert (
        f"{path}: no FineTuneJob, FineTuneProfile or FineTuneSchedule in this file (found: v1/ConfigMap)"
        in capsys.readouterr().err
    )
    path.write_text("# nothing here\n")
    assert main(["validate", str(path)]) == 2
    assert (
        "no FineTuneJob, FineTuneProfile or FineTuneSchedule in this file (found: nothing)"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("a: [1\nb: 2\n", ":2: invalid YAML: expected ',' or ']', but got ':' (column 2), while "
         "parsing a flow sequence at line 1"),
        ("spec:\n  model: x\n   bad: 1\n", ":3: invalid YAML: mapping values are not allowed here "
         "(column 7)"),
        ("kind: FineTuneJob\n\tspec: {}\n", ":2: invalid YAML: found character '\\t' that cannot "
         "start any token (column 1)"),
    ],
)  # fmt: skip
def test_yaml_errors_keep_their_detail(
    text: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    assert f"{path}{said}" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"kubetune {version('kubetune')}"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (edit("  output:\n    uri: s3://models/sql\n    credentialsSecret: s3-credentials\n", ""),
         ":6: spec.output: required field is missing"),  # at `spec:`, not at its first child
        (edit("    uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct\n", "    revision: main\n"),
         ":7: spec.model.uri: required field is missing"),  # at `model:`
        ("apiVersion: kubetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata:\n  name: x\n",
         ":1: spec: required field is missing"),
    ],
)  # fmt: skip
def test_a_missing_field_is_blamed_on_the_mapping_that_lacks_it(
    text: str, said: str, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    (doc,) = load_manifests(path)
    assert said in "\n".join(map(str, doc.problems)), doc.problems
