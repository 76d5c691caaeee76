"""Gates are pure: (metric, bound, threshold, value, passed) from metrics alone."""

from __future__ import annotations

import pytest

from kubetune.api import EvalMetrics, GateSpec, gates_summary
from kubetune_trainer.gates import check_gate, describe

TUNED = EvalMetrics(loss=0.5, perplexity=1.65, exact_match=0.7, rouge_l=0.9, bleu=40.0)
BASE = EvalMetrics(loss=1.5, perplexity=4.48, exact_match=0.1, rouge_l=0.3, bleu=5.0)


# fmt: off
VERDICT_CASES = [
        pytest.param({"metric": "exactMatch", "min": 0.5}, 0.7, True, id="min-passes"),
        pytest.param({"metric": "exactMatch", "min": 0.8}, 0.7, False, id="min-fails"),
        pytest.param({"metric": "exactMatch", "min": 0.7}, 0.7, True, id="min-inclusive"),
        pytest.param({"metric": "loss", "max": 0.6}, 0.5, True, id="max-passes"),
        pytest.param({"metric": "perplexity", "max": 1.5}, 1.65, False, id="max-fails"),
        pytest.param({"metric": "exactMatch", "minImprovement": 0.5}, pytest.approx(0.6), True, id="improvement-higher-better"),
        pytest.param({"metric": "loss", "minImprovement": 0.5}, 1.0, True, id="improvement-lower-better"),
        pytest.param({"metric": "loss", "minImprovement": 1.5}, 1.0, False, id="improvement-too-small"),
        pytest.param({"metric": "bleu", "minImprovement": -1.0}, 35.0, True, id="negative-threshold"),
    ]
# fmt: on


@pytest.mark.parametrize(("gate", "value", "passed"), VERDICT_CASES)
def test_gate_verdicts(gate: dict, value: float, passed: bool) -> None:
    result = check_gate(GateSpec.model_validate(gate), TUNED, BASE)
    assert result.value == value
    assert result.passed is passed


def test_unmeasured_metric_fails_the_gate() -> None:
    result = check_gate(GateSpec(metric="bleu", min=1.0), EvalMetrics(loss=0.5), None)
    assert (result.value, result.passed) == (None, False)
    assert describe(result) == "bleu >= 1: not measured (failed)"


def test_improvement_without_base_fails() -> None:
    result = check_gate(GateSpec(metric="loss", min_improvement=0.1), TUNED, None)
    assert result.passed is False and result.value is None


def test_describe_and_summary() -> None:
    failed = check_gate(GateSpec(metric="exactMatch", min=0.8), TUNED, BASE)
    assert describe(failed) == "exactMatch >= 0.8: 0.7 (failed by 0.1)"
    ok = check_gate(GateSpec(metric="loss", max=1.0), TUNED, BASE)
    assert gates_summary([failed, ok]) == "1/2 passed"
    assert gates_summary([]) is None
