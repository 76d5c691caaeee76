"""The Hugging Face Hub: what its refusals mean for a FineTuneJob, and fetching a model whole.

The Hub answers a gated model (Llama, Gemma, Mistral, ...) with 401 and `X-Error-Code:
GatedRepo` to a request without a token, and 403 with the same code to a token whose account
has not been granted access; a private or missing repository is 401 `RepoNotFound`
(huggingface_hub's hf_raise_for_status turns these into GatedRepoError and
RepositoryNotFoundError). No retry changes either answer, so each is a permanent failure
(InvalidSpec) whose message names the Secret the token came from and what to do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kubetune.api import ModelSpec
from kubetune_trainer.errors import SpecError


def _hub_error(exc: BaseException) -> BaseException | None:
    """The Hub's own error (HfHubHTTPError) in exc's chain, if any."""
    from huggingface_hub.errors import HfHubHTTPError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, HfHubHTTPError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def refusal(exc: BaseException, model: ModelSpec) -> str | None:
    """What a 401/403 from the Hub means for this spec, in one line; None for anything else."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    error = _hub_error(exc)
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if error is None or status not in (401, 403):
        return None
    token = model.token_secret
    source = (
        f"the token from Secret {token.name!r} (spec.model.tokenSecret, key {token.key})"
        if token
        else "no token"
    )
    uri = model.uri
    if isinstance(error, GatedRepoError):
        if token is None:
            return (
                f"spec.model.uri: {uri} is a gated model and the trainer has no Hugging Face "
                "token: set spec.model.tokenSecret to a Secret holding the token (key HF_TOKEN) "
                "of an account that has accepted the model's licence on huggingface.co"
            )
        return (
            f"spec.model.uri: {uri} is a gated model and the Hub refused {source} (HTTP "
            f"{status}): accept the model's licence on huggingface.co with the token's account "
            "(and wait for the grant), or put a token of an account that has it in the Secret"
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"spec.model.uri: {uri} does not exist on the Hub or is private (HTTP {status}, with "
            f"{source}): check the name; for a private model, set spec.model.tokenSecret to a "
            "Secret with a token that can read it"
        )
    return f"spec.model.uri: the Hub refused {source} for {uri} (HTTP {status}); check the token"


@contextlib.contextmanager
def refusals(model: ModelSpec) -> Iterator[None]:
    """Turns a Hub refusal raised inside into a SpecError that says what to do."""
    try:
        yield
    except Exception as exc:
        message = refusal(exc, model)
        if message is None:
            raise
        raise SpecError(message) from None  # the Hub's text may quote request headers


def download(repo: str, file: str | None, revision: str | None, target: Path) -> None:
    """The whole repository (or its one GGUF file) at revision into target."""
    from huggingface_hub import hf_hub_download, snapshot_download

    if file is not None:
        hf_hub_download(repo, file, revision=revision, local_dir=target)
    else:
        snapshot_download(repo, revision=revision, local_dir=target)
