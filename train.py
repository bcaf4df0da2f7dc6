#!/usr/bin/env python
"""Training of Cones 2 residuals and Cones concept neurons; flags and examples: `python train.py --help`."""
import sys

from cones_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
