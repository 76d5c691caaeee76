"""latest.json lies in the tenant's bucket: the champion it names is fetched with the pod's
identity (a profile's ServiceAccount), so it must be a run of the same output; and a run never
writes its artifacts inside the profile's model cache, whose credentials it would then use
(issue 25, finding 6)."""

from __future__ import annotations

import pytest

from kubetune.api import FineTuneJob, PromotionRecord, TrainerConfig
from kubetune.api.profile import ModelCacheSpec
from kubetune_trainer.champion import _check_own_runs
from kubetune_trainer.errors import SpecError
from kubetune_trainer.pipeline import _check_outside_cache
from tests.conftest import valid_job

OUT = "s3://ml-models/team-a/sql"


@pytest.mark.parametrize(
    ("adapter", "merged", "refused"),
    [
        pytest.param(f"{OUT}/runs/0123abcd/adapter/", None, None, id="its-own-run"),
        pytest.param(None, f"{OUT}/runs/0123abcd/merged/", None, id="its-own-merged-model"),
        pytest.param("s3://ml-models/team-b/sql/runs/x/adapter/", None, "adapterUri", id="team-b"),
        pytest.param(None, "s3://private/weights/", "mergedUri", id="another-bucket"),
        pytest.param(f"{OUT}/runs/../../team-b/runs/x/adapter/", None, "adapterUri", id="dot-dot"),
        pytest.param(f"{OUT}-evil/runs/x/adapter/", None, "adapterUri", id="a-sibling-prefix"),
    ],
)
def test_the_champion_must_be_a_run_of_the_same_output(
    adapter: str | None, merged: str | None, refused: str | None
) -> None:
    record = PromotionRecord(run_id="0123abcd", adapter_uri=adapter, merged_uri=merged)
    if refused is None:
        _check_own_runs(OUT, record)
        return
    with pytest.raises(SpecError, match=rf"its {refused} .* is not a run under spec\.output\.uri"):
        _check_own_runs(OUT, record)


@pytest.mark.parametrize(
    ("output", "refused"),
    [
        pytest.param("s3://ml-models/cache/team-a", True, id="inside-the-cache"),
        pytest.param("s3://ml-models/cache", True, id="the-cache-itself"),
        pytest.param("s3://ml-models/cache-b/team-a", False, id="a-sibling"),
        pytest.param("s3://ml-models/team-a", False, id="elsewhere"),
    ],
)
def test_a_run_never_writes_inside_the_model_cache(output: str, refused: bool) -> None:
    doc = valid_job()
    doc["spec"]["output"] = {"uri": output}
    job = FineTuneJob.model_validate(doc, by_name=False)
    config = TrainerConfig.for_job(
        job, "0123abcd", model_cache=ModelCacheSpec(uri="s3://ml-models/cache/")
    )
    if refused:
        with pytest.raises(SpecError, match="lies in the profile's model cache"):
            _check_outside_cache(config)
    else:
        _check_outside_cache(config)
