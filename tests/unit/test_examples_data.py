"""The demo dataset is what its seeded generator makes, so it can be regenerated and reviewed."""

from __future__ import annotations

import json
import runpy

from tests.conftest import ROOT


def test_text_to_sql_data_is_reproducible() -> None:
    generator = runpy.run_path(str(ROOT / "examples" / "data" / "make_text_to_sql.py"))
    expected = "".join(json.dumps(r) + "\n" for r in generator["records"]())
    assert (ROOT / "examples" / "data" / "text-to-sql.jsonl").read_text() == expected
