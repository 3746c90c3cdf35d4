"""Where the store is and who we are to it: the one storage configuration of a job.

    storage = StorageConfig(endpoint_url="http://127.0.0.1:8333")      # credentials: AWS_* env
    storage = StorageConfig.model_validate({"key": ..., "secret": ..., "client_kwargs": {...}})
    fs, path = resolve("s3://audio/in/", storage)                      # (pipelines.storage)

Owns:
  * the endpoint and region (not secret: they may be flow parameters and appear in reports);
  * the credentials, from the first of: explicit ones (`credentials`, set from s3fs-style
    `key`/`secret`/`token` options or a Prefect Secret block's values, which the flows layer
    reads by `credentials_block` and hands in with `with_credentials`), else the standard
    `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` of this process. Explicit
    credentials never leave memory: they are excluded from `model_dump` (so from the flow
    parameters Prefect stores), from the JSON schema and from `repr`;
  * other fsspec/s3fs keyword arguments (`options`, e.g. `{"anon": true}`), never secrets;
  * how all of it reaches other machines: `for_workers()` resolves this process's environment
    into explicit values, in memory, so workers of a running cluster (whose environment is not
    this one's) reach the same endpoint with the same identity;
  * what may be shown: `safe()`, with the key id shortened and every secret masked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic.json_schema import SkipJsonSchema

from pipelines.errors import CredentialsError
from pipelines.storage.uri import redact, redact_uri

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_VARIABLES = ("AWS_DEFAULT_REGION", "AWS_REGION")
# the names each credential goes by: s3fs's first, then those of boto3, AWS files and blocks
CREDENTIAL_NAMES = {"key": ("key", "access_key", "access_key_id", "aws_access_key_id",
                            "accesskey"),
                    "secret": ("secret", "secret_key", "secret_access_key",
                               "aws_secret_access_key"),
                    "token": ("token", "session_token", "aws_session_token")}
CREDENTIAL_VARIABLES = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY",
                        "token": "AWS_SESSION_TOKEN"}
_SECRET_MARKERS = ("secret", "token", "password", "key", "credential")


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


class Credentials(BaseModel):
    """An S3 identity: access key id, secret key, optional session token."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: SecretStr
    secret: SecretStr
    token: SecretStr | None = None

    @classmethod
    def from_env(cls) -> Credentials | None:
        """The AWS_* credentials of this process, or None without a key and a secret."""
        found = {name: os.environ.get(var) for name, var in CREDENTIAL_VARIABLES.items()}
        if not (found["key"] and found["secret"]):
            return None
        return cls(**{k: v for k, v in found.items() if v})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> Credentials:
        """From a mapping using any of `CREDENTIAL_NAMES` (case-insensitive): a Secret block's
        JSON, say. Errors name `source` and the fields present, never a value."""
        lowered = {str(k).lower(): v for k, v in values.items()}
        found = {}
        for field, names in CREDENTIAL_NAMES.items():
            hit = next((lowered[n] for n in names if lowered.get(n)), None)
            if hit is not None:
                found[field] = str(hit)
        missing = [f for f in ("key", "secret") if f not in found]
        if missing:
            raise CredentialsError(f"{source} has no {' or '.join(missing)} "
                                   f"(fields: {sorted(lowered)})")
        return cls(**found)

    def s3fs(self) -> dict[str, str]:
        plain = {"key": self.key, "secret": self.secret, "token": self.token}
        return {k: v.get_secret_value() for k, v in plain.items() if v is not None}


