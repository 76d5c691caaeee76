"""Which keys of a tenant's storage Secret configure an object-store client.

A FineTuneJob names Secrets in its own namespace (`spec.output.credentialsSecret`, the model's,
the data's, a profile's model cache); the tenant who wrote the job writes those Secrets too. Their
keys become obstore configuration (the same names as the providers' environment variables), in
the trainer's pod and, for a finished run's result.json, in the operator. obstore's options
include more than credentials: a file to read a token from (`AWS_WEB_IDENTITY_TOKEN_FILE`,
`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, `AZURE_FEDERATED_TOKEN_FILE`, `GOOGLE_SERVICE_ACCOUNT`),
an endpoint that hands out or receives credentials (`AWS_CONTAINER_CREDENTIALS_FULL_URI`,
`AWS_METADATA_ENDPOINT`, `AWS_STS_ENDPOINT`, `AZURE_AUTHORITY_HOST`, `AZURE_MSI_ENDPOINT`, the
Fabric token service), or a command (`AZURE_USE_AZURE_CLI`). Given any of those, a tenant makes
the process that holds them send that process's own ServiceAccount token (or cloud identity) to
a URL of the tenant's choosing.

So only the keys below pass: credentials a tenant owns, the endpoint and region of its store, and
request options. Everything else is refused by name (never by value: a Secret's values are never
echoed). The list is an allowlist: a key that a later obstore release adds is refused until it is
reviewed and listed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# The Secret's key prefix of each scheme's provider.
FAMILIES = {"s3": "AWS_", "gs": "GOOGLE_", "az": "AZURE_"}

ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "s3": frozenset(
        {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
            "AWS_CHECKSUM_ALGORITHM",
            "AWS_UNSIGNED_PAYLOAD",
            "AWS_SKIP_SIGNATURE",
            "AWS_REQUEST_PAYER",
            "AWS_SERVER_SIDE_ENCRYPTION",
            "AWS_SSE_KMS_KEY_ID",
            "AWS_SSE_BUCKET_KEY_ENABLED",
            "AWS_CONDITIONAL_PUT",
            "AWS_DISABLE_TAGGING",
        }
    ),
    "gs": frozenset(
        {
            "GOOGLE_SERVICE_ACCOUNT_KEY",  # the key's JSON itself, not a path to it
            "GOOGLE_BEARER_TOKEN",
            "GOOGLE_BASE_URL",
            "GOOGLE_SKIP_SIGNATURE",
        }
    ),
    "az": frozenset(
        {
            "AZURE_STORAGE_ACCOUNT_NAME",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_ACCESS_KEY",
            "AZURE_STORAGE_MASTER_KEY",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_STORAGE_SAS_TOKEN",
            "AZURE_STORAGE_TOKEN",
            "AZURE_STORAGE_CLIENT_ID",
            "AZURE_CLIENT_ID",
            "AZURE_STORAGE_CLIENT_SECRET",
            "AZURE_CLIENT_SECRET",
            "AZURE_STORAGE_TENANT_ID",
            "AZURE_TENANT_ID",
            "AZURE_STORAGE_ENDPOINT",
            "AZURE_ENDPOINT",
            "AZURE_SKIP_SIGNATURE",
            "AZURE_DISABLE_TAGGING",
        }
    ),
}

# Keys that sign requests with credentials the Secret itself holds (or ask for none): what the
# operator needs before it reads a tenant's store, since it lends no identity of its own.
_TRUE = ("true", "1", "yes", "on")
# An Azure Secret's own signing keys: the account's key, a shared access signature, a token.
AZURE_ACCOUNT_KEYS = (
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_MASTER_KEY",
)
AZURE_SAS_KEYS = ("AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN")
AZURE_SIGNING_KEYS = (*AZURE_ACCOUNT_KEYS, *AZURE_SAS_KEYS, "AZURE_STORAGE_TOKEN")


def _unsigned(scheme: str, config: Mapping[str, str]) -> bool:
    return config.get(f"{FAMILIES[scheme]}SKIP_SIGNATURE", "").strip().lower() in _TRUE


def _static(scheme: str, config: Mapping[str, str]) -> bool:
    if _unsigned(scheme, config):
        return True
    if scheme == "s3":
        return bool(config.get("AWS_ACCESS_KEY_ID") and config.get("AWS_SECRET_ACCESS_KEY"))
    if scheme == "gs":
        return bool(config.get("GOOGLE_SERVICE_ACCOUNT_KEY") or config.get("GOOGLE_BEARER_TOKEN"))
    if any(config.get(key) for key in AZURE_SIGNING_KEYS):
        return True
    # The client-secret flow needs all three; with fewer, obstore falls back to the managed
    # identity of whoever builds the client.
    return all(
        config.get(f"AZURE_STORAGE_{key}") or config.get(f"AZURE_{key}")
        for key in ("CLIENT_ID", "CLIENT_SECRET", "TENANT_ID")
    )


# Keys that say where requests go. A tenant may name its own store's endpoint only together
# with credentials of its own: with the pod's identity (IRSA, Workload Identity, a metadata
# server) the requests, signed or carrying a bearer token, would go to the tenant's host. An
# endpoint is an origin (scheme://host[:port]): a path, query or fragment would be glued to
# the object's key and move requests to another bucket or prefix than the URI names.
ENDPOINT_KEYS = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "gs": ("GOOGLE_BASE_URL",),
    "az": ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"),
}
REGION_KEYS = ("AWS_REGION", "AWS_DEFAULT_REGION")  # object_store builds STS's host from it
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/?")
_REGION = re.compile(r"[a-z0-9-]{1,32}")


@dataclass(frozen=True)
class StorageConfig:
    """A Secret's keys for one scheme, split into what may configure a client and what may not."""

    scheme: str
    config: dict[str, str]  # the allowed keys of the scheme's family, by their variable names
    refused: tuple[str, ...]  # keys of the family that are not allowed, sorted (names only)
    reasons: tuple[str, ...] = ()  # why, one line per refused key (names only)

    @property
    def signs_itself(self) -> bool:
        """Whether the config carries credentials of its own (or asks for unsigned requests),
        so that a client built from it needs no identity of the process that builds it."""
        return _static(self.scheme, self.config)

    def obstore_config(self) -> dict[str, str]:
        """The config as obstore takes it (lower-case keys)."""
        return {key.lower(): value for key, value in self.config.items()}

    @property
    def unsigned(self) -> bool:
        """Whether it asks for unsigned requests (a public bucket)."""
        return _unsigned(self.scheme, self.config)

    @property
    def allow_http(self) -> bool:
        """Whether its endpoint is plain http (an S3-compatible store on a private network)."""
        return any(
            self.config.get(key, "").startswith("http://") for key in ENDPOINT_KEYS[self.scheme]
        )

    def refusal(self, whose: str) -> str:
        """A message for refused keys: names only, and the fix."""
        allowed = ", ".join(sorted(ALLOWED_KEYS[self.scheme]))
        return (
            f"{whose} has key(s) kubetune does not pass to the {self.scheme}:// client: "
            f"{'; '.join(self.reasons)}. Fix or remove them (allowed keys: {allowed})"
        )


