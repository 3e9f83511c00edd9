"""Logging setup: named loggers on one handler, and the noisy libraries kept quiet."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]

# httpx logs every request's full URL at INFO; query strings stay out of our logs.
_QUIET = ("httpx", "httpcore", "uvicorn.access")


def configure_logging(level: str) -> None:
    """Send every log line, uvicorn's included, to stderr as text at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
