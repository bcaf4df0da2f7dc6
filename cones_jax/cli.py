"""Shared command-line behaviour: a `ConesError` is one line on stderr and its exit code (2 for
bad input); the runtime settings every command starts with (CPU XLA flags, the compile cache)."""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from collections.abc import Callable

from cones_jax.errors import ConesError

BAD_INPUT_EXIT = 2
ENVIRONMENT_EXIT = 1

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


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_cli(job: Callable[[], None], *, debug: bool = False) -> int:
    """Runs `job` and turns its failure into one line on stderr and an exit code.

    `ConesError` (bad input, configuration, or numbers; `cones_jax.errors`): `error: <message>`,
    exit `e.exit_code` (2, or 1 for the environment and diverged training). `OSError` (a full
    disk, a read-only folder, a lost mount): one line, exit 1; outputs are written to temporary
    names, so nothing half-written is left. Ctrl-C: exit 130. Anything else is a bug: its
    traceback, a line saying so, exit 1. `debug` prints the traceback for every failure.
    """
    prepare_runtime()
    try:
        job()
    except ConesError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if debug:
            traceback.print_exc()
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or one_line(e)}{where}; check that path, its permissions and the free space, "
              "or choose another location", file=sys.stderr)
        return ENVIRONMENT_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: keep its traceback, exit 1
        traceback.print_exc()
        print("error: an internal error in cones_jax (the traceback above); please report it", file=sys.stderr)
        return ENVIRONMENT_EXIT
    return 0