def storage_config(scheme: str, keys: Mapping[str, str]) -> StorageConfig:
    """The keys of a Secret (or of the environment under a source's prefix, the prefix removed)
    that configure a client for `scheme` (s3, gs or az). Keys of other families are ignored: an
    s3:// source's Secret may hold GOOGLE_ keys for another source."""
    family = FAMILIES.get(scheme)
    if family is None:
        return StorageConfig(scheme, {}, ())
    allowed = ALLOWED_KEYS[scheme]
    mine = {key: value for key, value in keys.items() if key.startswith(family)}
    why = {
        key: f"{key} (names a file, a command or a credential endpoint, or is unknown)"
        for key in mine
        if key not in allowed
    }
    config = {k: v for k, v in mine.items() if k in allowed}
    own = _static(scheme, config)
    for key in ENDPOINT_KEYS[scheme]:
        if key not in config:
            continue
        if not _ORIGIN.fullmatch(config[key].strip()):
            why[key] = f"{key} (an endpoint is scheme://host[:port], no path, query or user)"
        elif not own:
            why[key] = (
                f"{key} (an endpoint needs credentials in the same Secret: the pod's own "
                "identity is never sent to a Secret's endpoint)"
            )
    for key in REGION_KEYS:
        if scheme == "s3" and key in config and not _REGION.fullmatch(config[key].strip()):
            why[key] = f"{key} (a region is lowercase letters, digits and dashes)"
    refused = tuple(sorted(why))
    kept = {k: v for k, v in config.items() if k not in why}
    return StorageConfig(scheme, kept, refused, tuple(why[k] for k in refused))
