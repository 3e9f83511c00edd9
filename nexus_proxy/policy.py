"""Request policy: which methods and paths may be forwarded, decided on what is forwarded.

Nexus matches paths without regard to case (ASP.NET routing), decodes percent-escapes
and ignores a trailing slash, so rules are matched against the path as the upstream
will read it. A path whose reading upstream cannot be known here (encoded slash,
backslash or dot, a dot segment, a `;` parameter) is refused outright whenever a
path rule exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

__all__ = ["PolicyRefusal", "RequestRules"]

READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Escapes whose meaning differs between servers: encoded "/", "\", ".", "%" and NUL.
_AMBIGUOUS_ESCAPE = re.compile(rb"%(2f|5c|2e|25|00)", re.IGNORECASE)
_DOT_SEGMENT = re.compile(rb"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True)
class PolicyRefusal:
    """Why a request is not forwarded: `forbidden` (403) or an unreadable path (400)."""

    forbidden: bool
    rule: str


class RequestRules:
    """Methods and path globs that decide what is forwarded."""

    def __init__(
        self,
        *,
        read_only: bool = False,
        allow_methods: Iterable[str] | None = None,
        allow_paths: Iterable[str] = (),
        deny_paths: Iterable[str] = (),
    ) -> None:
        self.read_only = read_only
        self.allow_methods = frozenset(allow_methods) if allow_methods is not None else None
        self.allow_paths = [(pattern, _compile(pattern)) for pattern in allow_paths]
        self.deny_paths = [(pattern, _compile(pattern)) for pattern in deny_paths]
        self.has_path_rules = bool(self.allow_paths or self.deny_paths)

    @property
    def is_empty(self) -> bool:
        """Whether every request is allowed, so checking can be skipped."""
        return not (self.read_only or self.allow_methods is not None or self.has_path_rules)

    def check(self, method: str, raw_path: bytes) -> PolicyRefusal | None:
        """Return the reason to reject this request, or None to forward it."""
        # Methods are case-sensitive (RFC 9110 section 9.1): "get" is not GET.
        if self.read_only and method not in READ_ONLY_METHODS:
            return PolicyRefusal(True, f"read_only (method {method})")
        if self.allow_methods is not None and method not in self.allow_methods:
            return PolicyRefusal(True, f"allow_methods (method {method})")
        if not self.has_path_rules:
            return None

        path = canonical_path(raw_path)
        if path is None:
            return PolicyRefusal(False, "ambiguous path")
        for pattern, regex in self.deny_paths:
            if regex.fullmatch(path):
                return PolicyRefusal(True, f"deny_paths {pattern!r}")
        if self.allow_paths and not any(regex.fullmatch(path) for _, regex in self.allow_paths):
            return PolicyRefusal(True, "allow_paths (no pattern matches)")
        return None


def canonical_path(raw_path: bytes) -> str | None:
    """Return the path as Nexus reads it (decoded, lower case, single slashes, no trailing slash).

    Returns None for a path whose reading upstream is ambiguous.
    """
    if _AMBIGUOUS_ESCAPE.search(raw_path) or b"\\" in raw_path or b";" in raw_path:
        return None
    try:
        decoded = unquote(raw_path.decode("ascii"), encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return None
    # A "%" left after one decoding came from an escape spelled so as to decode
    # twice ("%%32%66" -> "%2f"); a dot segment means a different path upstream.
    if "%" in decoded or _DOT_SEGMENT.search(decoded.encode()):
        return None
    return _normalise(decoded)


def _normalise(path: str) -> str:
    path = re.sub("/{2,}", "/", path.lower())
    return path.rstrip("/") or "/"


def _compile(pattern: str) -> re.Pattern[str]:
    """Compile a glob to a regex: `*` within one segment, `**` across segments."""
    normalised = _normalise(pattern if pattern.startswith("/") else "/" + pattern)
    regex = ""
    parts = re.split(r"(/\*\*|\*\*|\*)", normalised)
    for part in parts:
        if part == "/**":
            # "/token/**" covers "/token" itself and everything below it.
            regex += "(/.*)?"
        elif part == "**":
            regex += ".*"
        elif part == "*":
            regex += "[^/]*"
        else:
            regex += re.escape(part)
    return re.compile(regex)
