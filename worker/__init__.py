"""The heavy side of joycap-queue: the model, its preprocessing and the Celery task."""
