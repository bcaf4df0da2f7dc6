"""Benchmark scripts. Run from the repository root: `python -m benchmarks.accelerator` (the other
scripts also as `python benchmarks/<name>.py`)."""
