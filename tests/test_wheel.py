"""The wheel holds everything the main command needs: built here, installed (not editable) into a
fresh virtual environment, and run from a folder far from the checkout, with no download."""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_WHEEL_MB = 40


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def _setuptools_builds_wheels() -> bool:
    # Offline builds use this environment's setuptools (the test extra asks for >= 70.1, which
    # builds wheels without the `wheel` package).
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def _build_wheel(tmp_path) -> str:
    # From a copy, so that the build leaves no build/ or .egg-info in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "cones_jax"), src / "cones_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), str(src)])
    (wheel,) = glob.glob(str(tmp_path / "dist" / "cones_jax-*.whl"))
    return wheel


def _fresh_venv(tmp_path, wheel: str) -> str:
    """A venv holding only the wheel; its dependencies come from this environment's site-packages,
    named as a plain path (so that an editable install of the checkout found there is not loaded)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(purelib, "_outer_dependencies.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    return str(venv)


@pytest.mark.skipif(not _setuptools_builds_wheels(), reason="needs setuptools>=70.1: pip install -e '.[test]'")
def test_wheel_installs_and_runs_the_main_command_from_anywhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    size_mb = os.path.getsize(wheel) / 2 ** 20
    assert size_mb <= MAX_WHEEL_MB, f"the wheel is {size_mb:.1f} MB"
    venv = _fresh_venv(tmp_path, wheel)
    bin_dir = os.path.join(venv, "bin")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "CONES_JAX_MODEL")}
    env["CONES_JAX_CACHE"] = os.path.join(
        os.environ.get("CONES_JAX_TEST_CACHE", os.path.expanduser("~/.cache/cones_jax/jax_tests")), "wheel_cli")
    run = {"cwd": str(elsewhere), "env": env}

    where = _run([os.path.join(bin_dir, "python"), "-c", "import cones_jax; print(cones_jax.__file__)"], **run)
    assert where.stdout.strip().startswith(venv), f"imported {where.stdout.strip()}, not the installed wheel"

    out = elsewhere / "outputs"
    sampled = _run([os.path.join(bin_dir, "cones-jax-sample"), "--layout", "demo:two_subjects", "--seeds", "0",
                    "--steps", "2", "--out", str(out)], **run)
    assert "wrote 1 image(s)" in sampled.stdout
    assert (out / "two_subjects_seed0000.png").is_file() and (out / "two_subjects_grid.png").is_file()

    helped = _run([os.path.join(bin_dir, "cones-jax-train"), "residual", "--help"], **run)
    assert "--word" in helped.stdout and "--set" in helped.stdout
    helped = _run([os.path.join(bin_dir, "python"), "-m", "cones_jax.sample", "--help"], **run)
    assert "demo:NAME" in helped.stdout
    helped = _run([os.path.join(bin_dir, "cones-jax"), "app", "--help"], **run)
    assert "--share" in helped.stdout
    # the app's canvas script is package data (the page needs it; gradio itself is the [app] extra)
    js = _run([os.path.join(bin_dir, "python"), "-c", "from cones_jax.app.ui import canvas_script; "
               "print(len(canvas_script()))"], **run)
    assert int(js.stdout) > 1000
