"""Measurements of lightning-gradguard, printed as tables (e.g. ``python -m benchmarks.overhead``)."""
