"""Gates are pure: (metric, bound, threshold, value, passed) from metrics alone."""

from __future__ import annotations

import pytest

from kubetune.api import EvalMetrics, GateSpec, gates_summary
from kubetune_trainer.gates import References, check_gate, check_gates, describe

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


CHAMPION = EvalMetrics(loss=0.45, perplexity=1.57, exact_match=0.75, rouge_l=0.92, bleu=42.0)


# fmt: off
CHAMPION_CASES = [
    pytest.param({"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}, References(BASE, CHAMPION, "c0ffee01"), pytest.approx(-0.05), False, "promoted c0ffee01", id="worse-than-the-champion"),
    pytest.param({"metric": "loss", "maxRegression": 0.1, "compareWith": "promoted"}, References(BASE, CHAMPION, "c0ffee01"), pytest.approx(-0.05), True, "promoted c0ffee01", id="regression-within-bound"),
    pytest.param({"metric": "exactMatch", "maxRegression": 0.0, "compareWith": "promoted"}, References(BASE, CHAMPION, "c0ffee01"), pytest.approx(-0.05), False, "promoted c0ffee01", id="no-regression-allowed"),
    pytest.param({"metric": "loss", "minImprovement": 0.5, "compareWith": "promoted"}, References(BASE, None, None), 1.0, True, "base (nothing promoted yet)", id="first-run-falls-back-to-the-base"),
    pytest.param({"metric": "loss", "minImprovement": 0.5, "compareWith": "promoted"}, References(None, None, None), None, True, "nothing promoted yet", id="first-run-without-base-passes"),
    pytest.param({"metric": "loss", "maxRegression": 0.0}, References(BASE, CHAMPION, "c0ffee01"), 1.0, True, "base", id="regression-against-the-base"),
    pytest.param({"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}, References(BASE, None, "c0ffee01"), None, False, "promoted c0ffee01", id="champion-not-measured-fails"),
]
# fmt: on


@pytest.mark.parametrize(("gate", "refs", "value", "passed", "compared"), CHAMPION_CASES)
def test_gates_against_the_promoted_run(
    gate: dict, refs: References, value: float | None, passed: bool, compared: str
) -> None:
    result = check_gate(GateSpec.model_validate(gate), TUNED, refs)
    assert (result.value, result.passed, result.compared_with) == (value, passed, compared)


def test_describe_a_champion_gate() -> None:
    gate = GateSpec.model_validate(
        {"metric": "loss", "minImprovement": 0.0, "compareWith": "promoted"}
    )
    result = check_gate(gate, TUNED, References(BASE, CHAMPION, "c0ffee01"))
    assert (
        describe(result)
        == "loss improves by >= 0 vs promoted c0ffee01: regressed by 0.05 (failed by 0.05)"
    )
    gate = GateSpec.model_validate(
        {"metric": "loss", "maxRegression": 0.01, "compareWith": "promoted"}
    )
    result = check_gate(gate, TUNED, References(BASE, CHAMPION, "c0ffee01"))
    assert (
        describe(result)
        == "loss regresses by <= 0.01 vs promoted c0ffee01: regressed by 0.05 (failed by 0.04)"
    )


def test_regression_gates_read_the_regression_set() -> None:
    """The forgetting check: a gate with evalSet: regression reads the regression set's
    metrics, the others the test set's, in one list of verdicts."""
    gates = [
        GateSpec.model_validate({"metric": "loss", "minImprovement": 0.5}),
        GateSpec.model_validate({"metric": "loss", "maxRegression": 0.1, "evalSet": "regression"}),
        GateSpec.model_validate(
            {
                "metric": "loss",
                "maxRegression": 0.0,
                "compareWith": "promoted",
                "evalSet": "regression",
            }
        ),
    ]
    # Better on the task, a little worse on general behaviour than the base (within 0.1), and
    # worse than the champion on it (not within 0).
    general = (
        EvalMetrics(loss=2.05),
        References(
            base=EvalMetrics(loss=2.0), promoted=EvalMetrics(loss=1.9), promoted_run_id="c1"
        ),
    )
    task, forgot, champion = check_gates(gates, TUNED, BASE, general)
    assert (task.value, task.passed, task.eval_set) == (1.0, True, None)
    assert (forgot.value, forgot.passed, forgot.eval_set) == (
        pytest.approx(-0.05),
        True,
        "regression",
    )
    assert (champion.value, champion.passed) == (pytest.approx(-0.15), False)
    assert describe(champion) == (
        "loss on the regression set regresses by <= 0 vs promoted c1: regressed by 0.15 (failed "
        "by 0.15)"
    )
    # No regression set measured: a regression gate is not measured and fails.
    assert [g.passed for g in check_gates(gates, TUNED, BASE)] == [True, False, False]
    # A champion not measured on the regression set: the base stands in, and the verdict says so.
    unmeasured = References(base=EvalMetrics(loss=2.0), unpromoted="promoted c1 not measured")
    verdict = check_gates(gates[2:], TUNED, BASE, (EvalMetrics(loss=2.0), unmeasured))[0]
    assert verdict.passed and verdict.compared_with == "base (promoted c1 not measured)"
