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


def first_line(exc: BaseException | str, *, driver: bool = False, strip: bool = True) -> str:
    """An exception's message, or a text, cut to its first line.

    An exception with no message gives its class name; a blank text gives itself. ``driver``
    reads a SQLAlchemy error's ``.orig`` (the database driver's own error, without the SQL and
    parameters SQLAlchemy adds) when it has one. ``strip=False`` keeps the text as it starts and
    ends: the first line of ``"failed: \nmore"`` is ``"failed: "``.
    """
    if isinstance(exc, str):
        text = exc
    else:
        source = getattr(exc, "orig", None) if driver else None
        text = str(exc if source is None else source)
    lines = (text.strip() if strip else text).splitlines()
    if lines:
        return lines[0]
    return text if isinstance(exc, str) else type(exc).__name__
