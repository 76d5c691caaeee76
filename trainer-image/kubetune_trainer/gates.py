"""The gates stage: pure functions from metrics to verdicts. Promotion is decided here alone.

A gate bounds the tuned value (min, max) or its difference from a reference (minImprovement,
maxRegression): the untuned base model, or the promoted run (the champion) evaluated on the same
test set. A gate with evalSet: regression reads the regression set instead (the forgetting
check: general behaviour measured on evaluation.regressionUri). With nothing promoted yet, a
gate that compares with the promoted run compares with the base model instead, or passes when
the base was not evaluated: the first run that passes its other gates becomes the champion.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api import EvalMetrics, GateResult, GateSpec
from kubetune.api.spec import LOWER_IS_BETTER


@dataclass(frozen=True)
class References:
    """What improvement gates compare with."""

    base: EvalMetrics | None = None
    promoted: EvalMetrics | None = None
    promoted_run_id: str | None = None  # None: nothing promoted yet
    # Why promoted_run_id is None: nothing is promoted, or the champion was not measured on
    # this set (a champion of another base model has no regression metrics to stand in).
    unpromoted: str = "nothing promoted yet"


def metric_value(metrics: EvalMetrics | None, metric: str) -> float | None:
    if metrics is None:
        return None
    return metrics.model_dump(by_alias=True).get(metric)


def improvement(metric: str, tuned: float, base: float) -> float:
    """How much better tuned is than base; positive is better whichever way the metric runs."""
    return base - tuned if metric in LOWER_IS_BETTER else tuned - base


def _reference(gate: GateSpec, refs: References) -> tuple[EvalMetrics | None, str, bool]:
    """(the reference metrics, what they are, whether a missing reference passes)."""
    if gate.reference() == "promoted":
        if refs.promoted_run_id is not None:
            return refs.promoted, f"promoted {refs.promoted_run_id}", False
        if refs.base is None:
            return None, refs.unpromoted, True
        return refs.base, f"base ({refs.unpromoted})", False
    return refs.base, "base", False


def check_gate(
    gate: GateSpec, tuned: EvalMetrics | None, base: EvalMetrics | References | None
) -> GateResult:
    refs = base if isinstance(base, References) else References(base=base)
    value = metric_value(tuned, gate.metric)
    compared = None
    if gate.min is not None:
        bound, threshold = "min", gate.min
        passed = value is not None and value >= threshold
    elif gate.max is not None:
        bound, threshold = "max", gate.max
        passed = value is not None and value <= threshold
    else:
        reference, compared, free = _reference(gate, refs)
        if gate.min_improvement is not None:
            bound, threshold = "minImprovement", gate.min_improvement
        else:
            assert gate.max_regression is not None
            bound, threshold = "maxRegression", gate.max_regression
        ref_value = metric_value(reference, gate.metric)
        value = (
            None
            if value is None or ref_value is None
            else improvement(gate.metric, value, ref_value)
        )
        if value is None:
            passed = free and reference is None
        elif bound == "minImprovement":
            passed = value >= threshold
        else:
            passed = value >= -threshold
    return GateResult(
        metric=gate.metric,
        bound=bound,
        threshold=threshold,
        value=value,
        passed=passed,
        compared_with=compared,
    )


def check_gates(
    gates: list[GateSpec],
    tuned: EvalMetrics | None,
    base: EvalMetrics | References | None,
    regression: tuple[EvalMetrics | None, References] | None = None,
) -> list[GateResult]:
    """Each gate on its evaluation set: the test set's metrics (tuned, base), or, for a gate
    with evalSet: regression, the regression set's (tuned, references); a regression gate with
    no regression metrics is not measured and fails."""
    out = []
    for gate in gates:
        if gate.eval_set == "regression":
            verdict = check_gate(gate, *(regression or (None, None)))
            if regression is None:  # nothing measured: no free pass
                verdict = verdict.model_copy(
                    update={"value": None, "passed": False, "compared_with": None}
                )
            out.append(verdict.model_copy(update={"eval_set": "regression"}))
        else:
            out.append(check_gate(gate, tuned, base))
    return out


def describe(result: GateResult) -> str:
    """'exactMatch >= 0.5: 0.42 (failed by 0.08)'; 'loss regresses by <= 0 vs promoted a1b2c3d4:
    regressed by 0.03 (failed by 0.03)': a relative gate says which way the metric moved."""
    op = {
        "min": ">=",
        "max": "<=",
        "minImprovement": "improves by >=",
        "maxRegression": "regresses by <=",
    }[result.bound]
    against = f" vs {result.compared_with}" if result.compared_with else ""
    where = " on the regression set" if result.eval_set == "regression" else ""
    head = f"{result.metric}{where} {op} {result.threshold:g}{against}"
    if result.value is None:
        if result.passed:
            return f"{head}: passed (nothing to compare with)"
        return f"{head}: not measured (failed)"
    limit = -result.threshold if result.bound == "maxRegression" else result.threshold
    verdict = "passed" if result.passed else f"failed by {abs(result.value - limit):.4g}"
    if result.bound in ("minImprovement", "maxRegression"):  # value: the improvement
        moved = "improved" if result.value >= 0 else "regressed"
        return f"{head}: {moved} by {abs(result.value):.4g} ({verdict})"
    return f"{head}: {result.value:.4g} ({verdict})"
