"""The emulated API server (kmock + tests/support/cluster.py) and its test node
(tests/support/kubelet.py): what remains here is what only the emulator is for: its own
Kubernetes behaviours (test_emulator.py), and the fast fake trainer at hundreds of jobs
(test_namespaced.py, test_scale.py). A run's life runs on the real control plane (tests/e2e)."""

from __future__ import annotations

from tests.support.platform import OperatorProcess  # noqa: F401 (the tests import it from here)
