"""Putting things right after a crash: heartbeats, rescuing dead workers' jobs, resending lost messages."""
