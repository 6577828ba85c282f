"""Watch folders: inboxes, their settings, and the observer that turns dropped files into jobs."""
