"""The Celery app a worker process runs: the light side's app plus the caption task."""

from __future__ import annotations

from joycap_queue.config import get_settings
from joycap_queue.messaging.app import make_celery

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
