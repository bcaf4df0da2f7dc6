"""Benchmarks, each run from the repository root as `python -m benchmarks.<name>`; `common` holds what
they share (architectures, random-weight models, timing, tables)."""
