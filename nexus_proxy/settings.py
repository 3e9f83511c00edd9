"""The one configuration model, and how it is loaded from flags, env vars and TOML.

Precedence, highest first: command-line flags, `NEXUS_PROXY_<FIELD>` environment
variables, the TOML file named by `--config` or `NEXUS_PROXY_CONFIG`, defaults.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["ENVIRONMENTS", "ENV_PREFIX", "Settings"]

ENV_PREFIX = "NEXUS_PROXY_"

ENVIRONMENTS: dict[str, str] = {
    "test": "https://testapi.quantoznexus.com",
    "production": "https://api.quantoznexus.com",
    "dcts": "https://api.dcts.io",
}

# The TOML file read by the settings being built; set only inside `Settings.load`.
_toml_file: ContextVar[Path | None] = ContextVar("_toml_file", default=None)

Seconds = Annotated[float, Field(gt=0)]

MIB = 1024 * 1024


def _split_commas(value: object) -> object:
    """Lists from env vars and flags may be written `a,b,c` as well as JSON."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, str):
        return json.loads(value)
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
SecretList = Annotated[list[SecretStr], NoDecode, BeforeValidator(_split_commas)]


def _http_url(value: str | None) -> str | None:
    if not value:
        return value
    url = httpx.URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url.query or url.fragment or url.userinfo:
        raise ValueError("must not carry a query, fragment or user info")
    return value.rstrip("/")


class Options(BaseSettings):
    """Every setting that may also be given as a command-line flag."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        hide_input_in_errors=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_exit_on_error=False,
        cli_prog_name="nexus-proxy",
        env_nested_delimiter="__",
    )

    config: Path | None = Field(
        None, description="TOML configuration file (env NEXUS_PROXY_CONFIG)"
    )
    environment: Literal["test", "production", "dcts"] = Field(
        "test", description="Nexus environment: test, production or dcts"
    )
    upstream_url: str | None = Field(
        None, description="Any http(s) base URL; overrides --environment"
    )
    host: str = Field("127.0.0.1", description="Listen address")
    port: int = Field(8080, ge=0, le=65535, description="Listen port; 0 picks a free one")
    api_key_file: Path | None = Field(None, description="File that contains the Nexus API key")
    iso8601: bool = Field(True, description="Send request_iso8601: true upstream")
    connect_timeout: Seconds = Field(5.0, description="Seconds to connect to the upstream")
    read_timeout: Seconds = Field(60.0, description="Seconds to wait for upstream data")
    write_timeout: Seconds = Field(60.0, description="Seconds to send data upstream")
    pool_timeout: Seconds = Field(5.0, description="Seconds to wait for a free connection")
    max_connections: int = Field(100, ge=1, description="Upstream connection pool size")
    ca_bundle: Path | None = Field(
        None, description="CA file for the upstream's certificate; unset means certifi's"
    )
    egress_proxy: str | None = Field(
        None, description='Outbound HTTP proxy (default: HTTPS_PROXY/NO_PROXY; "" for none)'
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level"
    )
    log_format: Literal["text", "json"] = Field("text", description="Log line format")
    access_log: bool = Field(True, description="Write one log line per request")
    shutdown_timeout: Seconds = Field(
        25.0, description="Seconds in-flight requests get to finish on SIGTERM"
    )
    unix_socket: Path | None = Field(
        None, description="Listen on this Unix socket (mode 0600) instead of TCP"
    )
    workers: int = Field(1, ge=1, description="Worker processes sharing the listen socket")

    access_token_file: Path | None = Field(
        None, description="File with the local access tokens clients must send, one per line"
    )
    allow_unauthenticated_remote: bool = Field(
        False, description="Allow a non-loopback listen address without access tokens"
    )
    read_only: bool = Field(False, description="Forward only GET, HEAD and OPTIONS")
    allow_methods: CommaList | None = Field(
        None, description="Methods forwarded (default: all), e.g. GET,POST"
    )
    allow_paths: CommaList = Field(
        default_factory=list, description="Glob patterns of paths forwarded (default: all)"
    )
    deny_paths: CommaList = Field(
        default_factory=list, description="Glob patterns of paths rejected; deny wins over allow"
    )
    max_body_size: int = Field(
        100 * MIB, ge=0, description="Largest request body in bytes; 0 for no limit"
    )
    max_header_size: int = Field(
        64 * 1024, ge=1024, description="Largest request line plus headers, in bytes"
    )
    client_header_timeout: Seconds = Field(
        30.0, description="Seconds a client gets to send a request's line and headers"
    )
    client_body_timeout: Seconds = Field(
        60.0, description="Seconds a request body may pause between two reads"
    )
    allow_insecure_permissions: bool = Field(
        False, description="Only warn when a secret file is readable by group or others"
    )
    api_key_expires: date | None = Field(
        None, description="The API key's expiry date (YYYY-MM-DD), for warnings"
    )

    @field_validator("upstream_url", "egress_proxy")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("allow_methods")
    @classmethod
    def _check_methods(cls, value: list[str] | None) -> list[str] | None:
        # Methods are case-sensitive (RFC 9110 section 9.1), so "get" would match nothing.
        for method in value or ():
            if method != method.upper():
                raise ValueError(
                    f"{method!r} is not an upper-case method name; write {method.upper()!r}"
                )
        return value

    @field_validator("config", "api_key_file", "ca_bundle", "access_token_file")
    @classmethod
    def _check_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}; give the path of an existing file")
        return value


class OAuthSettings(BaseModel):
    """The `[oauth]` table: OAuth2 client credentials instead of an API key."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    token_url: str | None = None
    scope: str = "api1"

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _check_one_secret_source(self) -> OAuthSettings:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError(
                "set exactly one of client_secret (NEXUS_PROXY_OAUTH__CLIENT_SECRET) "
                "or client_secret_file"
            )
        return self


