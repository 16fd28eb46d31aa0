"""Benchmarks: measurements to read, not tests to pass (no thresholds, no exit codes on results).

Each module runs with `python -m benchmarks.NAME --help`; see benchmarks/README.md.
"""
