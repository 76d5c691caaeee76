"""Model loading failures: which ones a retry can fix."""

from __future__ import annotations

from kubetune_trainer.modeling import is_connection_problem


def test_unreachable_hub_is_retryable_but_a_missing_model_is_not() -> None:
    offline = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert is_connection_problem(offline)
    wrapped = ValueError("load failed")
    wrapped.__cause__ = ConnectionError("Name or service not known")
    assert is_connection_problem(wrapped)
    assert not is_connection_problem(
        OSError("org/nope is not a local folder and is not a valid model identifier")
    )
