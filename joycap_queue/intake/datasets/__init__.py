"""Hugging Face datasets as a source of jobs."""
