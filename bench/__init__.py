"""Benchmarks: `make bench` or `python -m bench [NAME ...]`; figures go to bench/results.json."""
