"""The light side's Celery app as a module, for `celery -A joycap_queue.celery_app flower`."""

from joycap_queue.config import get_settings
from joycap_queue.queue import make_celery

app = make_celery(get_settings())
