"""What a watched inbox has seen: candidate files, those settling, those taken.

The watcher's bookkeeping, apart from its loop (`watcher.FolderWatcher`): which names are
candidates (temporary names of copy tools and hidden files are not), and what each candidate's
last size and mtime were.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from joycap_queue.intake.images import IMAGE_EXTENSIONS
from joycap_queue.intake.watch.config import InboxConfig
from joycap_queue.results.sidecars import OutputOptions

# Names copy tools and browsers give a file while they write it; the final rename brings it in.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".!qb", "~")


@dataclass
class Pending:
    size: int
    mtime_ns: int
    changed_at: float  # wall-clock time the file was last seen changing
    closed: bool = False
    undecodable: bool = False
    warned: bool = False


@dataclass
class InboxState:
    """One inbox: what it has seen, what waits to settle, and what it has queued."""

    config: InboxConfig
    excluded: tuple[Path, ...]
    pending: dict[Path, Pending] = field(default_factory=dict)
    handled: dict[Path, tuple[int, int]] = field(default_factory=dict)
    twins: dict[Path, int] = field(default_factory=dict)
    # Files found ready whose intake failed while the database or Redis was away: taken again
    # once it answers, without settling and decoding again.
    held: dict[Path, tuple[int, int]] = field(default_factory=dict)
    seen: int = 0
    queued: int = 0
    watcher_id: int | None = None
    submission_id: int | None = None

    @property
    def root(self) -> Path:
        return self.config.path

    @property
    def outputs(self) -> OutputOptions:
        return self.config.request.outputs

    def verdict(self, path: Path) -> str:
        """What the watcher has made of a file so far: taken, held (ready, waiting for the database
        or Redis), incomplete (settled but it does not decode), settling, or unseen (not looked at
        yet, or not a candidate)."""
        if path in self.handled:
            return "taken"
        if path in self.held:
            return "held"
        entry = self.pending.get(path)
        if entry is None:
            return "unseen"
        return "incomplete" if entry.undecodable else "settling"

    def hold(self, paths: list[Path]) -> None:
        """Files taken whose intake failed: held until the database and Redis answer again."""
        for path in paths:
            signature = self.handled.pop(path, None)
            if signature is not None:
                self.held[path] = signature

    def take_held(self) -> list[Path]:
        """The held files still as they were when found ready, taken again; a changed or removed
        one is left to its events and the rescan, as any new file."""
        taken = []
        for path, signature in self.held.items():
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_size, stat.st_mtime_ns) == signature:
                self.handled[path] = signature
                taken.append(path)
        self.held.clear()
        return taken

    def is_candidate(self, path: Path) -> bool:
        name = path.name
        if name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES):
            return False
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            return False
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return False
        if any(part.startswith(".") for part in relative.parts[:-1]):
            return False
        return not any(path.is_relative_to(excluded) for excluded in self.excluded)


def walk_candidates(state: InboxState) -> Iterator[Path]:
    for directory, subdirs, files in os.walk(state.root):
        base = Path(directory)
        subdirs[:] = sorted(
            d for d in subdirs if not d.startswith(".") and not any((base / d) == ex for ex in state.excluded)
        )
        for name in sorted(files):
            path = base / name
            if state.is_candidate(path):
                yield path
