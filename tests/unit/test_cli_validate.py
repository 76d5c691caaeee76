"""`kubetune validate`: one line per problem naming file, line and field; exit code 2 on problems."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.api import ExitCode
from kubetune.cli import main
from tests.conftest import ROOT, valid_job

BAD = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: bad
spec:
  model:
    uri: hf://HuggingFaceTB/SmolLM2-135M-Instruct
  dataset:
    uri: s3://data/train.jsonl
  method:
    type: lorra
  hyperparameters:
    learningRate: 2e-4
    lr: 3
  output:
    uri: s3://models/x
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_examples_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    examples = ROOT / "examples"
    files = [str(p) for p in sorted([*examples.glob("*.yaml"), *examples.glob("profiles/*.yaml")])]
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("is valid") == len(files)
    assert "FineTuneProfile a100-pool is valid" in out


def test_problems_name_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    assert main(["validate", str(path)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:11: spec.method.type: 'lorra' is not one of lora, qlora, dora, ia3, prefix, prompt, full",
        f"{path}:14: spec.hyperparameters.lr: unknown field; valid fields here: epochs, maxSteps, "
        "learningRate, batchSize, microBatchSize, warmupRatio, weightDecay, lrScheduler, maxGradNorm, "
        "gradientCheckpointing, earlyStoppingPatience, evalEverySteps, checkpointEverySteps, seed",
    ]


def test_cross_field_rule_names_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = valid_job()
    job["spec"]["method"] = {"type": "prefix"}
    job["spec"]["output"]["mergeAdapter"] = True
    path = write(tmp_path, "merge.yaml", yaml.safe_dump(job, sort_keys=False))
    assert main(["validate", str(path)]) == ExitCode.INVALID_SPEC
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{path}:")
    assert ": spec.output.mergeAdapter: prefix and prompt tuning cannot be merged" in line


def test_multi_document_files_skip_other_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    text = yaml.safe_dump(secret) + "---\n" + yaml.safe_dump(valid_job())
    path = write(tmp_path, "both.yaml", text)
    assert main(["validate", "-v", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped v1/Secret" in out
    assert "FineTuneJob sql-lora is valid" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("spec: [unclosed\n", ":2: invalid YAML", id="invalid-yaml"),
        pytest.param("- just\n- a list\n", ":1: expected a mapping", id="not-a-mapping"),
        pytest.param(
            "",
            ": no FineTuneJob, FineTuneProfile or FineTuneSchedule in this file",
            id="empty-file",
        ),
        pytest.param(
            "apiVersion: kubetune.dev/v1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {}\n",
            ":1: apiVersion: 'kubetune.dev/v1' is not one of kubetune.dev/v1alpha1",
            id="wrong-version",
        ),
        pytest.param(
            "apiVersion: kubetune.dev/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n",
            ":1: spec: required field is missing",
            id="no-spec",
        ),
    ],
)
def test_unreadable_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = write(tmp_path, "f.yaml", text)
    assert main(["validate", str(path)]) == ExitCode.INVALID_SPEC
    assert expected in capsys.readouterr().err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == ExitCode.INVALID_SPEC
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_a_job_is_checked_against_a_profile_given_beside_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = ROOT / "examples" / "profiles" / "a100-pool.yaml"
    job = ROOT / "examples" / "lora-on-a100-pool.yaml"
    assert main(["validate", str(profile), str(job)]) == 0
    assert "FineTuneJob llama-support-bot is valid under FineTuneProfile a100-pool" in (
        capsys.readouterr().out
    )
    greedy = write(tmp_path, "greedy.yaml", job.read_text().replace("gpus: 2 ", "gpus: 16 "))
    assert main(["validate", str(profile), str(greedy)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err
    line = next(i for i, t in enumerate(greedy.read_text().splitlines(), 1) if "gpus: 16" in t)
    assert f"greedy.yaml:{line}: spec.resources.gpus: 16 is more than FineTuneProfile " in err
    # Alone, the job is valid: the profile is the cluster's to check.
    assert main(["validate", str(greedy)]) == 0


def test_a_schedule_is_validated_with_its_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FineTuneSchedule: its cron and time zone (which the CRD cannot check), and the
    FineTuneJob its template stamps, resolved against a profile given beside it."""
    text = (ROOT / "examples" / "retraining-schedule.yaml").read_text()
    bad = text.replace('"0 3 * * 1"', '"0 3 * * 8"').replace("Europe/Berlin", "Europe/Gotham")
    bad = bad.replace("type: lora", "type: lorra")
    path = write(tmp_path, "schedule.yaml", bad)
    assert main(["validate", str(path)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err
    lines = bad.splitlines()
    cron = lines.index('  schedule: "0 3 * * 8"') + 1
    zone = lines.index("  timeZone: Europe/Gotham") + 1
    assert f"{path}:{cron}: spec.schedule: '0 3 * * 8' is not a valid cron expression" in err
    assert f"{path}:{zone}: spec.timeZone: 'Europe/Gotham' is not a time zone" in err
    assert "spec.jobTemplate.spec.method.type: 'lorra' is not one of" in err

    profile = ROOT / "examples" / "profiles" / "a100-pool.yaml"
    greedy = text.replace(
        "      resources:\n        gpus: 1",
        "      profile: a100-pool\n      resources:\n        gpus: 16",
    )
    path = write(tmp_path, "greedy.yaml", greedy)
    assert main(["validate", str(path), str(profile)]) == ExitCode.INVALID_SPEC
    assert (
        "spec.jobTemplate.spec.resources.gpus: 16 is more than FineTuneProfile 'a100-pool' allows"
        in capsys.readouterr().err
    )
