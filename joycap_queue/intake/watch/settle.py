"""When a noticed file is whole: the settle state machine of a watched inbox.

A file is ready at inotify's close-after-write if it also ends the way its format ends, or once
its size and mtime have held still for the settle time; in both cases only if it decodes. One
that never decodes is queued as broken once it has not changed for ``incomplete_after``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from joycap_queue.intake.images import decodes_completely, has_end_marker
from joycap_queue.intake.watch.inbox import InboxState, Pending

log = logging.getLogger(__name__)


def observe(state: InboxState, path: Path, now: float, *, closed: bool) -> None:
    """Note a file an event or a scan noticed: new, changed since, or closed after a write."""
    try:
        stat = path.stat()
    except OSError:
        state.pending.pop(path, None)
        return
    signature = (stat.st_size, stat.st_mtime_ns)
    if signature in (state.handled.get(path), state.held.get(path)):
        return
    entry = state.pending.get(path)
    if entry is None:
        state.seen += 1
        # A file unchanged since long before we saw it (present at start, moved in) counts
        # as settled from its mtime; one being written has a fresh mtime and must wait.
        entry = state.pending[path] = Pending(*signature, changed_at=min(now, stat.st_mtime))
    elif (entry.size, entry.mtime_ns) != signature:
        entry.size, entry.mtime_ns, entry.changed_at = *signature, now
        entry.undecodable = False
    entry.closed = entry.closed or closed


def take_ready(
    state: InboxState, now: float, *, settle_seconds: float, incomplete_after: float, max_pixels: int
) -> list[Path]:
    """The pending files that are whole now, marked handled; the rest wait on."""
    ready = []
    for path, entry in list(state.pending.items()):
        if entry.undecodable:
            if now - entry.changed_at >= incomplete_after:
                # Unchanged for this long and still not an image: not a slow writer but a
                # broken file. Queued, it becomes a failed job with its reason.
                del state.pending[path]
                state.handled[path] = (entry.size, entry.mtime_ns)
                ready.append(path)
            continue
        if not entry.closed and now - entry.changed_at < settle_seconds:
            continue
        try:
            stat = path.stat()
        except OSError:
            del state.pending[path]
            continue
        if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns):
            entry.size, entry.mtime_ns, entry.changed_at = stat.st_size, stat.st_mtime_ns, now
            entry.closed = False
            continue
        settled = now - entry.changed_at >= settle_seconds
        # At a close event the file must also end properly: a writer that reopens to append
        # leaves a decodable prefix behind at every close. A settled file needs only decode.
        if (settled or has_end_marker(path)) and decodes_completely(path, max_pixels=max_pixels):
            del state.pending[path]
            state.handled[path] = (entry.size, entry.mtime_ns)
            ready.append(path)
        elif entry.closed:
            # Closed but not whole: a writer that reopens to append; wait for it to settle.
            entry.closed = False
            entry.changed_at = now
        else:
            entry.undecodable = True
            if not entry.warned:
                entry.warned = True
                log.warning(
                    "%s is not a complete image; waiting for it to change (queued as broken after %g s)",
                    path,
                    incomplete_after,
                )
    return ready
