"""The user docs say what the code does: the columns `kubectl get ftj` prints, and no words
from the project's own work tracking."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _columns(wide: bool = False, kind: str = "finetunejobs") -> list[str]:
    crd = yaml.safe_load((ROOT / "crds" / f"kubetune.dev_{kind}.yaml").read_text())
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    return ["NAME"] + [c["name"].upper() for c in columns if wide or not c.get("priority")]


def test_documented_get_output_has_the_crds_columns() -> None:
    operator = (ROOT / "docs" / "operator.md").read_text()
    (comment,) = re.findall(r"kubectl get ftj -w\s+# (.+)", operator)
    assert comment.split() == _columns()
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    header = re.search(r"\$ kubectl get ftj -n ml -w\n(.+)\n", guide)
    assert header is not None and header.group(1).split() == _columns()


def test_documented_kubetune_get_has_its_columns() -> None:
    from kubetune.client.show import table

    guide = (ROOT / "docs" / "user-guide.md").read_text()
    (comment,) = re.findall(r"^kubetune get +# (.+)$", guide, re.MULTILINE)
    assert comment.split() == table([]).split()


def test_documented_profile_listing_has_the_crds_columns() -> None:
    guide = (ROOT / "docs" / "platform-guide.md").read_text()
    header = re.search(r"kubectl get finetuneprofiles .*\n# (.+)\n", guide)
    assert header is not None and header.group(1).split() == _columns(kind="finetuneprofiles")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_work_tracking_jargon(path: Path) -> None:
    text = path.read_text()
    for pattern in (r"\bissue \d+\b", r"\boriginal contract\b", r"\bwill do this\b"):
        assert not re.search(pattern, text, re.IGNORECASE), (path.name, pattern)


def _manifests() -> list[Any]:
    """Every fenced YAML block of the docs that is a kubetune manifest, with its page and line."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for block in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            if "apiVersion: kubetune.dev/" in block.group(1):
                line = text[: block.start()].count("\n") + 2
                out.append(pytest.param(block.group(1), id=f"{path.name}:{line}"))
    return out


@pytest.mark.parametrize("manifest", _manifests())
def test_every_manifest_in_the_docs_is_valid_as_written(manifest: str, tmp_path: Path) -> None:
    """What a reader copies from a page passes `kubetune validate` (and so the CRD: the
    validation tables keep the two in agreement)."""
    from kubetune.manifests import check_against_cluster, load_manifests

    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(manifest)
    docs = load_manifests(str(snippet))
    check_against_cluster(docs)
    assert docs and [p for d in docs for p in d.problems] == []


def test_the_docs_show_manifests() -> None:
    assert len(_manifests()) >= 5  # the extraction above still finds the pages' manifests


# Where the operator names a reason: a run's state, an Event, a condition of a run or schedule.
REASON_SITES = (
    r'State\(\s*"([A-Z]\w+)"',
    r'Event\(\s*"(?:Normal|Warning)",\s*"([A-Z]\w+)"',
    r'\.event\(\s*\w+,\s*"(?:Normal|Warning)",\s*"([A-Z]\w+)"',
    r'make_condition\(\s*"\w+",\s*[^,]+,\s*"([A-Z]\w+)"',
    r'_ready\(\s*[^,]+,\s*"([A-Z]\w+)"',
)


def reasons_the_code_emits() -> set[str]:
    from kubetune.controller.conditions import FAILED_REASONS, WAITING_REASONS

    reasons = set(FAILED_REASONS | WAITING_REASONS)
    for path in (ROOT / "operator" / "kubetune").rglob("*.py"):
        text = path.read_text()
        for site in REASON_SITES:
            reasons |= set(re.findall(site, text))
    return reasons


def test_troubleshooting_explains_every_reason_the_operator_emits() -> None:
    reasons = reasons_the_code_emits()
    assert {"GatesFailed", "JobAlreadyActive", "NotificationFailed", "Scheduled"} <= reasons
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    assert sorted(r for r in reasons if f"`{r}`" not in page) == []


def test_every_link_within_the_api_reference_has_its_section() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", page, re.M)
    }
    links = set(re.findall(r"\]\(#([\w-]+)\)", page))
    assert links and sorted(links - anchors) == []


def test_run_help_names_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune.api import ExitCode
    from kubetune.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in ExitCode:
        assert re.search(rf"\b{int(code)} \w", text.split("Exit codes:")[1]), code


def test_the_metrics_page_lists_every_reconcile_trigger() -> None:
    """docs/metrics.md names the values of the reconcile duration's trigger label: exactly the
    Trigger enum's (the label was once derived from kind names, and the page missed two)."""
    from kubetune.controller.metrics import Trigger

    page = (ROOT / "docs" / "metrics.md").read_text()
    (row,) = [line for line in page.splitlines() if "`kubetune_operator_reconcile_duration" in line]
    labels = row.split("|")[3]
    words = re.findall(r"(?<![A-Za-z])[a-z][a-z-]*(?![A-Za-z])", labels.split("(", 1)[1])
    listed = set(words) - {"for", "a"}
    assert listed == {t.value for t in Trigger}