class StorageConfig(BaseModel):
    """The storage settings of a job (module docstring). Accepts s3fs keyword arguments as
    given to `--storage-options` (`key`, `secret`, `token`, `endpoint_url`, `region`,
    `client_kwargs`, and any other non-secret s3fs option)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        None, description="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
    region: str | None = Field(
        None, description="S3 signing region (default: $AWS_DEFAULT_REGION or $AWS_REGION; "
                          "us-east-1 with a custom endpoint)")
    credentials_block: str | None = Field(
        None, description="name of a Prefect Secret block holding the S3 credentials as JSON "
                          '{"key": ..., "secret": ..., "token": optional}, read when a flow '
                          "runs (default: the AWS_* environment)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="other fsspec/s3fs keyword arguments (no secrets)")
    credentials: SkipJsonSchema[Credentials | None] = Field(None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _from_s3fs_keywords(cls, values: Any) -> Any:
        """s3fs-style keywords (as `--storage-options` takes them) -> this model's fields."""
        if not isinstance(values, Mapping):
            return values
        own = set(cls.model_fields)
        values = dict(values)
        client = values.pop("client_kwargs", None) or {}
        if not isinstance(client, Mapping):
            raise ValueError("client_kwargs must be a JSON object, e.g. "
                             '{"client_kwargs": {"region_name": "eu-west-1"}}')
        client = dict(client)
        values.setdefault("endpoint_url", client.pop("endpoint_url", None))
        values.setdefault("region", client.pop("region_name", None))
        given = {n: values.pop(n) for names in CREDENTIAL_NAMES.values() for n in names
                 if n in values}
        if given and values.get("credentials") is None:
            values["credentials"] = Credentials.from_mapping(given, "storage options")
        extra = {k: values.pop(k) for k in list(values) if k not in own}
        secret = _secret_names({**extra, **(values.get("options") or {}),
                                "client_kwargs": client})
        if secret:  # options are flow parameters, which Prefect stores: no secret goes there
            raise ValueError(f"unsupported secret-looking storage options {secret} (credentials "
                             "are key, secret and token, or the AWS_* environment)")
        options = {**extra, **(values.get("options") or {})}
        if client:
            options["client_kwargs"] = client
        values["options"] = options
        return {k: v for k, v in values.items() if v is not None or k == "credentials"}

    @classmethod
    def coerce(cls, storage: StorageConfig | Mapping[str, Any] | None) -> StorageConfig:
        """A StorageConfig from one, from s3fs keyword arguments, or from None (defaults)."""
        if isinstance(storage, StorageConfig):
            return storage
        return cls.model_validate(dict(storage or {}))

    def with_credentials(self, credentials: Credentials | None) -> StorageConfig:
        return self.model_copy(update={"credentials": credentials})

    # -- what fsspec gets -----------------------------------------------------------------------

    def s3fs_options(self) -> dict[str, Any]:
        """s3fs keyword arguments: the explicit settings first, the AWS_* variables for what is
        missing. Values from the environment are passed explicitly, so fsspec's instance cache
        is keyed on them."""
        opts = dict(self.options)
        client = dict(opts.pop("client_kwargs", None) or {})
        endpoint = self.endpoint_url or _env(ENDPOINT_VARIABLES)
        region = self.region or client.get("region_name") or _env(REGION_VARIABLES)
        if endpoint:
            client["endpoint_url"] = endpoint
            region = region or "us-east-1"  # a custom endpoint still needs a signing region
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
        if not (opts.get("anon") or "profile" in opts or "session" in opts):
            credentials = self.credentials or Credentials.from_env()
            if credentials is not None:
                opts.update(credentials.s3fs())
        return opts

    def fsspec_options(self) -> dict[str, Any]:
        """Keyword arguments for a non-S3 fsspec filesystem: `options` as given."""
        return dict(self.options)

    def for_workers(self) -> StorageConfig:
        """This configuration with what this process reads from its environment (endpoint,
        region, credentials) made explicit: to hand to processes on other machines. In memory
        only: `model_dump` still leaves the credentials out."""
        return self.model_copy(update={
            "endpoint_url": self.endpoint_url or _env(ENDPOINT_VARIABLES),
            "region": self.region or _env(REGION_VARIABLES),
            "credentials": self.credentials or Credentials.from_env()})

    def secrets(self) -> list[str]:
        """The secret values known to this configuration (to scrub them from messages)."""
        credentials = self.credentials or Credentials.from_env()
        if credentials is None:
            return []
        return [v for k, v in credentials.s3fs().items() if k != "key"]

    def safe(self) -> dict[str, Any]:
        """A view fit for logs and reports: the key id shortened, secrets masked (also those
        nested in options, such as `config_kwargs`)."""
        shown = _masked({k: v for k, v in self.model_dump().items() if v not in (None, {})})
        if self.credentials is not None:
            shown["key"] = redact(self.credentials.key.get_secret_value(), keep=4)
            shown["secret"] = redact("secret")
        return shown


def _secret_names(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The secret-looking names in `values`, nested ones as `outer.inner`."""
    found = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            found += _secret_names(value, f"{prefix}{name}.")
        elif is_secret_name(name):
            found.append(f"{prefix}{name}")
    return sorted(found)


def _masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with secret-looking names' values masked and passwords in URIs hidden."""
    def shown(name: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return _masked(value)
        if is_secret_name(name):
            return redact(value)
        return redact_uri(value) if isinstance(value, str) else value

    return {name: shown(name, value) for name, value in values.items()}


StorageOptions = Annotated[StorageConfig, Field(
    default_factory=StorageConfig,
    description="JSON: the store's endpoint_url, region, key, secret, token, credentials_block "
                "(a Prefect Secret block), client_kwargs or other s3fs options; credentials are "
                "never stored (none: the AWS_* environment)")]
"""The `storage_options` field of every parameter model that reaches a store."""
