"""Benchmarks that print figures next to baselines from the same run: `python -m bench --help`."""
