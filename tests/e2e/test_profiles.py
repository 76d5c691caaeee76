"""FineTuneProfiles end to end on the real control plane: a job waits for the profile it names,
runs with the profile's defaults, stays pinned to the profile's generation when the profile
changes under it, and is refused (naming the field and the profile) outside its limits or
outside the namespaces it is offered to. Profiles are cluster-scoped and the platform is shared
by the session, so each test names its own (and none is a default)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer import storage
from tests.support.platform import FINAL, Platform


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def _env(job: dict[str, Any]) -> dict[str, str]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def test_a_job_runs_under_its_profile_pinned_to_the_generation_it_started_with(
    platform: Platform, ns: str
) -> None:
    pool = f"{ns}-pool"
    platform.namespace(ns, {"kubetune.dev/fine-tuning": "enabled"})
    platform.apply(platform.job(ns, "pinned", profile=pool))
    # GitOps may apply the job before the profile: it waits, with a reason, and no child.
    waiting = platform.wait_phase(ns, "pinned", "Pending")
    assert _ready(waiting)["reason"] == "ProfileNotFound", waiting
    assert pool in waiting["message"]
    assert not platform.children(ns, "jobs", "pinned")

    created = platform.profile(
        pool,
        namespaceSelector={"matchLabels": {"kubetune.dev/fine-tuning": "enabled"}},
        resources={"gpus": 0, "memory": "4Gi"},
        limits={"gpus": 1, "memory": "8Gi"},
        env=[{"name": "TEAM_MARK", "value": "first"}],
    )
    assert created["metadata"]["generation"] == 1
    (job,) = platform.wait_for("the run's Job", lambda: platform.children(ns, "jobs", "pinned"))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    assert _env(job)["TEAM_MARK"] == "first"
    assert job["metadata"]["labels"]["kubetune.dev/profile"] == pool

    # The platform team changes the profile while the run runs: the run keeps the one it has.
    platform.api.patch(
        "finetuneprofiles", "", pool, {"spec": {"env": [{"name": "TEAM_MARK", "value": "second"}]}}
    )
    status = platform.wait_phase(ns, "pinned", FINAL, timeout=300)
    assert status["phase"] == "Succeeded", status
    assert status["profile"] == {"name": pool, "generation": 1}
    (job,) = platform.children(ns, "jobs", "pinned")
    assert _env(job)["TEAM_MARK"] == "first"

    # A new run (a new spec) takes the profile as it is now.
    platform.api.patch(
        "finetunejobs", ns, "pinned", {"spec": {"hyperparameters": {"maxSteps": 20}}}
    )
    new_run = platform.wait_for(
        "the second run's profile",
        lambda: (
            (s := platform.status(ns, "pinned")).get("runId") != status["runId"]
            and s.get("profile", {}).get("generation") == 2
            and s
        ),
    )
    jobs = platform.wait_for(
        "the second run's Job",
        lambda: [
            j
            for j in platform.children(ns, "jobs", "pinned")
            if j["metadata"]["labels"]["kubetune.dev/run-id"] == new_run["runId"]
        ],
    )
    assert _env(jobs[0])["TEAM_MARK"] == "second"
    platform.wait_phase(ns, "pinned", FINAL, timeout=300)


def test_a_job_outside_its_profile_is_refused_naming_the_field_and_the_profile(
    platform: Platform, ns: str
) -> None:
    pool, other = f"{ns}-pool", f"{ns}-elsewhere"
    platform.namespace(ns, {"team": "a"})
    platform.profile(pool, limits={"gpus": 1}, allowedOutputPrefixes=[f"s3://models/{ns}/"])
    platform.profile(other, namespaceSelector={"matchLabels": {"team": "b"}})

    platform.apply(platform.job(ns, "greedy", profile=pool, resources={"gpus": 4}))
    platform.apply(platform.job(ns, "astray", profile=pool, output__uri="s3://models/x/astray"))
    platform.apply(platform.job(ns, "trespass", profile=other))
    expected = {
        "greedy": f"spec.resources.gpus: 4 is more than FineTuneProfile '{pool}' allows "
        "(limits.gpus: 1)",
        "astray": f"spec.output.uri: s3://models/x/astray is outside what FineTuneProfile "
        f"'{pool}' allows",
        "trespass": f"spec.profile: FineTuneProfile '{other}' is not offered to namespace {ns}",
    }
    for name, message in expected.items():
        status = platform.wait_phase(ns, name, "Failed")
        assert _ready(status)["reason"] == "PolicyViolation"
        assert message in status["message"], status["message"]
        assert not platform.children(ns, "jobs", name)  # nothing was created
        platform.wait_for(  # posted after the status write that carries it
            "the PolicyViolation Event",
            lambda name=name: "PolicyViolation" in [e["reason"] for e in platform.events(ns, name)],
            10,
        )
        platform.assert_no_more_writes(ns, name)  # no retry loop

    # A namespace labelled into the other profile's selector: a new run of the refused job is
    # allowed (a Failed run stays failed; a new spec is a new run).
    platform.api.patch("namespaces", "", ns, {"metadata": {"labels": {"team": "b"}}})
    platform.api.patch(
        "finetunejobs", ns, "trespass", {"spec": {"hyperparameters": {"maxSteps": 10}}}
    )
    status = platform.wait_for(
        "the new run to finish",
        lambda: (
            (s := platform.status(ns, "trespass")).get("observedGeneration") == 2
            and s.get("phase") in FINAL
            and s
        ),
        timeout=300,
    )
    assert status["phase"] == "Succeeded", status
    assert status["profile"]["name"] == other


def test_a_profiles_model_cache_serves_the_second_run(platform: Platform, ns: str) -> None:
    """The profile's cache in object storage: the first run fetches the model from its source
    into the cache; the source is then deleted and a second run still trains, from the cache."""
    source = f"s3://models/{ns}/base"
    storage.upload_dir(platform.model, source)
    pool = f"{ns}-cached"
    platform.profile(pool, modelCache={"uri": f"s3://models/{ns}/model-cache"})
    platform.apply(platform.job(ns, "first", profile=pool, model__uri=source))
    assert platform.wait_phase(ns, "first", FINAL, timeout=300)["phase"] == "Succeeded"
    keys = storage.list_keys(f"s3://models/{ns}/model-cache")
    assert any(k.endswith("/.kubetune-complete") for k in keys), keys
    assert storage.delete_prefix(source) > 0

    platform.apply(platform.job(ns, "second", profile=pool, model__uri=source))
    status = platform.wait_phase(ns, "second", FINAL, timeout=300)
    assert status["phase"] == "Succeeded", status
    run = f"s3://models/{ns}/second/runs/{status['runId']}"
    log = storage.read_bytes(f"{run}/trainer.log").decode()
    assert "Model from the cache" in log and "Fetching the model" not in log
