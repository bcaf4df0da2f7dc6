"""Shared command-line behaviour: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

BAD_INPUT_EXIT = 2


def bad_input_errors() -> tuple[type, ...]:
    from cones_jax.artifacts import ArtifactError
    from cones_jax.fileio import CheckpointError
    from cones_jax.generate import GenerateError
    from cones_jax.layout import LayoutError
    from cones_jax.neurons import NeuronsError
    return (ArtifactError, CheckpointError, GenerateError, LayoutError, NeuronsError, FileNotFoundError, ValueError)


def run_cli(job: Callable[[], None]) -> int:
    """Runs `job`; a bad-input exception becomes `error: <message>` and exit code 2."""
    errors = bad_input_errors()
    try:
        job()
    except errors as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return BAD_INPUT_EXIT
    except OSError as e:
        # A full disk or a lost mount: outputs are written to temporary names, so nothing half-written
        # is left behind; say what failed in one line.
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: could not write{where}: {e.strerror or e}; free some space or choose another output "
              "location", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
