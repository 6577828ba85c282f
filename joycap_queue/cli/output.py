"""Printing captions and tables safely: random or hostile text must not drive the terminal."""

from __future__ import annotations

import shutil
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any

import click


def printable(text: str | None, *, one_line: bool = False) -> str:
    """Control characters (NUL, escape sequences …) shown as escapes; newlines kept unless one_line."""
    if text is None:
        return ""
    out = []
    for char in text:
        if char == "\n" and not one_line:
            out.append(char)
        elif char in "\n\t" and one_line:
            out.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn") and char != "\t":
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, stretch: int = -1) -> str:
    """A plain-text table; column ``stretch`` takes whatever terminal width is left."""
    cells = [[printable(str(c), one_line=True) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if cells and stretch is not None:
        index = stretch % len(headers)
        total = shutil.get_terminal_size((120, 20)).columns
        others = sum(w + 2 for i, w in enumerate(widths) if i != index)
        widths[index] = max(len(headers[index]), min(widths[index], total - others))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(truncate(c, w).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


class _Quiet:
    """Stands in for a progress bar where nobody is watching (a pipe, CI, a log file)."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, _steps: int) -> None:
        return None

    length: int | None = None


def progress(length: int, label: str) -> Any:
    """A progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return _Quiet()
    return click.progressbar(length=length, label=label, file=sys.stderr)


MAX_LISTED_REJECTIONS = 10


def echo_rejections(rejections: Sequence[tuple[str, str]], *, hint: str = "") -> None:
    """The first rejected files with their reasons on stderr, and how many more there were."""
    for label, reason in rejections[:MAX_LISTED_REJECTIONS]:
        click.echo(f"  rejected {printable(label, one_line=True)}: {reason}", err=True)
    if len(rejections) > MAX_LISTED_REJECTIONS:
        more = len(rejections) - MAX_LISTED_REJECTIONS
        click.echo(f"  … and {more} more{hint}", err=True)
