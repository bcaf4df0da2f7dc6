"""Multi-host residual training, emulated on this machine: two processes of 4 fake CPU devices each,
joined by `jax.distributed` through `train.py residual --distributed --coordinator ...`, train two
subjects and must write what one process of 8 devices writes; only process 0 writes, and a resume
across both processes works. (CPU collectives between processes: jax's default, gloo.)"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import make_sd

from cones_jax import artifacts
from cones_jax import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--preset", "official", "--resolution", "32", "--lr", "1e-3", "--steps", "3", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    tmp = tmp_path_factory.mktemp("photos")
    items = []
    for i, word in enumerate(("dog", "cat")):
        folder = tmp / word
        folder.mkdir()
        rng = np.random.default_rng(i)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (36, 32, 3), dtype=np.uint8)).save(folder / f"{k}.png")
        items.append({"images": str(folder), "word": word, "overrides": {"seed": 3 + i}})
    path = tmp / "subjects.json"
    path.write_text(json.dumps({"subjects": items}))
    return root, str(path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(argv, timeout=300):
    """`train.py` in two processes of 4 CPU devices each; returns their (returncode, stderr)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # the tests' compilation cache (conftest.py): the three two-process runs share one step
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    procs = [subprocess.Popen([sys.executable, "-m", "cones_jax.train", *argv, "--distributed",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def _deltas(folder):
    return {n: artifacts.load_residual(os.path.join(folder, n)).delta for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The two subjects trained by one process of 8 devices."""
    root, subjects = tiny
    ref = tmp_path_factory.mktemp("ref")
    assert train_cli.main(["residual", "--model", root, "--subjects", subjects, "--out-dir", str(ref), *FLAGS]) == 0
    want = _deltas(ref)
    assert sorted(want) == ["cat.safetensors", "dog.safetensors"]
    return want


def _close(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale)


def test_multi_process_run_equals_one_process(tiny, reference, tmp_path):
    root, subjects = tiny
    two = tmp_path / "two"
    results = _two_processes(["residual", "--model", root, "--subjects", subjects, *FLAGS, "--out-dir", str(two)])
    assert [rc for rc, _ in results] == [0, 0], results
    assert "wrote 2 residual(s)" in results[0][1] and "wrote" not in results[1][1], results  # process 0 alone logs
    _close(_deltas(two), reference)


def test_multi_process_resume(tiny, reference, tmp_path):
    """Stopped after 2 steps, then resumed by both processes from the shared checkpoint folder."""
    root, subjects = tiny
    base = ["residual", "--model", root, "--subjects", subjects, *FLAGS, "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-every", "1"]
    results = _two_processes([*base, "--out-dir", str(tmp_path / "part"), "--steps", "2"])
    assert [rc for rc, _ in results] == [0, 0], results
    results = _two_processes([*base, "--out-dir", str(tmp_path / "resumed"), "--resume"])
    assert [rc for rc, _ in results] == [0, 0], results
    assert "resumed from step 2" in results[0][1], results
    _close(_deltas(tmp_path / "resumed"), reference)
