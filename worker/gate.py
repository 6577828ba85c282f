"""Who may be in flight together in one worker process: everyone, or one suspect alone.

When a worker dies with several jobs in flight, nobody knows which image killed it, so none is
blamed (`liveness`): each goes back to the queue marked to run alone. A job so marked waits
here until the process has nothing else in flight, and holds off new jobs until it is done; if
the worker dies now, the culprit is known and its attempt counts. Other jobs pass freely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.batcher import HandedBack


class Gate:
    """A readers-writer lock that favours the one who must run alone, and can be closed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0
        self._closed = False

    def _blocked(self, alone: bool) -> bool:
        if alone:
            return self._alone or self._shared > 0
        return self._alone or self._waiting_alone > 0

    @contextmanager
    def hold(self, *, alone: bool, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Be in flight, with others or alone; ``on_wait`` runs once, before the first wait."""
        with self._cond:
            if alone:
                self._waiting_alone += 1
            try:
                noted = on_wait is None
                while self._blocked(alone) and not self._closed:
                    if not noted:
                        noted = True
                        self._cond.release()  # a database write: not under the lock
                        try:
                            on_wait()  # type: ignore[misc]
                        finally:
                            self._cond.acquire()
                        continue
                    self._cond.wait()
            finally:
                if alone:
                    self._waiting_alone -= 1
            if self._closed:
                self._cond.notify_all()
                raise HandedBack("the worker is stopping")
            if alone:
                self._alone = True
            else:
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._alone = False
                else:
                    self._shared -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Release every waiter with HandedBack; those in flight carry on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
