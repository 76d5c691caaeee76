"""A real Prometheus (Debian's package) scrapes the operator and a running trainer during an
run on the real control plane (the trainer listens on its pod's IP); PromQL over its HTTP API finds the series with the expected values."""

from __future__ import annotations

from pathlib import Path

from tests.support.platform import FINAL, Platform
from tests.support.prometheus import Prometheus


def _metrics_port(pod: dict) -> int:
    (port,) = [p for p in pod["spec"]["containers"][0]["ports"] if p["name"] == "metrics"]
    return int(port["containerPort"])


def test_prometheus_scrapes_operator_and_trainer(
    platform: Platform, ns: str, tmp_path: Path
) -> None:
    prometheus = Prometheus(
        tmp_path / "prometheus", {"operator": f"127.0.0.1:{platform.operator.metrics_port}"}
    )
    try:
        doc = platform.job(
            ns,
            "watched",
            hyperparameters__maxSteps=400,
            gates=[{"metric": "loss", "minImprovement": 0.0}],
        )
        platform.apply(doc)
        platform.wait_phase(ns, "watched", ("Running", *FINAL))
        (pod,) = platform.wait_for(
            "the pod's IP",
            lambda: [
                p for p in platform.children(ns, "pods", "watched") if p["status"].get("podIP")
            ],
        )
        # What a PodMonitor would do: scrape the pod's IP at its `metrics` port, label it with
        # the pod.
        target = f"{pod['status']['podIP']}:{_metrics_port(pod)}"
        prometheus.set_targets({target: {"namespace": ns, "pod": pod["metadata"]["name"]}})

        step = f'kubetune_trainer_step{{namespace="{ns}"}}'
        platform.wait_for(
            "trainer steps in Prometheus", lambda: (prometheus.value(step) or 0) > 0, 90
        )
        assert prometheus.value(f'kubetune_trainer_total_steps{{namespace="{ns}"}}') == 400
        for name in ("epoch", "learning_rate", "tokens_per_second"):
            assert prometheus.query(f'kubetune_trainer_{name}{{namespace="{ns}"}}'), name
        info = prometheus.query(f'kubetune_trainer_info{{namespace="{ns}"}}')
        assert info and info[0]["metric"]["job"] == "trainers"  # the scrape job's label wins

        status = platform.wait_phase(ns, "watched", FINAL, timeout=180)
        assert status["phase"] == "Succeeded", status
        succeeded = f'kubetune_operator_finetunejobs{{namespace="{ns}",phase="Succeeded"}}'
        platform.wait_for("the operator's gauge", lambda: prometheus.value(succeeded) == 1, 30)
        assert (
            prometheus.value(f'kubetune_operator_finetunejobs{{namespace="{ns}",phase="Running"}}')
            == 0
        )
        transitions = f'sum(kubetune_operator_phase_transitions_total{{namespace="{ns}",to_phase="Succeeded"}})'
        assert prometheus.value(transitions) == 1
        assert (
            prometheus.value(
                'sum(kubetune_operator_job_duration_seconds_count{outcome="Succeeded"})'
            )
            >= 1
        )
        assert (
            prometheus.value(
                'sum(kubetune_operator_gate_results_total{metric="loss",outcome="passed"})'
            )
            >= 1
        )
        assert prometheus.value("sum(kubetune_operator_reconcile_duration_seconds_count)") > 0
        assert prometheus.value('up{job="operator"}') == 1
    finally:
        prometheus.stop()
