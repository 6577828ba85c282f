"""Errors a user can act on; the CLI prints them as one line, without a traceback."""

from __future__ import annotations


class JoycapError(Exception):
    """A problem the user can fix (bad option, unreachable service, missing file)."""


class OptionError(JoycapError, ValueError):
    """An invalid caption option; ``field`` names the option, the message lists valid choices."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ServiceUnavailable(JoycapError):
    """Redis or the database cannot be reached."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (the class name if it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
