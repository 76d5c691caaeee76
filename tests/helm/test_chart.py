"""The Helm chart: lint, render, validate against Kubernetes' schemas, least-privilege RBAC in
both modes, the CRD in sync, every value documented, the alert rules checked and unit-tested by
promtool, the dashboard drawing only metrics that exist."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune.controller.kube import CLUSTER_PERMISSIONS, LEADER_PERMISSIONS, PERMISSIONS
from kubetune.controller.metrics import OperatorMetrics
from kubetune.controller.settings import OperatorSettings
from tests.conftest import ROOT
from tests.support.tools import helm

CHART = ROOT / "helm" / "kubetune"
NAMESPACED = [
    "--set",
    "watchNamespaces={ml,research}",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.dashboard.enabled=true",
    "--set",
    "networkPolicy.enabled=true",
    "--set",
    "trainer.allowedImages={registry.example.com/ml/trainer:1}",
    "--set",
    "trainer.defaultMemory=16Gi",
]
MODES = {"cluster-wide": [], "namespaced": NAMESPACED}


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm()), *args], capture_output=True, text=True, check=False)


def render(*args: str) -> list[dict[str, Any]]:
    done = _helm("template", "kt", str(CHART), "--namespace", "kubetune-system", *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("mode", MODES)
def test_lint_strict(mode: str) -> None:
    done = _helm("lint", "--strict", str(CHART), *MODES[mode])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", ["1.30", "1.34"])
@pytest.mark.parametrize("mode", MODES)
def test_rendered_manifests_are_valid_kubernetes(mode: str, version: str, tmp_path: Path) -> None:
    docs = render(*MODES[mode])
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(core))
    validate = shutil.which("kubernetes-validate", path=str(Path(ROOT / ".venv" / "bin")))
    done = subprocess.run(
        [validate or "kubernetes-validate", "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


NAMESPACED_RULES = [
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetunejobs"],
        "verbs": ["get", "list", "watch", "create", "delete"],  # a schedule's stamped runs
    },
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetuneschedules"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetunejobs/status", "finetuneschedules/status"],
        "verbs": ["patch"],
    },
    {
        "apiGroups": ["kubetune.dev"],
        "resources": ["finetunejobs/finalizers", "finetuneschedules/finalizers"],
        "verbs": ["update"],
    },
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {
        "apiGroups": [""],
        "resources": ["services"],
        "verbs": ["get", "list", "watch", "create", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
]


def _operator_roles(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The operator's own roles (not the aggregated user roles)."""
    return [d for d in by_kind(docs, kind) if not d["metadata"]["name"].endswith(USER_ROLES)]


USER_ROLES = ("-edit", "-view", "-profile-reader")
LEASE = "-leader-election"
PROFILES = "-profiles"  # the operator's cluster-wide reads: FineTuneProfiles, namespaces


def _profile_reads(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's one cluster-wide read-only role, in every mode, and that it is bound."""
    (role,) = [r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith(PROFILES)]
    (binding,) = [
        b for b in by_kind(docs, "ClusterRoleBinding") if b["metadata"]["name"].endswith(PROFILES)
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    assert _granted(role) == {(g, r, v) for g, r, verbs in CLUSTER_PERMISSIONS for v in verbs}
    return role


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses() -> None:
    docs = render()
    _profile_reads(docs)
    (role,) = [r for r in _operator_roles(docs, "ClusterRole") if r is not _profile_reads(docs)]
    assert role["rules"] == NAMESPACED_RULES  # nothing more cluster-wide (no CRD discovery)
    # The one Role: the Lease, in the release's namespace.
    (lease_role,) = by_kind(docs, "Role")
    assert lease_role["metadata"]["namespace"] == "kubetune-system"
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update"]}
    ]  # fmt: skip
    (binding,) = [
        b
        for b in _operator_roles(docs, "ClusterRoleBinding")
        if b["roleRef"]["name"] == role["metadata"]["name"]
    ]
    assert binding["subjects"][0]["name"] == by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]


