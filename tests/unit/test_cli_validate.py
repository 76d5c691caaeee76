"""`kubetune validate`: one line per problem naming file, line and field; exit code 2 on problems."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_examples_are_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    examples = ROOT / "examples"
    files = [str(p) for p in sorted([*examples.glob("*.yaml"), *examples.glob("profiles/*.yaml")])]
    # multi-node.yaml asks for 16 GPUs, over the chart's default cap, as its header says.
    values = write(tmp_path, "values.yaml", "trainer:\n  maxGpusPerJob: 16\n")
    assert main(["validate", "--settings", str(values), *files]) == 0
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
    # Alone, the profile is the cluster's to check (a warning), and 16 GPUs is over the
    # operator's default cap.
    assert main(["validate", str(greedy)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err
    assert f"greedy.yaml:{line}: spec.resources.gpus: 16 is more than this cluster allows" in err
    assert "(the operator's policy: the chart's defaults;" in err
    named = next(i for i, t in enumerate(greedy.read_text().splitlines(), 1) if "profile:" in t)
    assert f"greedy.yaml:{named}: warning: spec.profile: FineTuneProfile 'a100-pool' is not " in err


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


def _job_file(tmp_path: Path, name: str, **spec: object) -> Path:
    doc = valid_job()
    doc["spec"].update(spec)
    return write(tmp_path, name, yaml.safe_dump(doc, sort_keys=False))


def test_what_only_the_cluster_decides_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt profile is not silently valid: the files read are named, and so is what
    happens on a cluster without it; a serviceAccountName without a profile is allowed only by
    a profile (a default one on the cluster may). Warnings keep exit code 0."""
    misspelt = _job_file(tmp_path, "job.yaml", profile="a100pool")
    assert main(["validate", str(misspelt)]) == 0
    captured = capsys.readouterr()
    line = misspelt.read_text().splitlines().index("  profile: a100pool") + 1
    assert captured.err == (
        f"{misspelt}:{line}: warning: spec.profile: FineTuneProfile 'a100pool' is not among the "
        f"files read ({misspelt}); on a cluster without it the run waits in Pending "
        "(ProfileNotFound). Give its file too to check the job against it (kubectl get "
        "finetuneprofiles a100pool -o yaml > profile.yaml)\n"
    )
    assert captured.out.endswith("FineTuneJob sql-lora is valid (1 warning)\n")

    account = _job_file(tmp_path, "account.yaml", serviceAccountName="trainer-irsa")
    assert main(["validate", str(account)]) == 0
    err = capsys.readouterr().err
    assert "warning: spec.serviceAccountName: 'trainer-irsa' may be chosen only under a " in err
    assert err.rstrip().endswith("a default FineTuneProfile of the cluster may allow it")


def test_the_operators_policy_is_checked_with_the_charts_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GPUs per job, file:// outputs and trainer images: against the chart's defaults, or the
    values the cluster was installed with (--settings)."""
    greedy = _job_file(tmp_path, "gpus.yaml", resources={"gpus": 12})
    greedy.write_text(greedy.read_text().replace("batchSize: 8", "batchSize: 12"))
    local = _job_file(tmp_path, "local.yaml", output={"uri": "file:///tmp/out"})
    image = _job_file(tmp_path, "image.yaml", image="registry.example.com/ml/trainer:custom")
    assert main(["validate", str(greedy), str(local), str(image)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err
    assert (
        "gpus.yaml:" in err and "spec.resources.gpus: 12 is more than this cluster allows " in err
    )
    assert "per job (8) (the operator's policy: the chart's defaults; --settings" in err
    assert "local.yaml:" in err and "spec.output.uri: file:// would write inside the trainer" in err
    assert (
        "image.yaml:" in err
        and "spec.image: 'registry.example.com/ml/trainer:custom' is not" in err
    )

    values = write(
        tmp_path,
        "values.yaml",
        "trainer:\n  maxGpusPerJob: 16\n  allowFileOutput: true\n"
        "  allowedImages: [registry.example.com/ml/trainer:custom]\n",
    )
    files = [str(greedy), str(local), str(image)]
    assert main(["validate", "--settings", str(values), *files]) == 0
    tight = write(tmp_path, "tight.yaml", "trainer:\n  maxGpusPerJob: 1\n")
    assert main(["validate", "--settings", str(tight), str(greedy)]) == ExitCode.INVALID_SPEC
    assert f"allows per job (1) (the operator's policy: the values in {tight})" in (
        capsys.readouterr().err
    )
    broken = write(tmp_path, "broken.yaml", "trainer:\n  maxGpusPerJob: many\n")
    assert main(["validate", "--settings", str(broken), str(greedy)]) == ExitCode.INVALID_SPEC
    assert f"{broken}:2: trainer.maxGpusPerJob: " in capsys.readouterr().err


def test_settings_files_are_read_as_the_chart_reads_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A digest pins the image as the chart's helper does; a values file that is not a mapping
    is the file's problem (in JSON too); with --settings the hint to give them is not printed;
    an image refused only because the named profile was not given is a warning."""
    pinned = "registry.example.com/ml/trainer@sha256:" + "a" * 64
    image = _job_file(tmp_path, "image.yaml", image=pinned)
    digest = write(
        tmp_path, "digest.yaml",
        "trainer:\n  image:\n    repository: registry.example.com/ml/trainer\n"
        f"    tag: '1.0'\n    digest: sha256:{'a' * 64}\n",
    )  # fmt: skip
    assert main(["validate", "--settings", str(digest), str(image)]) == 0
    capsys.readouterr()
    gpus = _job_file(tmp_path, "gpus.yaml", resources={"gpus": 2})
    gpus.write_text(gpus.read_text().replace("batchSize: 8", "batchSize: 12"))
    one = write(tmp_path, "one.yaml", "trainer:\n  maxGpusPerJob: 1\n")
    assert main(["validate", "--settings", str(one), str(gpus)]) == ExitCode.INVALID_SPEC
    err = capsys.readouterr().err
    assert f"(the operator's policy: the values in {one})" in err and "--settings" not in err

    for text, field in (("- a\n- b\n", ""), ("trainer: [1]\n", "trainer: "),
                        ("trainer:\n  image: custom\n", "trainer.image: ")):  # fmt: skip
        values = write(tmp_path, "values.yaml", text)
        assert main(["validate", "--settings", str(values), str(gpus)]) == ExitCode.INVALID_SPEC
        assert f"{values}:1: {field}must be a mapping" in capsys.readouterr().err
        code = main(["validate", "-o", "json", "--settings", str(values), str(gpus)])
        (entry,) = json.loads(capsys.readouterr().out)
        assert code == ExitCode.INVALID_SPEC and entry["valid"] is False and entry["kind"] is None
        assert "must be a mapping" in entry["problems"][0]["message"]

    unknown = _job_file(tmp_path, "unknown.yaml", profile="gpu-team", image=pinned)
    assert main(["validate", str(unknown)]) == 0
    err = capsys.readouterr().err
    assert "warning: spec.image: 'registry.example.com/ml/trainer@sha256:" in err


