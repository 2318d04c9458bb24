"""Measurements of lightning-gradguard: overhead per training step, printed as tables (``python -m benchmarks.overhead``)."""
