"""Benchmarks: measurements to read, not tests to pass (no thresholds, no exit codes on results).

`student bench NAME --help` runs each; results and how to read them: docs/benchmarks.md.
"""