def test_namespaced_mode_has_roles_and_only_the_profile_reads_cluster_wide() -> None:
    docs = render(*NAMESPACED)
    reads = _profile_reads(docs)
    assert _operator_roles(docs, "ClusterRole") == [reads]
    roles = [r for r in by_kind(docs, "Role") if not r["metadata"]["name"].endswith(LEASE)]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    assert all(r["rules"] == NAMESPACED_RULES for r in roles)
    bindings = [
        b for b in by_kind(docs, "RoleBinding") if not b["metadata"]["name"].endswith(LEASE)
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    env = _env(docs)
    assert json.loads(env["KUBETUNE_NAMESPACES"]) == ["ml", "research"]


def _roles(*args: str) -> list[dict[str, Any]]:
    """The roles that grant the operator its rights in watched namespaces (not the Lease's, not
    the cluster-wide reads of profiles and namespaces)."""
    docs = render(*args)
    roles = [*_operator_roles(docs, "ClusterRole"), *by_kind(docs, "Role")]
    return [r for r in roles if not r["metadata"]["name"].endswith((LEASE, PROFILES))]


@pytest.mark.parametrize("mode", MODES)
def test_users_get_finetunejobs_through_the_default_roles(mode: str) -> None:
    """edit/admin may do everything to FineTuneJobs (patch included: suspend, a new spec), view
    may read them; through aggregation labels, so a RoleBinding of edit is all a team needs."""
    roles = {r["metadata"]["name"]: r for r in by_kind(render(*MODES[mode]), "ClusterRole")}
    edit, view = roles["kt-kubetune-edit"], roles["kt-kubetune-view"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    granted = {(r, v) for rule in edit["rules"] for r in rule["resources"] for v in rule["verbs"]}
    for verb in ("create", "get", "list", "watch", "patch", "update", "delete"):
        assert ("finetunejobs", verb) in granted
    assert all(set(rule["verbs"]) == {"get", "list", "watch"} for rule in view["rules"])
    assert not any("secrets" in rule["resources"] for r in (edit, view) for rule in r["rules"])
    off = by_kind(render(*MODES[mode], "--set", "userRoles.aggregate=false"), "ClusterRole")
    assert not [r for r in off if r["metadata"]["name"].endswith(("-edit", "-view"))]


def test_every_user_may_list_the_profiles_and_nothing_else() -> None:
    docs = render()
    (reader,) = [
        r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-profile-reader")
    ]
    assert _granted(reader) == {
        ("kubetune.dev", "finetuneprofiles", v) for v in ("get", "list", "watch")
    }
    (binding,) = [
        b
        for b in by_kind(docs, "ClusterRoleBinding")
        if b["roleRef"]["name"] == reader["metadata"]["name"]
    ]
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}
    ]
    off = render("--set", "userRoles.profilesReadableByAll=false")
    assert not [r for r in by_kind(off, "ClusterRole") if "profile-reader" in r["metadata"]["name"]]


