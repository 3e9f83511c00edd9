"""The `nexus-proxy` command: serve (the default) or check the configuration."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from . import __version__
from .access import AccessTokens, check_exposure, load_access_tokens
from .credentials import Credential, build_credential
from .errors import ConfigError
from .logs import configure_logging
from .secretfile import check_config_file
from .settings import ENV_PREFIX, Options, Settings, describe

__all__ = ["main"]

EXIT_CONFIG = 2

# Secrets come from env vars or files only: a flag would show in `ps` and shell history.
_SECRET_FLAGS = frozenset({"--api-key", "--api_key"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"nexus-proxy {__version__}")
        return 0
    command = "serve"
    if args[:1] == ["check"]:
        command, args = "check", args[1:]

    try:
        settings, credential, tokens = _load(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except ConfigError as exc:
        print(f"nexus-proxy: configuration error:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG

    if command == "check":
        effective = describe(settings, credential.fingerprints())
        effective["access_tokens"] = len(tokens)
        print(json.dumps(effective, indent=2))
        return 0

    if settings.workers > 1:
        # prometheus-client picks its multiprocess mode when first imported.
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="nexus-proxy-"))

    from .server import serve

    try:
        return 0 if serve(settings, credential, tokens, args) else 1
    except ConfigError as exc:
        print(f"nexus-proxy: configuration error:\n  - {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _load(args: list[str]) -> tuple[Settings, Credential, AccessTokens]:
    """Load the settings, credential and tokens, or raise `ConfigError` listing every problem."""
    _check_flags(args)
    try:
        settings = Settings.load(args)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except (SettingsError, ValueError, argparse.ArgumentError) as exc:
        raise ConfigError(f"  - {exc}") from None
    # From here on, warnings (a loose file mode that is allowed, an exposed
    # listen address that is allowed) go out in the configured format.
    configure_logging(settings.log_level, settings.log_format)

    problems = []
    credential = tokens = None
    try:
        check_config_file(settings)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        credential = build_credential(settings)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        tokens = load_access_tokens(settings)
        check_exposure(settings, tokens)
    except ConfigError as exc:
        problems.append(str(exc))
    if problems or credential is None or tokens is None:
        raise ConfigError("\n".join(f"  - {problem}" for problem in problems))
    return settings, credential, tokens


def _check_flags(args: list[str]) -> None:
    """Refuse unknown flags here, naming them without echoing any value (it may be a secret)."""
    names = [arg.split("=", 1)[0] for arg in args if arg.startswith("-") and not _is_number(arg)]
    if any(name in _SECRET_FLAGS for name in names):
        raise ConfigError(
            "  - api_key: the key cannot be given as a flag (it would show in the process "
            f"list); set {ENV_PREFIX}API_KEY or use --api-key-file"
        )
    known = _known_flags()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"  - unknown option(s): {', '.join(unknown)}; nexus-proxy --help lists them"
        )


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True


def _known_flags() -> set[str]:
    flags = {"--help", "-h"}
    for name, field in Options.model_fields.items():
        flag = "--" + name.replace("_", "-")
        flags.add(flag)
        if field.annotation is bool:
            flags.add("--no-" + flag[2:])
    return flags


def _explain(exc: ValidationError) -> str:
    """Format one line per problem, naming the setting and where it can be set."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(part) for part in error["loc"])
        if not key:  # a rule across settings: its message names them
            lines.append(f"  - {error['msg'].removeprefix('Value error, ')}")
            continue
        if error["type"] == "extra_forbidden":
            message = "unknown setting; config.example.toml lists every valid key"
        else:
            message = error["msg"].removeprefix("Value error, ")
            field = key.split(".")[0]
            message += (
                f" (set it with --{field.replace('_', '-')}, {ENV_PREFIX}{field.upper()}"
                f" or the TOML key {field})"
            )
        lines.append(f"  - {key}: {message}")
    return "\n".join(lines)
