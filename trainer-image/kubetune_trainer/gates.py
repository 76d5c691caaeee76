"""The gates stage: pure functions from metrics to verdicts. Promotion is decided here alone."""

from __future__ import annotations

from kubetune.api import EvalMetrics, GateResult, GateSpec
from kubetune.api.spec import LOWER_IS_BETTER


def metric_value(metrics: EvalMetrics | None, metric: str) -> float | None:
    if metrics is None:
        return None
    return metrics.model_dump(by_alias=True).get(metric)


def improvement(metric: str, tuned: float, base: float) -> float:
    """How much better tuned is than base; positive is better whichever way the metric runs."""
    return base - tuned if metric in LOWER_IS_BETTER else tuned - base


def check_gate(gate: GateSpec, tuned: EvalMetrics | None, base: EvalMetrics | None) -> GateResult:
    value = metric_value(tuned, gate.metric)
    if gate.min is not None:
        bound, threshold = "min", gate.min
        passed = value is not None and value >= threshold
    elif gate.max is not None:
        bound, threshold = "max", gate.max
        passed = value is not None and value <= threshold
    else:
        assert gate.min_improvement is not None
        bound, threshold = "minImprovement", gate.min_improvement
        base_value = metric_value(base, gate.metric)
        value = (
            None
            if value is None or base_value is None
            else improvement(gate.metric, value, base_value)
        )
        passed = value is not None and value >= threshold
    return GateResult(
        metric=gate.metric, bound=bound, threshold=threshold, value=value, passed=passed
    )


def check_gates(
    gates: list[GateSpec], tuned: EvalMetrics | None, base: EvalMetrics | None
) -> list[GateResult]:
    return [check_gate(g, tuned, base) for g in gates]


def describe(result: GateResult) -> str:
    """'exactMatch >= 0.5: 0.42 (failed by 0.08)'."""
    op = {"min": ">=", "max": "<=", "minImprovement": "improves by >="}[result.bound]
    if result.value is None:
        return f"{result.metric} {op} {result.threshold:g}: not measured (failed)"
    verdict = "passed" if result.passed else f"failed by {abs(result.value - result.threshold):.4g}"
    return f"{result.metric} {op} {result.threshold:g}: {result.value:.4g} ({verdict})"
