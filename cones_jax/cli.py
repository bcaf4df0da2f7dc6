"""Shared command-line behaviour: bad input is one line on stderr and exit code 2; the runtime
settings every command starts with (CPU XLA flags, the persistent compilation cache)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

BAD_INPUT_EXIT = 2

# XLA:CPU flags measured fastest for our UNet (BENCHMARKS.md, "UNet forward"): jaxlib's YNNPACK
# convolutions ran at ~0.85x of XLA's own kernels on these shapes.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def default_xla_flags() -> None:
    """On a CPU-only install, XLA_FLAGS defaults to `CPU_XLA_FLAGS`; a user's own XLA_FLAGS win.

    XLA reads them when the backend starts, so this works after `import jax` but not after the
    first computation.
    """
    if "XLA_FLAGS" not in os.environ and not _accelerator_expected():
        os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in `<user cache>/xla` ($CONES_JAX_CACHE, see
    `fileio.user_cache_dir`): the second run of a command loads its compiled programs instead of
    compiling them again. A cache directory set earlier (tests, a notebook) is kept."""
    import jax

    from cones_jax.fileio import user_cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(user_cache_dir(), "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def prepare_runtime() -> None:
    """What every command sets before its first computation."""
    default_xla_flags()
    enable_compilation_cache()


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
    prepare_runtime()
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
