"""Reading secret files the way secret mounts write them, and refusing loose permissions."""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path

from .errors import ConfigError
from .settings import Settings

__all__ = ["check_config_file", "check_permissions", "read_secret_file"]

logger = logging.getLogger("nexus_proxy")


def is_too_open(status: os.stat_result) -> bool:
    """Check whether a secret file is open to more than its owner and, in one case, its group.

    OpenSSH's rule for private keys applies to a file the proxy's own user owns:
    no access for group or others. A file owned by another user (root, as
    Kubernetes mounts Secrets with fsGroup, mode 0440) may grant its group read
    access, since its owner decided that; access for others is never accepted.
    """
    if status.st_mode & stat.S_IRWXO:
        return True
    return status.st_uid == os.getuid() and bool(status.st_mode & stat.S_IRWXG)


def check_permissions(path: Path, setting: str, *, allow_insecure: bool) -> None:
    """Raise `ConfigError` when `path` is open to group or others, unless allowed."""
    try:
        status = path.stat()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if not is_too_open(status):
        return
    mode = status.st_mode

    problem = (
        f"{setting}: {path} contains a secret but is open to group or others "
        f"(mode {stat.S_IMODE(mode):04o})"
    )
    if allow_insecure:
        logger.warning("%s; allowed by allow_insecure_permissions", problem)
        return
    raise ConfigError(
        f"{problem}; run 'chmod 600 {path}', or set allow_insecure_permissions = true "
        "to accept it with a warning"
    )


def read_secret_file(path: Path, setting: str, *, allow_insecure: bool = False) -> str:
    """Read the file's text with surrounding whitespace and the trailing newline stripped."""
    check_permissions(path, setting, allow_insecure=allow_insecure)
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{setting}: cannot read {path}: {reason}") from None


def check_config_file(settings: Settings) -> None:
    """Apply the secret file rule to the TOML file when it contains a secret."""
    if settings.config is None:
        return
    with settings.config.open("rb") as file:
        data = tomllib.load(file)
    oauth = data.get("oauth")
    has_secret = "api_key" in data or "access_tokens" in data
    has_secret |= isinstance(oauth, dict) and "client_secret" in oauth
    if has_secret:
        check_permissions(
            settings.config, "config", allow_insecure=settings.allow_insecure_permissions
        )
