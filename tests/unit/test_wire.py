"""Each name on the operator-trainer wire is defined once, in kubetune/api/wire.py: no other
module of the product (the operator, the trainer, the CLI) writes one of them as a literal. A
second copy is how the two sides drift apart (a metric renamed on one side, a path on the
other)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kubetune.api import wire
from kubetune.api.wire import Env, Stage, TrainerMetric

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = [ROOT / "operator" / "kubetune", ROOT / "trainer-image" / "kubetune_trainer"]
HOME = ROOT / "operator" / "kubetune" / "api" / "wire.py"

# The distinctive ones: each names one thing, found as a whole word. (Stage names are ordinary
# words, "train" and "data": their calls are checked instead. The Info metric's name is also the
# trainer's package and logger name, MANAGED_BY the Lease's default name, "/work" and
# "config.json" ordinary path parts: left out.)
STRINGS = {
    wire.CONFIG_DIR,
    wire.DEFAULT_WORK_DIR,
    wire.TERMINATION_LOG,
    wire.RUN_LABEL,
    wire.JOB_LABEL,
    wire.SPEC_HASH_ANNOTATION,
    wire.PROFILE_LABEL,
    wire.SCHEDULE_LABEL,
    wire.SCHEDULED_TIME_ANNOTATION,
    *(e.value for e in Env),
    *(m.value for m in TrainerMetric if m is not TrainerMetric.INFO),
}
NUMBERS = {wire.RENDEZVOUS_PORT}
WORDS = re.compile("|".join(rf"(?<![\w./-]){re.escape(name)}(?![\w-])" for name in STRINGS))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose may name the wire)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _literals() -> list[str]:
    found = []
    for package in PRODUCT:
        for path in sorted(package.rglob("*.py")):
            if path == HOME:
                continue
            tree = ast.parse(path.read_text(), str(path))
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Constant) and id(node) not in docs:
                    value = node.value
                    if (isinstance(value, str) and WORDS.search(value)) or (
                        type(value) is int and value in NUMBERS
                    ):
                        found.append(f"{where} {value!r}")
                elif (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "stage"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):  # a stage reported by name rather than as a Stage: reporter.stage("train")
                    found.append(f"{where} stage({node.args[0].value!r})")
    return found


def test_every_wire_name_is_written_once() -> None:
    assert _literals() == []


def test_the_check_finds_a_copy() -> None:
    """The test above can fail: a module with copied names is found."""
    copy = PRODUCT[1] / "_wire_copy_check.py"
    copy.write_text(
        'PORT = 29500\nNAME = "kubetune_trainer_step"\n\n\ndef f(r):\n    r.stage("x")\n'
    )
    try:
        found = _literals()
    finally:
        copy.unlink()
    assert sorted(line.split(" ", 1)[1] for line in found) == sorted(
        ["29500", "'kubetune_trainer_step'", "stage('x')"]
    )


def test_the_stages_are_the_metrics_states() -> None:
    from kubetune_trainer.telemetry import STAGES

    assert [s.value for s in Stage] == STAGES
