"""What a person sees of a run on the console, wherever it runs: the stages as lines, training as
a tqdm bar (step, loss, tokens/s, ETA), and the summary table of the outcome. `kubetune run`
draws it from the trainer in this process, `kubetune submit --wait` from the run's status."""

from __future__ import annotations

import sys
from typing import Any

from kubetune.api import FineTuneJob, TrainerResult
from kubetune.api.wire import Stage


class ProgressBar:
    """Draws stages as lines and training as a tqdm bar with loss, throughput and ETA."""

    def __init__(self, mininterval: float = 0.1) -> None:
        self.bar: Any = None
        self.mininterval = mininterval  # seconds between two draws (tqdm's)

    def stage(self, name: str, detail: str = "") -> None:
        if self.bar is not None and name != Stage.TRAIN:
            self.bar.close()
            self.bar = None
        if name in (Stage.DONE, Stage.FAILED):
            return
        print(f"==> {name}{': ' + detail if detail else ''}", file=sys.stderr, flush=True)

    def step(self, info: Any) -> None:
        from tqdm import tqdm

        postfix = {}
        if info.loss is not None:
            postfix["loss"] = f"{info.loss:.3f}"
        if info.tokens_per_second:
            postfix["tok/s"] = f"{info.tokens_per_second:.0f}"
        if self.bar is None:  # its first line is this step's, not an empty 0/N
            self.bar = tqdm(
                total=info.total_steps,
                initial=info.step,
                postfix=postfix,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=self.mininterval,
            )
            return
        self.bar.total = info.total_steps
        # The step's own loss and rate first, then the step: the line drawn shows them together
        # (set after the update, the line showed the step before's until the next draw).
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(info.step - self.bar.n)

    @property
    def shown(self) -> int:
        """The step the bar shows (0 before training)."""
        return int(self.bar.n) if self.bar is not None else 0

    def eval_loss(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.write(f"    eval loss at step {step}: {loss:.4f}")


def summary(job: FineTuneJob, result: TrainerResult) -> str:
    from kubetune_trainer.gates import describe

    lines = [f"Run {result.run_id} of {job.metadata.name}: {result.outcome} — {result.message}"]
    metrics = result.metrics
    if metrics and metrics.tuned:
        # Columns: base, the champion when a gate compared with it, tuned; rows: the test set's
        # metrics, then the regression set's when it was measured.
        champion = f"promoted {metrics.promoted_run_id or ''}".strip()
        columns = [("base", metrics.base), (champion, metrics.promoted), ("tuned", metrics.tuned)]
        sets = [("", metrics.base, metrics.promoted, metrics.tuned)]
        if metrics.regression and metrics.regression.tuned:
            r = metrics.regression
            sets.append((" (regression set)", r.base, r.promoted, r.tuned))
        shown = [i for i, (_, m) in enumerate(columns) if m is not None or i != 1]
        width = max(12, *(len(columns[i][0]) for i in shown))
        head = "".join(f" {columns[i][0]:>{width}}" for i in shown)
        lines += ["", f"  {'metric':<28}{head}"]
        for suffix, *values in sets:
            dumped = [v.model_dump(by_alias=True) if v else {} for v in values]
            for name in job.spec.evaluation.metrics:
                cells = "".join(f" {_num(dumped[i].get(name)):>{width}}" for i in shown)
                lines.append(f"  {name + suffix:<28}{cells}")
    if result.gates:
        lines += ["", "  gates:"]
        lines += [f"    {'PASS' if g.passed else 'FAIL'}  {describe(g)}" for g in result.gates]
    if result.artifacts:
        lines += ["", "  artifacts:"]
        for key, value in result.artifacts.model_dump(by_alias=True, exclude_none=True).items():
            lines.append(f"    {key:<12} {value}")
    if result.warnings:
        lines += ["", "  warnings:"] + [f"    ! {w}" for w in result.warnings]
    if result.steps is not None:
        resumed = (
            f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else ""
        )
        tokens = f" ({result.tokens:,} tokens)" if result.tokens else ""
        lines += [
            "",
            f"  trained {result.steps} steps{tokens} in {result.train_seconds or 0:.0f} s{resumed}",
        ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
