"""The user docs say what the code does: the columns `kubectl get ftj` prints, and no words
from the project's own work tracking."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_documented_profile_listing_has_the_crds_columns() -> None:
    guide = (ROOT / "docs" / "platform-guide.md").read_text()
    header = re.search(r"kubectl get finetuneprofiles .*\n# (.+)\n", guide)
    assert header is not None and header.group(1).split() == _columns(kind="finetuneprofiles")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_no_work_tracking_jargon(path: Path) -> None:
    text = path.read_text()
    for pattern in (r"\bissue \d+\b", r"\boriginal contract\b", r"\bwill do this\b"):
        assert not re.search(pattern, text, re.IGNORECASE), (path.name, pattern)
