"""The errors the throwaway servers raise, and how much server output such an error quotes."""

from __future__ import annotations

_LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """Base class of errors raised by the throwaway servers."""


class MissingPackageError(ServerError):
    """A Debian package the server needs is not installed and cannot be installed."""


class ServerStartError(ServerError):
    """A server failed to initialise, start or become ready."""