class Settings(Options):
    """All settings, including those that must never appear on a command line."""

    api_key: SecretStr | None = None
    access_tokens: SecretList = Field(default_factory=list)
    oauth: OAuthSettings | None = None
    default_headers: dict[str, str] = Field(default_factory=lambda: {"api_version": "1.2"})

    @model_validator(mode="after")
    def _check_one_key_source(self) -> Settings:
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set either api_key (NEXUS_PROXY_API_KEY) or api_key_file, not both")
        if self.oauth is not None and (self.api_key is not None or self.api_key_file is not None):
            raise ValueError(
                "set either an API key (api_key or api_key_file) or the [oauth] table, not both"
            )
        return self

    @property
    def upstream(self) -> str:
        """The base URL requests are forwarded to."""
        return self.upstream_url or ENVIRONMENTS[self.environment]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_file.get())
        return (init_settings, env_settings, toml)

    @classmethod
    def load(cls, argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from flags in `argv`, the environment and the TOML file.

        Raises `pydantic.ValidationError` or `pydantic_settings.SettingsError`.
        """
        environ = os.environ if environ is None else environ
        cli: CliSettingsSource[Options] = CliSettingsSource(
            Options, root_parser=parser(), cli_parse_args=list(argv)
        )
        config = cli().get("config") or environ.get(ENV_PREFIX + "CONFIG") or None
        if config is not None and not Path(config).is_file():
            raise ValueError(f"config: no such file: {config}; give the path of a TOML file")

        token = _toml_file.set(Path(config) if config else None)
        try:
            return cls(_cli_settings_source=cli)  # type: ignore[call-arg]
        finally:
            _toml_file.reset(token)


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            # argparse would echo the stray values, and one may be a secret.
            message = (
                "unexpected argument(s): nexus-proxy takes options and the 'check' "
                "command only; nexus-proxy --help lists the options"
            )
        raise ValueError(message)


def parser() -> argparse.ArgumentParser:
    """Build the argument parser that the flags of `Options` are added to."""
    return _Parser(
        prog="nexus-proxy",
        usage="nexus-proxy [check] [options]",
        description=(
            "Forward requests to the Quantoz Nexus API with the API key added. "
            "'check' validates the configuration and prints it. "
            "The key comes from NEXUS_PROXY_API_KEY or --api-key-file, never from a flag."
        ),
        exit_on_error=False,
        # Without this, "--api-key SECRET" would be taken for --api-key-file.
        allow_abbrev=False,
    )


def describe(settings: Settings, fingerprints: Mapping[str, str]) -> dict[str, Any]:
    """Return the effective settings as plain data, each secret replaced by its fingerprint."""
    data = settings.model_dump(mode="json", exclude={"api_key", "access_tokens", "oauth"})
    if settings.oauth is not None:
        data["oauth"] = settings.oauth.model_dump(mode="json", exclude={"client_secret"})
    data["upstream"] = settings.upstream
    for name, fingerprint in fingerprints.items():
        data[name] = f"sha256:{fingerprint}"
    return data
