"""The light side's Celery app as a module, for `celery -A joycap_queue.messaging.celery_app flower`."""

from joycap_queue.config import get_settings
from joycap_queue.messaging.app import make_celery

app = make_celery(get_settings())
