"""`kubetune run` helpers: overrides and local paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import FineTuneJob
from kubetune.local import UsageError, apply_overrides, local_run_id, set_path, to_uri
from tests.conftest import valid_job


def test_set_path_parses_yaml_values_and_creates_mappings() -> None:
    job = valid_job()
    apply_overrides(
        job,
        [
            "spec.hyperparameters.maxSteps=20",
            "spec.hyperparameters.learningRate=2e-4",
            "spec.gates.0.min=0.9",
            "spec.resources.nodeSelector.pool=gpu",
        ],
        None,
        None,
        None,
    )
    hp = job["spec"]["hyperparameters"]
    assert (hp["maxSteps"], hp["learningRate"]) == (20, 2e-4)
    assert job["spec"]["gates"][0]["min"] == 0.9
    assert job["spec"]["resources"]["nodeSelector"] == {"pool": "gpu"}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        pytest.param("spec.hyperparameters.maxSteps", "expected PATH=VALUE", id="no-value"),
        pytest.param("spec.gates.7.min=1", "'7' is not an index", id="bad-index"),
        pytest.param(
            "spec.method.type.x=1", "spec.method.type is not a mapping", id="through-a-scalar"
        ),
    ],
)
def test_bad_overrides_are_usage_errors(item: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        apply_overrides(valid_job(), [item], None, None, None)


def test_local_paths_become_file_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert to_uri("data/train.jsonl") == (tmp_path / "data" / "train.jsonl").as_uri()
    assert to_uri("s3://bucket/x.jsonl") == "s3://bucket/x.jsonl"
    job = valid_job()
    apply_overrides(job, [], "models/smol", "d.jsonl", "out")
    assert job["spec"]["model"]["uri"] == (tmp_path / "models" / "smol").as_uri()
    assert job["spec"]["output"]["uri"] == (tmp_path / "out").as_uri()


def test_run_id_follows_the_spec() -> None:
    job = FineTuneJob.model_validate(valid_job())
    changed = valid_job()
    set_path(changed, "spec.hyperparameters.epochs", 5)
    assert local_run_id(job) == local_run_id(FineTuneJob.model_validate(valid_job()))
    assert local_run_id(job) != local_run_id(FineTuneJob.model_validate(changed))


def test_run_and_validate_report_a_bad_field_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One loader for both: the same problem line, with the file and the line of the field."""
    import yaml

    from kubetune.cli import main

    doc = valid_job()
    doc["spec"]["method"] = {"type": "lorra"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["validate", str(path)]) == 2
    validated = capsys.readouterr().err.strip().splitlines()
    assert main(["run", str(path), "--workdir", str(tmp_path / "w")]) == 2
    ran = capsys.readouterr().err.strip().splitlines()
    assert ran == validated and len(ran) == 1
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "lorra" in text)
    assert ran[0].startswith(f"{path}:{line}: spec.method.type")


def test_a_job_under_a_profile_runs_as_written_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from kubetune.cli import main

    doc = valid_job()
    doc["spec"]["profile"] = "a100-pool"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    # --nproc 3 cannot share the batch of 8: the run stops before training, after the note.
    assert main(["run", str(path), "--workdir", str(tmp_path / "w"), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "note: spec.profile (a100-pool) applies in the cluster" in err


def test_run_a_schedule_runs_what_its_template_stamps(tmp_path: Path) -> None:
    """`kubetune run schedule.yaml`: one run of the FineTuneJob the template stamps, now."""
    from kubetune.local import ValidationProblems, load_job

    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "retraining-schedule.yaml"
    overrides = {
        "sets": ["spec.hyperparameters.maxSteps=5"],
        "model": None,
        "dataset": None,
        "output": None,
    }
    job = load_job(str(example), None, overrides)
    assert job.metadata.name.startswith("text-to-sql-weekly-")
    assert job.spec.dataset.uri == "s3://datasets/text-to-sql/"
    assert job.spec.hyperparameters.max_steps == 5 and job.spec.hyperparameters.epochs is None
    assert [g.eval_set for g in job.spec.gates][-1] == "regression"

    bad = tmp_path / "bad.yaml"
    bad.write_text(example.read_text().replace('"0 3 * * 1"', '"0 3 * *"'))
    with pytest.raises(ValidationProblems) as caught:
        load_job(str(bad), None, overrides)
    assert "spec.schedule: '0 3 * *' has 4 fields" in str(caught.value)
