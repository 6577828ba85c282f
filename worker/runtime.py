"""The one captioner of this worker process, built lazily inside the process that uses it.

Celery's threads pool runs every task of a worker in this process, so its task threads share
one model. It is never built in a parent that forks: CUDA does not survive a fork.
"""

from __future__ import annotations

import threading

from joycap_queue.config import Settings, get_settings
from worker.captioner import Captioner

_lock = threading.Lock()
_captioner: Captioner | None = None


def get_captioner(settings: Settings | None = None) -> Captioner:
    """The process's captioner, loaded on first use (the worker command loads it before serving)."""
    global _captioner
    with _lock:
        if _captioner is None:
            settings = settings or get_settings()
            _captioner = Captioner(
                settings.model,
                device=settings.device,
                dtype=settings.dtype,
                torch_threads=settings.torch_threads,
            )
        captioner = _captioner
    captioner.load()
    return captioner