def _notes(*args: str) -> str:
    done = _helm("install", "kt", str(CHART), "--dry-run=client", "-n", "kubetune-system", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("NOTES:", 1)[1]


def test_notes_say_what_next_and_warn_about_unpublished_images() -> None:
    notes = _notes()
    assert "rollout status deploy/kt-kubetune" in notes and "kubectl get ftj -w" in notes
    assert "WARNING: ghcr.io/kubetune/operator:0.1.0 and ghcr.io/kubetune/trainer:0.1.0" in notes
    own = _notes("--set", "image.repository=registry.example.com/kubetune/operator")
    assert "WARNING: ghcr.io/kubetune/trainer:0.1.0 is not published" in own
    both = _notes(
        "--set", "image.repository=registry.example.com/op",
        "--set", "trainer.image.repository=registry.example.com/tr",
    )  # fmt: skip
    assert "WARNING" not in both


def test_secrets_are_only_read_one_by_name_and_can_be_turned_off() -> None:
    for mode in MODES.values():
        for role in _roles(*mode):
            for rule in role["rules"]:
                assert "*" not in rule["resources"] + rule["verbs"] + rule["apiGroups"]
                if "secrets" in rule["resources"]:
                    assert rule["verbs"] == ["get"]  # never list or watch
        for role in _roles(*mode, "--set", "readStorageSecrets=false"):
            assert not [r for r in role["rules"] if "secrets" in r["resources"]]


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("mode", MODES)
def test_the_chart_grants_every_permission_the_operator_uses(mode: str) -> None:
    wanted = {(g, r, v) for g, r, verbs in PERMISSIONS for v in verbs}
    for role in _roles(*MODES[mode]):
        assert wanted <= _granted(role), wanted - _granted(role)
    _profile_reads(render(*MODES[mode]))  # CLUSTER_PERMISSIONS, in every mode


# kubernetes client method -> (group, resource, verb), for every call kube.py makes.
CLIENT_CALLS = {
    "get_namespaced_custom_object": ("kubetune.dev", "finetunejobs", "get"),
    "patch_namespaced_custom_object_status": ("kubetune.dev", "finetunejobs/status", "patch"),
    "list_namespaced_custom_object": ("kubetune.dev", "finetunejobs", "list"),
    "list_cluster_custom_object": ("kubetune.dev", "finetunejobs", "list"),
    # FineTuneJobs a FineTuneSchedule stamps and removes (the schedules' own calls are the
    # get/list/patch-status above, on finetuneschedules: PERMISSIONS lists both).
    "create_namespaced_custom_object": ("kubetune.dev", "finetunejobs", "create"),
    "delete_namespaced_custom_object": ("kubetune.dev", "finetunejobs", "delete"),
    "list_namespace": ("", "namespaces", "list"),
    "list_job_for_all_namespaces": ("batch", "jobs", "list"),
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    "list_config_map_for_all_namespaces": ("", "configmaps", "list"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "list_namespaced_config_map": ("", "configmaps", "list"),
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "read_namespaced_config_map": ("", "configmaps", "get"),
    "delete_namespaced_config_map": ("", "configmaps", "delete"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_service_for_all_namespaces": ("", "services", "list"),
    "list_namespaced_service": ("", "services", "list"),
    "create_namespaced_service": ("", "services", "create"),
    "read_namespaced_service": ("", "services", "get"),
    "delete_namespaced_service": ("", "services", "delete"),
    "read_namespaced_secret": ("", "secrets", "get"),
    "create_namespaced_event": ("", "events", "create"),
    "patch_namespaced_event": ("", "events", "patch"),
}


def test_every_api_call_in_kube_py_is_a_declared_permission() -> None:
    """PERMISSIONS is not a list someone keeps by hand: every client call kube.py makes is in it
    (and the chart grants it, above). A new call without a permission fails here."""
    source = (ROOT / "operator" / "kubetune" / "controller" / "kube.py").read_text()
    calls = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr in ("core", "batch", "custom")
    }
    assert calls, "no client calls found: the scan is broken"
    unknown = calls - set(CLIENT_CALLS)
    assert not unknown, f"map these client calls to a permission: {unknown}"
    declared = {(g, r, v) for g, r, verbs in (*PERMISSIONS, *CLUSTER_PERMISSIONS) for v in verbs}
    assert {CLIENT_CALLS[c] for c in calls} <= declared


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("mode", MODES)
def test_operator_settings_are_real_settings_and_parse(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(render(*MODES[mode]))
    fields = {f"KUBETUNE_{name.upper()}" for name in OperatorSettings.model_fields}
    assert set(env) <= fields, set(env) - fields
    assert env["KUBETUNE_LEADER_ELECTION"] == "true"  # two replicas by default
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()  # the values the chart renders are ones the operator accepts
    assert settings.metrics_port == 8080 and settings.health_port == 8081


def test_operator_pod_is_locked_down_with_probes() -> None:
    (deployment,) = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert "resources" not in container  # unset by default
    # Two replicas with leader election, surging (never fewer than two), and a PDB.
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }  # fmt: skip
    downward = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert downward["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    (pdb,) = by_kind(render(), "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": deployment["spec"]["selector"]}
    # One replica: no election, no PDB, no Lease rights, and Recreate.
    single = render("--set", "replicas=1")
    (deployment,) = by_kind(single, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert _env(single)["KUBETUNE_LEADER_ELECTION"] == "false"
    assert not by_kind(single, "PodDisruptionBudget") and not by_kind(single, "Role")


def test_the_lease_rights_are_what_the_elector_uses() -> None:
    """kubernetes.leaderelection's LeaseLock reads, creates and replaces (PUT) its Lease."""
    import inspect

    from kubernetes.leaderelection.resourcelock import leaselock

    source = inspect.getsource(leaselock)
    calls = {c for c in ("read_namespaced_lease", "create_namespaced_lease",
                         "replace_namespaced_lease", "patch_namespaced_lease") if c in source}  # fmt: skip
    verbs = {"read": "get", "create": "create", "replace": "update", "patch": "patch"}
    used = {("coordination.k8s.io", "leases", verbs[c.split("_")[0]]) for c in calls}
    declared = {(g, r, v) for g, r, vs in LEADER_PERMISSIONS for v in vs}
    assert used == declared
    (role,) = by_kind(render(), "Role")
    assert _granted(role) == declared


def test_default_images_are_the_release_built_by_make_images() -> None:
    """The chart's appVersion is the project's version; the default tags follow it, for the
    operator image and the trainer image (as the operator's own default names it)."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == chart["version"] == project["version"]
    (deployment,) = by_kind(render(), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/kubetune/operator:{project['version']}"
    trainer = _env(render())["KUBETUNE_TRAINER_IMAGE"]
    assert trainer == f"ghcr.io/kubetune/trainer:{project['version']}"
    assert trainer == OperatorSettings.model_fields["trainer_image"].default
    digest = "sha256:" + "a" * 64
    pinned = _env(render("--set", f"trainer.image.digest={digest}"))["KUBETUNE_TRAINER_IMAGE"]
    assert pinned == f"ghcr.io/kubetune/trainer@{digest}"


def test_crds_in_the_chart_are_the_generated_ones() -> None:
    rendered = {c["metadata"]["name"]: c for c in by_kind(render(), "CustomResourceDefinition")}
    assert set(rendered) == {
        "finetunejobs.kubetune.dev",
        "finetuneprofiles.kubetune.dev",
        "finetuneschedules.kubetune.dev",
    }
    for name in (
        "kubetune.dev_finetunejobs.yaml",
        "kubetune.dev_finetuneprofiles.yaml",
        "kubetune.dev_finetuneschedules.yaml",
    ):
        chart_copy = CHART / "files" / "crds" / name
        assert chart_copy.read_text() == (ROOT / "crds" / name).read_text(), (
            "helm/kubetune/files/crds/ is stale: run `make crd`"
        )
        source = yaml.safe_load(chart_copy.read_text())
        crd = rendered[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not by_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")


def _leaf_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        out.append(prefix + key)
        if isinstance(value, dict) and value and key != "labels":
            out.extend(_leaf_paths(value, f"{prefix}{key}."))
    return out


def test_every_value_is_documented_by_name_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w]*):", line)
        if not match or match.group(2) == "grafana_dashboard":
            continue
        start = index  # the comment block right above the key; its first line names the key
        while start > 0 and lines[start - 1].strip().startswith("#"):
            start -= 1
        first = lines[start].strip() if start < index else ""
        assert first.startswith(f"# {match.group(2)}:"), f"values.yaml:{index + 1}: undocumented"
    values = yaml.safe_load(text)
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(values, schema)
    node: dict[str, Any]
    for path in _leaf_paths(values):
        node = schema
        for part in path.split("."):
            assert part in node.get("properties", {}), f"{path} is not in values.schema.json"
            node = node["properties"][part]


@pytest.mark.parametrize(
    "bad",
    [
        "trainer.maxGpusPerJob=-1",
        "logLevel=loud",
        "watchNamespaces={Not_A_Namespace}",
        "metrics.port=0",
        "notify.timeoutSeconds=0",
        "notify.deniedCidrs={10.0.0.0}",
        "notify.allowedHosts={http://deployer.ml-serving}",
    ],
)
def test_schema_rejects_bad_values(bad: str) -> None:
    done = _helm("template", "kt", str(CHART), "--set", bad)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr


def test_prometheus_rule_is_the_promtool_tested_file(tmp_path: Path) -> None:
    rules = CHART / "files" / "prometheus"
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts_test.yaml"]):
        done = subprocess.run(["promtool", *args], cwd=rules, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    (rule,) = by_kind(render(*NAMESPACED), "PrometheusRule")
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(embedded)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "KubetuneFineTuneJobFailed",
        "KubetuneGatesFailing",
        "KubetuneFineTuneJobStuckPending",
        "KubetuneFineTuneJobStuckQueued",
        "KubetuneOperatorDown",
    }


def _declared_metric_names() -> set[str]:
    from kubetune_trainer.telemetry import TrainerMetrics

    names: set[str] = set()
    for registry in (OperatorMetrics().registry, TrainerMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    # Families that have no samples yet still have their series names.
    return names | {n + suffix for n in names for suffix in ("_total", "_bucket", "_count", "_sum")}


def test_dashboard_and_alerts_use_only_declared_metrics() -> None:
    declared = _declared_metric_names()
    dashboard = json.loads((CHART / "files" / "grafana" / "kubetune.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((CHART / "files" / "prometheus" / "alerts.yaml").read_text())
    used = {m for e in exprs for m in re.findall(r"\bkubetune_[a-z_]+", e)}
    assert used and used <= declared, used - declared
    (configmap,) = by_kind(render(*NAMESPACED), "ConfigMap")
    assert json.loads(configmap["data"]["kubetune.json"]) == dashboard
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_pod_monitor_selects_the_trainer_pods_the_operator_labels() -> None:
    from kubetune.api import FineTuneJob
    from kubetune.controller.build import build_job
    from tests.conftest import valid_job

    doc = valid_job()
    doc["metadata"]["uid"] = "uid-1"
    job = build_job(FineTuneJob.model_validate(doc), "0123abcd", OperatorSettings())
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    (monitor,) = by_kind(render(*NAMESPACED), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = job["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in {p["name"] for p in ports}
    policies = by_kind(render(*NAMESPACED), "NetworkPolicy")
    trainers = [p for p in policies if p["metadata"]["name"].endswith("-trainers")]
    assert sorted(p["metadata"]["namespace"] for p in trainers) == ["ml", "research"]
    for policy in trainers:
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        # The pods of a distributed run reach each other on any port (rendezvous, gloo, NCCL).
        (peers,) = [rule for rule in policy["spec"]["ingress"] if "from" in rule]
        assert "ports" not in peers
        (source,) = peers["from"]
        assert source["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_trainer_pull_secrets_and_required_profiles_reach_the_operator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = _env(
        render(
            "--set", "trainer.imagePullSecrets={regcred}", "--set", "trainer.requireProfile=true"
        )
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    assert settings.trainer_image_pull_secrets == ["regcred"] and settings.require_profile
    defaults = _env(render())
    assert defaults["KUBETUNE_TRAINER_IMAGE_PULL_SECRETS"] == "[]"
    assert defaults["KUBETUNE_REQUIRE_PROFILE"] == "false"


# --- Where trainers run: their NetworkPolicy. Where the operator reads Secrets. ---

TEAMS = ("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.trainerNamespaces={team-a,team-b}")  # fmt: skip
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def _trainer_pod(nodes: int = 2) -> tuple[dict[str, str], dict[str, int]]:
    """A trainer pod's labels and its named ports, as the operator builds them."""
    from kubetune.api import FineTuneJob
    from kubetune.controller.build import build_job
    from tests.conftest import valid_job

    doc = valid_job()
    doc["metadata"]["uid"] = "uid-1"
    doc["spec"]["resources"] = {"nodes": nodes, "gpus": 1}
    job = build_job(FineTuneJob.model_validate(doc), "0123abcd", OperatorSettings())
    template = job["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    return template["metadata"]["labels"], ports


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart renders matchLabels only
    return selector.get("matchLabels", {}).items() <= labels.items()


def _admits(
    policy: dict[str, Any],
    ports: dict[str, int],
    port: int,
    peer: tuple[str, dict[str, str]],
) -> bool:
    """Whether this policy's ingress rules let a pod in namespace peer[0], labelled peer[1],
    reach `port` of a pod the policy selects (the NetworkPolicy semantics, matchLabels only)."""
    namespace, labels = peer
    here = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress", []):
        numbers = [ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
        if numbers and port not in numbers:
            continue
        if "from" not in rule:
            return True
        for source in rule["from"]:
            namespaces = source.get("namespaceSelector")
            in_namespace = (
                _selects(namespaces, {"kubernetes.io/metadata.name": namespace})
                if namespaces is not None
                else namespace == here
            )
            pods = source.get("podSelector")
            if in_namespace and (pods is None or _selects(pods, labels)):
                return True
    return False


def _policies(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The operator's NetworkPolicy and the trainers', by namespace."""
    policies = by_kind(docs, "NetworkPolicy")
    (operator,) = [p for p in policies if not p["metadata"]["name"].endswith("-trainers")]
    trainers = {p["metadata"]["namespace"]: p for p in policies if p is not operator}
    assert len(trainers) == len(policies) - 1, "one trainers' policy per namespace"
    return operator, trainers


@pytest.mark.parametrize(
    ("args", "namespaces"),
    [
        pytest.param(TEAMS, ["team-a", "team-b"], id="cluster-wide-listed"),
        pytest.param(NAMESPACED, ["ml", "research"], id="namespaced-watched"),
        pytest.param(
            (*NAMESPACED, "--set", "networkPolicy.trainerNamespaces={ml,extra}"),
            ["extra", "ml", "research"],
            id="namespaced-and-listed-once-each",
        ),
    ],
)
def test_trainer_pods_get_their_policy_in_every_namespace_they_run_in(
    args: tuple[str, ...], namespaces: list[str]
) -> None:
    """The trainers' policy is rendered where trainers run, never (only) in the operator's own
    namespace, and it selects the pods the operator builds."""
    operator, trainers = _policies(render(*args))
    assert operator["metadata"]["namespace"] == "kubetune-system"
    assert sorted(trainers) == namespaces
    labels, _ = _trainer_pod()
    for policy in trainers.values():
        assert _selects(policy["spec"]["podSelector"], labels)


def test_a_cluster_wide_network_policy_without_trainer_namespaces_fails_loudly() -> None:
    """Before, it rendered the trainers' policy in the operator's namespace, where none runs,
    and left every tenant's trainers open while the docs said they were covered."""
    done = _helm("template", "kt", str(CHART), "--set", "networkPolicy.enabled=true")
    assert done.returncode != 0
    assert "networkPolicy.trainerNamespaces" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("metrics_from", "peer", "target", "port", "admitted"),
    [
        # peer: (namespace, labels); a label value "OPERATOR"/"TRAINER" means that pod's labels.
        pytest.param(False, ("anywhere", {}), "trainer", "metrics", True, id="open-metrics"),
        pytest.param(False, ("anywhere", {}), "trainer", "rendezvous", False, id="open-no-rdzv"),
        pytest.param(True, ("kubetune-system", "OPERATOR"), "trainer", "metrics", True,
                     id="operator-reads-progress"),
        pytest.param(True, ("monitoring", {}), "trainer", "metrics", True, id="prometheus-trainer"),
        pytest.param(True, ("monitoring", {}), "operator", "metrics", True, id="prometheus-op"),
        pytest.param(True, ("team-b", {}), "trainer", "metrics", False, id="tenant-no-scrape"),
        pytest.param(True, ("kubetune-system", {}), "trainer", "metrics", False,
                     id="not-any-pod-of-the-operator-ns"),
        pytest.param(True, ("team-b", {}), "operator", "metrics", False, id="tenant-no-op-scrape"),
        pytest.param(True, ("team-b", {}), "operator", "health", True, id="kubelet-probes"),
        pytest.param(True, ("team-a", "TRAINER"), "trainer", "rendezvous", True,
                     id="same-namespace-ranks-meet"),
        pytest.param(True, ("team-a", "TRAINER"), "trainer", 45123, True, id="nccl-any-port"),
        pytest.param(True, ("team-b", "TRAINER"), "trainer", "rendezvous", False,
                     id="another-tenants-trainer"),
        pytest.param(True, ("team-a", {}), "trainer", "rendezvous", False, id="other-pod-same-ns"),
    ],
)  # fmt: skip
def test_network_policies_admit_what_each_peer_needs_and_nothing_more(
    metrics_from: bool,
    peer: tuple[str, Any],
    target: str,
    port: str | int,
    admitted: bool,
) -> None:
    """metricsFrom narrows who scrapes the trainers as well as the operator; the operator can
    always read its trainers' progress; only trainer pods of the namespace reach a trainer's
    other ports (the ranks of a distributed run)."""
    extra = ["--set-json", f"networkPolicy.metricsFrom=[{json.dumps(MONITORING)}]"]
    docs = render(*TEAMS, *(extra if metrics_from else []))
    operator, trainers = _policies(docs)
    (deployment,) = by_kind(docs, "Deployment")
    operator_labels = deployment["spec"]["template"]["metadata"]["labels"]
    trainer_labels, trainer_ports = _trainer_pod()
    namespace, labels = peer
    if isinstance(labels, str):
        labels = {"OPERATOR": operator_labels, "TRAINER": trainer_labels}[labels]
    if target == "trainer":
        policy, ports = trainers["team-a"], trainer_ports
        assert _selects(policy["spec"]["podSelector"], trainer_labels)
    else:
        policy, ports = operator, {"metrics": 8080, "health": 8081}
        assert _selects(policy["spec"]["podSelector"], operator_labels)
    number = ports[port] if isinstance(port, str) else port
    assert _admits(policy, ports, number, (namespace, labels)) is admitted


def test_trainer_egress_is_restricted_only_when_the_platform_lists_it() -> None:
    _, trainers = _policies(render(*TEAMS))
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in trainers.values())
    storage = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443}]}
    _, trainers = _policies(
        render(*TEAMS, "--set-json", f"networkPolicy.trainerEgress=[{json.dumps(storage)}]")
    )
    labels, _ = _trainer_pod()
    for policy in trainers.values():
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        dns, peers, *rest = policy["spec"]["egress"]
        assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
        (ranks,) = peers["to"]  # the other ranks of a distributed run, on any port
        assert "ports" not in peers and _selects(ranks["podSelector"], labels)
        assert rest == [storage]  # nothing else: no API server, no metadata endpoint


@pytest.mark.parametrize("version", ["1.30", "1.34"])
def test_policies_and_secret_roles_are_valid_kubernetes(version: str, tmp_path: Path) -> None:
    storage = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443}]}
    docs = render(
        *TEAMS,
        "--set-json", f"networkPolicy.metricsFrom=[{json.dumps(MONITORING)}]",
        "--set-json", f"networkPolicy.trainerEgress=[{json.dumps(storage)}]",
        "--set", "rbac.secretNamespaces={team-a}",
    )  # fmt: skip
    core = [d for d in docs if d["kind"] in ("NetworkPolicy", "Role", "RoleBinding", "ClusterRole")]
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(core))
    validate = shutil.which("kubernetes-validate", path=str(Path(ROOT / ".venv" / "bin")))
    done = subprocess.run(
        [validate or "kubernetes-validate", "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_trainer_policy_in_security_md_is_the_one_the_chart_renders() -> None:
    """The manifest the docs give for a namespace added later is the chart's, for a release
    named kubetune in kubetune-system (as install.md installs it), scraped from monitoring."""
    text = (ROOT / "docs" / "security.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    (documented,) = [b for b in blocks if b and b.get("kind") == "NetworkPolicy"]
    done = _helm(
        "template", "kubetune", str(CHART), "--namespace", "kubetune-system",
        "--set", "networkPolicy.enabled=true", "--set", "networkPolicy.trainerNamespaces={team-a}",
        "--set-json", f"networkPolicy.metricsFrom=[{json.dumps(MONITORING)}]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _, trainers = _policies([d for d in yaml.safe_load_all(done.stdout) if d])
    assert documented["metadata"]["name"] == trainers["team-a"]["metadata"]["name"]
    assert documented["spec"] == trainers["team-a"]["spec"]


def _secret_rights(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Where the operator may read Secrets: namespace (or '*' for the whole cluster) -> verbs,
    from every role bound to its ServiceAccount."""
    account = by_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    out: dict[str, set[str]] = {}
    for binding in by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding"):
        if not any(s.get("name") == account for s in binding["subjects"]):
            continue
        where = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[ref["kind"], where if ref["kind"] == "Role" else None, ref["name"]]
        for rule in role["rules"]:
            if "secrets" in rule["resources"]:
                assert rule["apiGroups"] == [""] and "resourceNames" not in rule
                out.setdefault(where or "*", set()).update(rule["verbs"])
    return out


@pytest.mark.parametrize(
    ("args", "rights"),
    [
        pytest.param((), {"*": {"get"}}, id="cluster-wide"),
        pytest.param(("--set", "rbac.secretNamespaces={team-a}"), {"team-a": {"get"}},
                     id="cluster-wide-listed"),
        pytest.param(("--set", "readStorageSecrets=false"), {}, id="cluster-wide-off"),
        pytest.param(("--set", "readStorageSecrets=false", "--set", "rbac.secretNamespaces={a}"),
                     {}, id="off-wins-over-listed"),
        pytest.param(NAMESPACED, {"ml": {"get"}, "research": {"get"}}, id="namespaced"),
        pytest.param((*NAMESPACED, "--set", "rbac.secretNamespaces={ml}"), {"ml": {"get"}},
                     id="namespaced-listed"),
        pytest.param((*NAMESPACED, "--set", "readStorageSecrets=false"), {}, id="namespaced-off"),
    ],
)  # fmt: skip
def test_the_operator_reads_secrets_only_where_the_chart_says(
    args: tuple[str, ...], rights: dict[str, set[str]]
) -> None:
    """`get` only (never list or watch: a leaked token cannot enumerate Secrets), in every
    namespace, in the listed ones, or nowhere; and everything else the operator uses is still
    granted in a namespace whose Secret reads were moved to a Role of their own."""
    docs = render(*args)
    assert _secret_rights(docs) == rights
    wanted = {(g, r, v) for g, r, verbs in PERMISSIONS for v in verbs if r != "secrets"}
    for role in _roles(*args):
        if not role["metadata"]["name"].endswith("-secrets"):
            assert wanted <= _granted(role), wanted - _granted(role)


def test_secret_namespaces_must_be_watched_ones() -> None:
    done = _helm(
        "template", "kt", str(CHART), *NAMESPACED, "--set", "rbac.secretNamespaces={ml,elsewhere}"
    )
    assert done.returncode != 0
    assert "rbac.secretNamespaces names elsewhere" in done.stderr, done.stderr


def test_the_webhook_policy_reaches_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """notify.* become the operator's destination policy; by default the private ranges are
    denied (the cluster's services, pods and nodes) and nothing is opened."""
    from ipaddress import ip_network

    from kubetune.controller.settings import PRIVATE_CIDRS

    defaults = _env(render())
    assert json.loads(defaults["KUBETUNE_NOTIFY_DENIED_CIDRS"]) == list(PRIVATE_CIDRS)
    assert defaults["KUBETUNE_NOTIFY_ALLOWED_CIDRS"] == "[]"
    assert defaults["KUBETUNE_NOTIFY_ALLOWED_HOSTS"] == "[]"
    env = _env(
        render(
            "--set", "notify.deniedCidrs={10.96.0.0/12,10.244.0.0/16}",
            "--set", "notify.allowedCidrs={10.96.7.0/24}",
            "--set", "notify.allowedHosts={deployer.ml-serving.svc.cluster.local,*.hooks.internal}",
            "--set", "notify.timeoutSeconds=5",
        )
    )  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = OperatorSettings()
    assert settings.notify_denied_cidrs == [ip_network("10.96.0.0/12"), ip_network("10.244.0.0/16")]
    assert settings.notify_allowed_cidrs == [ip_network("10.96.7.0/24")]
    assert settings.notify_allowed_hosts == [
        "deployer.ml-serving.svc.cluster.local",
        "*.hooks.internal",
    ]
    assert settings.notify_timeout_seconds == 5
