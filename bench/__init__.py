"""Benchmarks of flexq: queue overhead, one-process concurrency, bulk enqueue (``python -m bench.run``)."""
