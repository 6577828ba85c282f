"""joycap-queue: caption large image collections with JoyCaption through a job queue."""

__version__ = "0.1.0"
