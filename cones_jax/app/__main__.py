"""`python -m cones_jax.app`: the layout web app (see `cones_jax.app`)."""

import sys

from cones_jax.app import main

sys.exit(main())