def test_the_policy_defaults_are_the_charts() -> None:
    """What validate checks without --settings is what the chart installs by default."""
    from importlib.metadata import version

    from kubetune.controller.settings import OperatorSettings

    values = yaml.safe_load((ROOT / "helm" / "kubetune" / "values.yaml").read_text())["trainer"]
    chart = yaml.safe_load((ROOT / "helm" / "kubetune" / "Chart.yaml").read_text())
    defaults = OperatorSettings.model_validate({})
    assert defaults.max_gpus_per_job == values["maxGpusPerJob"]
    assert defaults.allow_file_output == values["allowFileOutput"]
    assert defaults.require_profile == values["requireProfile"]
    assert defaults.allowed_images == values["allowedImages"]
    image = f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert defaults.trainer_image == image
    assert chart["appVersion"] == version("kubetune")


def test_json_output_names_invalid_documents_and_files_without_objects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path, "bad.yaml", BAD)
    other = write(tmp_path, "other.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
    assert main(["validate", "-o", "json", str(bad), str(other)]) == ExitCode.INVALID_SPEC
    report = json.loads(capsys.readouterr().out)
    assert [(r["file"], r["kind"], r["name"], r["line"], r["valid"]) for r in report] == [
        (str(bad), "FineTuneJob", "bad", 1, False),
        (str(other), "v1/ConfigMap", "x", 1, False),
        (str(other), None, None, None, False),  # the file's problem: no kubetune object in it
    ]
    assert report[2]["problems"][0]["message"].startswith("no FineTuneJob, FineTuneProfile")


def test_validate_runs_on_the_core_dependencies_alone_and_imports_no_controller() -> None:
    """`pip install .` (no extras) is enough for kubetune validate: with the operator's and the
    trainer's libraries made unimportable, a job, a schedule and a profile check out, and
    nothing of kubetune.controller is loaded (admission is outside it)."""
    script = """
import importlib.abc, sys
EXTRAS = {"pydantic_settings", "kopf", "kubernetes", "torch", "prometheus_client", "obstore"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in EXTRAS:
            raise ImportError(f"{name} is not a core dependency")
sys.meta_path.insert(0, Block())
from kubetune.cli import main
sys.argv = ["kubetune", "validate", *sys.argv[1:]]
try:
    main()
finally:
    print(sorted(m for m in sys.modules if m.startswith("kubetune.controller")))
"""
    files = ["examples/quickstart.yaml", "examples/retraining-schedule.yaml"]
    done = subprocess.run(
        [sys.executable, "-c", script, *files], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "FineTuneJob quickstart is valid" in done.stdout
    assert "FineTuneSchedule text-to-sql-weekly is valid" in done.stdout
    assert done.stdout.rstrip().endswith("[]")
