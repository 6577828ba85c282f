"""Celery and Redis as the light side uses them: the app, task names, the broker's lists."""
