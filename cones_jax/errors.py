"""The one error family of cones_jax: everything a user can cause is a `ConesError`.

A `ConesError` carries a one-line message that says what is wrong, where, and what to do; the
command lines print it as `error: <message>` and exit with its `exit_code` (2: bad input or
configuration; 1: the environment or the numbers, e.g. a diverged loss). Any other exception is a
bug in cones_jax and keeps its traceback.

The input errors also derive from `ValueError`, so library callers that caught `ValueError`
before this family existed still catch them.
"""

from __future__ import annotations


class ConesError(Exception):
    """Base class: a failure the user can fix (the message says how)."""

    exit_code = 2


class ConfigError(ConesError, ValueError):
    """A preset, config file, `--set` override or flag value that cannot be used."""


class LayoutError(ConesError, ValueError):
    """A layout file (ours or the official list format) or its mask / colour-map images."""


class CheckpointError(ConesError, ValueError):
    """A model folder, weight file or training checkpoint that is missing, foreign or damaged."""


class ArtifactError(ConesError, ValueError):
    """A residual (.safetensors) or concept-neuron (.cones) file: format, width, base model."""


class DataError(ConesError, ValueError):
    """Training images: a folder without usable images, an image that cannot be decoded."""


class GenerateError(ConfigError):
    """Bad input to layout sampling (`sample.py`)."""


class ResidualError(ConfigError):
    """Bad input to residual training (`train.py residual`)."""


class NeuronsError(ConfigError):
    """Bad input to the concept-neuron search (`train.py neurons`, `neurons-joint`)."""


class NeuronsFileError(NeuronsError, ArtifactError):
    """A `.cones` file that cannot be read or does not fit the model."""


class DivergedError(ConesError, FloatingPointError):
    """Training produced a non-finite loss: the numbers, not the input (exit code 1)."""

    exit_code = 1


class OutputError(ConesError, OSError):
    """An output folder that cannot be written now: read-only, or another run is writing to it (exit
    code 1: the environment, not the input)."""

    exit_code = 1


class NonFiniteError(ConesError, FloatingPointError):
    """Sampling produced NaN or Inf: the numbers, not the input (exit code 1); nothing is written."""

    exit_code = 1
class TrainingStopped(ConesError):
    """Training stopped by a signal between two steps; exit 130 (SIGINT) or 143 (SIGTERM), the
    shell's codes for those signals. The message says where the run resumes."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
