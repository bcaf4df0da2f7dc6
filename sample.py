#!/usr/bin/env python
"""Layout-guided multi-subject sampling (Cones 2); flags and examples: `python sample.py --help`."""
import sys

from cones_jax.sample import main

if __name__ == "__main__":
    sys.exit(main())
