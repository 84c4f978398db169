"""Benchmarks of funcdistill against hand-written distillation steps.

Run ``python -m benchmarks.run`` (``--quick`` for a short run). Results are
ratios against a hand-written floor measured in the same process; see
``docs/benchmarks.md``. Nothing here is imported by the library or timed in
the tests.
"""
