"""Shared command-line behaviour: a `ConesError` is one line on stderr and its exit code (2 for
bad input); the runtime settings every command starts with (CPU XLA flags, the compile cache)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import traceback
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import TextIO

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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like `run_cli`'s (`error: <what>`, exit 2) rather
    than the usage block followed by the error; --help still prints the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(BAD_INPUT_EXIT, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def flag_names(parser: argparse.ArgumentParser | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Library parameter -> the command's flag: each option's `dest` -> its long option string."""
    names = {}
    for action in parser._actions if parser is not None else ():  # argparse has no public accessor
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest != "help":
            names[action.dest] = longs[0]
        for sub in getattr(action, "choices", None) or ():  # a subcommand's own flags
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                names.update({k: v for k, v in flag_names(action.choices[sub]).items() if k not in names})
    names.update(extra or {})
    return names


def as_flags(message: str, flags: Mapping[str, str]) -> str:
    """Library messages name parameters in backquotes (`checkpoint_dir`); a command line names
    them as its flags (--checkpoint-dir). A name the command has no flag for keeps its quotes."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: flags.get(m.group(1), m.group(0)), message)


def show_warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one `warning: <message>` line on stderr: the user's problem, not our source line."""
    print(f"warning: {one_line(message)}", file=sys.stderr if file is None else file)


def with_warning_lines(job: Callable[[], None]) -> Callable[[], None]:
    """`job`, showing each warning it raises as one line (the previous way is restored after)."""
    def run() -> None:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning_line
            job()
    return run


def run_cli(job: Callable[[], None], *, debug: bool = False, parser: argparse.ArgumentParser | None = None,
            flags: Mapping[str, str] | None = None, cache: bool = True) -> int:
    """Runs `job` and turns its failure into one line on stderr and an exit code.

    `ConesError` (bad input, configuration, or numbers; `cones_jax.errors`): `error: <message>`,
    exit `e.exit_code` (2, or 1 for the environment and diverged training). `OSError` (a full
    disk, a read-only folder, a lost mount): one line, exit 1; outputs are written to temporary
    names, so nothing half-written is left. Ctrl-C: exit 130. Anything else is a bug: its
    traceback, a line saying so, exit 1. `debug` prints the traceback for every failure.
    Parameter names in a message become the flags of `parser` (and `flags`: parameter -> flag).
    `cache=False` leaves JAX's persistent compilation cache off (a command that writes only to its
    own output folder).
    """
    names = flag_names(parser, flags)
    prepare_runtime() if cache else default_xla_flags()
    try:
        with_warning_lines(job)()
    except ConesError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {as_flags(one_line(e), names)}", file=sys.stderr)
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
