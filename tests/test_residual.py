"""Cones 2 residual training (Eqs. 2-5) on a tiny random SD 1.x folder: preservation terms, loss
decrease, batch and sharding invariance, resumable checkpoints, the artifact, and the CLI's bad input."""

import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import make_sd

from cones_jax import artifacts, residual, training
from cones_jax import train as train_cli
from cones_jax.errors import ResidualError

RES = 32      # pixels; the tiny VAE halves it -> 16x16 latents
LR = 1e-3     # large, so that 30 steps move the tiny encoder (same value everywhere: one compiled step)


def _write_images(folder):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    # A rotated phone photo: stored 48 wide x 32 high with EXIF orientation 6 (display rotated by 90°).
    img = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(os.path.join(folder, "a.jpg"), exif=exif)
    Image.fromarray(rng.integers(0, 255, (40, 32, 4), dtype=np.uint8), "RGBA").save(os.path.join(folder, "b.png"))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not an image")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sd"))
    make_sd(root, "sd1")
    images = _write_images(str(tmp_path_factory.mktemp("images")))
    return root, images


def _cfg(preset="official", **kw):
    return residual.load_train_config(preset, overrides=dict(dict(resolution=RES, lr=LR), **kw))


@pytest.fixture(scope="module")
def setup(tiny):
    root, images = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return residual.setup_residual(root, images, "dog", cfg=_cfg())


@pytest.fixture(scope="module")
def eval_loss(setup):
    """Eq. 4 with explicit randomness, jitted once for the module (frozen trees are arguments, not constants)."""
    fn = jax.jit(lambda p, f, b, d: residual.residual_loss(setup.spec, p, f, b, d))
    return lambda params, batch, draws, frozen=None: fn(params, frozen or setup.frozen, batch, draws)


def _fixed_batch(setup, n):
    """Centre crops of the cached latents, images cycled to `n` examples."""
    means = [m[:16, :16] for m in setup.latents.means]
    stds = [s[:16, :16] for s in setup.latents.stds]
    return {"mean": np.stack([means[i % 2] for i in range(n)]), "std": np.stack([stds[i % 2] for i in range(n)])}


def _draws(setup, b, seed):
    return residual.draw(setup.spec, jax.random.PRNGKey(seed), (b, 16, 16, 4), 1)


# ---------------------------------------------------------------------------------------------- data


def test_image_folder_loading(tiny, tmp_path, capsys):
    _, images = tiny
    training.check_images(images, RES)  # what the trainers run before loading a model
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: skipping 1 file(s)") and "notes.txt" in err[0], err
    arrays = training.load_images(images, RES, crop="random", multiple=2)
    assert capsys.readouterr().err == ""  # loading does not repeat the warning
    # EXIF orientation applied: the 48x32 stored image is 32 wide, 48 high once upright.
    assert arrays[0].shape == (48, 32, 3) and arrays[1].shape == (40, 32, 3)
    assert all(a.dtype == np.float32 and a.min() >= -1 and a.max() <= 1 for a in arrays)
    centre = training.load_images(images, RES, crop="center", multiple=2)
    assert [a.shape for a in centre] == [(RES, RES, 3)] * 2
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "grey.png")
    assert training.load_images(str(tmp_path), 16, crop="center", multiple=2)[0].shape == (16, 16, 3)
    with pytest.raises(training.DataError, match="does not exist"):
        training.load_images(str(tmp_path / "nowhere"), RES, crop="center", multiple=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(training.DataError, match="no images"):
        training.load_images(str(tmp_path / "empty"), RES, crop="center", multiple=2)


def test_batches_are_a_function_of_the_step():
    a = [training.batch_indices(s, 2, 3, seed=0) for s in range(6)]
    assert a == [training.batch_indices(s, 2, 3, seed=0) for s in range(6)]
    flat = sum(a, [])
    assert sorted(flat[:3]) == [0, 1, 2] and sorted(flat[3:6]) == [0, 1, 2]  # every image once per epoch


def test_sentences():
    s = residual.generate_sentences("dog", 1000, seed=0)
    assert len(s) == 1000 and len(set(s)) == 1000 and all("dog" in x for x in s)
    assert s == residual.generate_sentences("dog", 1000, seed=0)
    assert s != residual.generate_sentences("dog", 1000, seed=1)
    assert any(" an " in x for x in residual.generate_sentences("owl", 300))
    assert len(residual.TI_TEMPLATES) == 27


def test_delta_templates_replace_textual_inversions(tiny, tmp_path):
    """A config's own Δ templates (a model that never read "a photo of") are the prompts Δ is
    averaged over; a template without exactly one {} is refused before anything loads."""
    root, images = tiny
    assert residual.delta_templates(_cfg()) == residual.TI_TEMPLATES
    cfg = _cfg(delta_templates=("a {}", "a big {} on a grey background"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = residual.setup_residual(root, images, "dog", cfg=cfg)
    assert got.delta_prompts == ["a dog", "a big dog on a grey background"]
    for bad in ("a dog", "a {} and a {}", "a {word}"):
        with pytest.raises(ResidualError, match="delta_templates"):
            residual.train_residual(root, images, "dog", str(tmp_path / "x.safetensors"),
                                    overrides={"resolution": 32, "delta_templates": ("a {}", bad)})


def test_sentence_file(setup, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("a dog on the beach\n\na cat in a park\nmy dog at night\n")
    with pytest.warns(UserWarning, match="1 of 3"):
        assert residual.read_sentences(str(path), "dog", setup.tokenizer) == ["a dog on the beach", "my dog at night"]


# ---------------------------------------------------------------------------------------------- Eq. 3


def test_official_preservation_zero_at_start_and_subject_free(setup):
    text, params = setup.spec.text, setup.text_params
    ids = setup.frozen["instance_ids"][None]
    out_1xLxD = jnp.asarray(residual.encode_prompts(text, params, np.asarray(ids)))
    target = setup.frozen["reg_target"][None]
    free = setup.frozen["reg_free"][None]
    assert np.asarray(free[0]).nonzero()[0].tolist() == [1]  # bare "dog": one free position after the start
    reg = lambda e: float(residual.preservation_official(e, target, free, 1e-2, 1e-3))
    assert reg(out_1xLxD) == pytest.approx(0.0, abs=1e-6)
    assert reg(out_1xLxD.at[:, 1].add(1.0)) == pytest.approx(0.0, abs=1e-6)   # subject row: free
    d = out_1xLxD.shape[-1]
    assert reg(out_1xLxD.at[:, 0].add(1.0)) == pytest.approx(1e-2 * np.sqrt(d), rel=1e-4)   # λ1·‖·‖₂
    assert reg(out_1xLxD.at[:, 5].add(1.0)) == pytest.approx(1e-3 * np.sqrt(d), rel=1e-4)   # λ2·‖·‖_F
    # Per example, then averaged over the batch.
    two = jnp.concatenate([out_1xLxD.at[:, 0].add(1.0), out_1xLxD])
    assert float(residual.preservation_official(two, jnp.concatenate([target] * 2), jnp.concatenate([free] * 2),
                                                1e-2, 1e-3)) == pytest.approx(0.5e-2 * np.sqrt(d), rel=1e-4)
    # Gradient is finite (0) where the encoder starts: E' = E.
    g = jax.grad(lambda e: residual.preservation_official(e, target, free, 1e-2, 1e-3))(out_1xLxD)
    assert np.all(np.isfinite(np.asarray(g)))


def test_paper_preservation_zero_at_start_and_subject_free(setup):
    tok = setup.tokenizer
    ids = tok.encode(["a dog on the beach", "a photo of a small dog in a park"])
    keep = jnp.asarray(~residual.subject_mask(tok, ids, "dog"))
    out = jnp.asarray(residual.encode_prompts(setup.spec.text, setup.text_params, ids))
    assert float(residual.preservation_paper(out, out, keep)) == 0.0
    rows = residual.subject_rows(tok, ids, "dog")[:, 0]
    moved = out.at[jnp.arange(2), rows].add(3.0)
    assert float(residual.preservation_paper(moved, out, keep)) == 0.0            # subject rows excluded
    d = out.shape[-1]
    assert float(residual.preservation_paper(out.at[0, 0].add(1.0), out, keep)) == pytest.approx(d / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------- Eq. 2 / 4


def test_batch2_loss_is_mean_of_batch1_losses(setup, eval_loss):
    params = setup.initial_params()
    loss = eval_loss
    d2 = _draws(setup, 2, 0)
    b2 = _fixed_batch(setup, 2)
    l2, parts2 = loss(params, b2, d2)
    def row(i):
        take = lambda x: x[i:i + 1] if x.shape[0] == 2 else x
        return loss(params, jax.tree.map(lambda x: x[i:i + 1], b2), jax.tree.map(take, d2))[0]

    singles = [row(i) for i in range(2)]
    assert float(l2) == pytest.approx(float(np.mean(singles)), rel=1e-5)
    assert float(parts2["loss_reg"]) == pytest.approx(0.0, abs=1e-6)   # E' = E at step 0


def test_remat_gives_the_same_loss_and_grads(tiny, setup):
    root, images = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        remat = residual.setup_residual(root, images, "dog", cfg=_cfg(), remat=True)
    assert remat.spec.unet.remat and remat.spec.text.remat
    params, batch, draws = setup.initial_params(), _fixed_batch(setup, 1), _draws(setup, 1, 3)
    # a moved encoder, so that the preservation terms take part in the gradient too
    params = jax.tree.map(lambda x: x * 1.01, params)
    vg = lambda s: jax.value_and_grad(lambda p: residual.residual_loss(s.spec, p, s.frozen, batch, draws)[0])(params)
    (l0, g0), (l1, g1) = vg(setup), vg(remat)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-4)


def test_loss_falls(setup, eval_loss):
    from cones_jax.convert import flatten, unflatten

    # The random tiny UNet barely listens to its text; with its cross-attention values scaled up
    # (a frozen UNet whose output depends on the prompt, as a trained one's does) the encoder's
    # effect on L_sub shows clearly.
    unet = unflatten({k: v * 10.0 if "attn2" in k and k[-2] == "to_v" else v
                      for k, v in flatten(setup.frozen["unet"]).items()})
    frozen = dict(setup.frozen, unet=unet)
    optimizer = training.make_optimizer(setup.cfg)
    step = training.make_train_step(setup.loss_fn(), optimizer, training.make_mesh(1), frozen)
    state0 = training.init_state(setup.initial_params(), optimizer, seed=0)
    start = jax.tree.map(jnp.array, state0["params"])
    state, hist = training.run_loop(step, step.put_state(state0), setup.host_batch, total_steps=30, progress=False,
                                    log=lambda s: None)
    assert hist[0]["loss_reg"] == pytest.approx(0.0, abs=1e-6) and hist[-1]["loss_reg"] > 0
    shown = training.progress_fields(hist[-1])  # the bar names the loss first, then its parts
    assert list(shown)[0] == "loss" and {"loss_sub", "loss_reg"} <= set(shown) and "grad_norm" not in shown
    assert float(shown["loss_reg"]) == pytest.approx(hist[-1]["loss_reg"], abs=1e-4)
    assert int(state["step"]) == 30
    # Evaluated on fixed noise/timesteps, so the comparison is not drowned by the sampling noise.
    batch = _fixed_batch(setup, 2)
    before = [eval_loss(start, batch, _draws(setup, 2, k), frozen) for k in range(4)]
    after = [eval_loss(state["params"], batch, _draws(setup, 2, k), frozen) for k in range(4)]
    sub_before, sub_after = (np.mean([float(parts["loss_sub"]) for _, parts in r]) for r in (before, after))
    assert sub_after < 0.99 * sub_before, (sub_before, sub_after)
    total_before, total_after = (np.mean([float(loss) for loss, _ in r]) for r in (before, after))
    assert total_after < total_before, (total_before, total_after)


# ---------------------------------------------------------------------------------------------- sharding


def test_sharded_step_equals_single_device(setup):
    import optax

    assert len(jax.devices()) == 8
    # Plain SGD at lr 1: the parameter change is the gradient itself (Adam's first step would turn
    # every gradient into ±lr and amplify rounding noise in near-zero gradients into sign flips).
    optimizer = optax.sgd(1.0)
    batch = _fixed_batch(setup, 8)
    # Start a little away from the frozen encoder: at E' = E the official L2 norms sit at their
    # kink, where the gradient direction is set by rounding noise (in PyTorch as here).
    leaves, tree = jax.tree.flatten(setup.initial_params())
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    results = []
    for mesh in (training.make_mesh(8), training.make_mesh(8, jax.devices()[:1])):
        step = training.make_train_step(setup.loss_fn(), optimizer, mesh, setup.frozen)
        state = step.put_state(training.init_state(jax.tree.map(jnp.array, params), optimizer, seed=3))
        state, metrics = step(state, step.put_batch(batch))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    assert training.make_mesh(8).devices.size == 8
    (p8, m8), (p1, m1) = results
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- runs, artifact


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    root, images = tiny
    tmp = tmp_path_factory.mktemp("run")
    out = str(tmp / "dog.safetensors")
    ckpt = str(tmp / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = residual.train_residual(root, images, "dog", out, steps=4, checkpoint_dir=ckpt, checkpoint_every=2,
                                      progress=False, overrides=dict(resolution=RES, lr=LR, keep_checkpoints=5),
                                      log=lambda s: None)
    return res, out, ckpt


def _resume(root, images, checkpoint_dir, out):
    """Resumes the 4-step run of `full_run` from `checkpoint_dir`; returns the residual and the log lines."""
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = residual.train_residual(root, images, "dog", out, steps=4, checkpoint_dir=checkpoint_dir,
                                          checkpoint_every=2, resume=True, progress=False,
                                          overrides=dict(resolution=RES, lr=LR, keep_checkpoints=5), log=logs.append)
    return resumed, logs


def test_resume_gives_the_same_residual(tiny, full_run, tmp_path):
    root, images = tiny
    res, _, ckpt = full_run
    assert sorted(f for f in os.listdir(ckpt) if f.isdigit()) == ["2", "4"]
    # A run killed after its step-2 checkpoint: copy the checkpoints without the later one.
    killed = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, killed)
    shutil.rmtree(os.path.join(killed, "4"))
    resumed, logs = _resume(root, images, killed, str(tmp_path / "dog.safetensors"))
    assert any("resumed from step 2" in s for s in logs)
    np.testing.assert_allclose(resumed.delta, res.delta, atol=1e-6, rtol=0)
    assert np.abs(res.delta).max() > 0
    # Only the trainable state is checkpointed: far less than the frozen UNet + VAE.
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ckpt, "4")) for f in fs)
    model_bytes = sum(os.path.getsize(os.path.join(d, f)) for c in ("unet", "vae")
                      for d, _, fs in os.walk(os.path.join(root, c)) for f in fs)
    assert ckpt_bytes < model_bytes


def _damage(step_dir, how):
    """What a run killed while writing a checkpoint leaves: a truncated array file, a step folder
    without its state item, or one without its metadata."""
    if how == "truncated array file":
        data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
        for name in os.listdir(data):
            path = os.path.join(data, name)
            os.truncate(path, os.path.getsize(path) // 2)
    else:
        shutil.rmtree(os.path.join(step_dir, "state" if how == "missing state item" else "meta"))


@pytest.mark.parametrize("how", ["truncated array file", "missing state item", "missing metadata"])
def test_resume_skips_a_damaged_checkpoint(tiny, full_run, tmp_path, how):
    root, images = tiny
    res, _, ckpt = full_run
    killed = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, killed)
    _damage(os.path.join(killed, "4"), how)
    resumed, logs = _resume(root, images, killed, str(tmp_path / "dog.safetensors"))
    skipped = [s for s in logs if "skipping checkpoint step 4" in s]
    assert len(skipped) == 1 and "\n" not in skipped[0], logs
    assert any("resumed from step 2" in s for s in logs), logs
    np.testing.assert_allclose(resumed.delta, res.delta, atol=1e-6, rtol=0)
    # The damaged step was set aside and saved again by the resumed run.
    assert os.path.isdir(os.path.join(killed, "damaged-step-4")) and os.path.isdir(os.path.join(killed, "4"))


def test_resume_without_a_good_checkpoint_starts_afresh(tiny, full_run, tmp_path):
    root, images = tiny
    res, _, ckpt = full_run
    killed = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, killed)
    _damage(os.path.join(killed, "4"), "missing state item")
    _damage(os.path.join(killed, "2"), "truncated array file")
    resumed, logs = _resume(root, images, killed, str(tmp_path / "dog.safetensors"))
    assert sum("skipping checkpoint step" in s for s in logs) == 2, logs
    assert any("starting from step 0" in s for s in logs), logs
    np.testing.assert_allclose(resumed.delta, res.delta, atol=1e-6, rtol=0)


def test_resume_refuses_another_word(tiny, full_run, tmp_path, capsys):
    root, images = tiny
    _, _, ckpt = full_run
    other = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, other)
    before = sorted(os.listdir(other))
    out = str(tmp_path / "cat.safetensors")
    rc, errors, err = _cli(capsys, ["residual", "--model", root, "--images", images, "--word", "cat", "--out", out,
                                    "--resolution", str(RES), "--steps", "6", "--checkpoint-dir", other, "--resume",
                                    "--no-progress"])
    assert rc == 2 and len(errors) == 1 and "word 'dog'" in errors[0], err
    assert sorted(os.listdir(other)) == before and not os.path.exists(out)


def test_divergence_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    root, images = tiny
    out = str(tmp_path / "dog.safetensors")
    ckpt = str(tmp_path / "ckpt")
    # A learning rate this large sends the tiny encoder to Inf/NaN within a few steps.
    rc, errors, err = _cli(capsys, ["residual", "--model", root, "--images", images, "--word", "dog", "--out", out,
                                    "--resolution", str(RES), "--steps", "8", "--lr", "1e30", "--set",
                                    "max_grad_norm=1e30", "--checkpoint-dir", ckpt, "--checkpoint-every", "1",
                                    "--no-progress"])
    assert rc == 1 and len(errors) == 1, err
    assert ("became" in errors[0] or "not finite" in errors[0]) and "--resume" in errors[0], err
    assert not os.path.exists(out)
    saved = sorted(int(f) for f in os.listdir(ckpt) if f.isdigit())
    if saved:
        assert f"step {saved[-1]}" in errors[0]
        state = training.Checkpointer(ckpt, every=1, keep=2, metadata={}).manager.restore(saved[-1])
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["state"]))


def test_sigterm_stops_cleanly_and_resumes(tiny, tmp_path):
    """SIGTERM to `python -m cones_jax.train residual`: the step in flight finishes and is saved, one
    line says where to resume, exit 143; `--resume` continues from that step."""
    import signal
    import subprocess
    import sys
    import time

    root, images = tiny
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "dog.safetensors")
    env = _cli_env()
    argv = ["residual", "--model", root, "--images", images, "--word", "dog", "--out", out, "--resolution",
            str(RES), "--lr", str(LR), "--checkpoint-every", "1", "--checkpoint-dir", ckpt, "--no-progress",
            "--set", "keep_checkpoints=2"]
    proc = subprocess.Popen([sys.executable, "-m", "cones_jax.train", *argv, "--steps", "100000"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (os.path.isdir(ckpt) and any(f.isdigit() for f in os.listdir(ckpt))):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 143, err
    assert lines[-1].startswith("error: stopped by SIGTERM after step ") and "--resume" in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    stopped = int(lines[-1].split("after step ")[1].split()[0])
    assert max(int(f) for f in os.listdir(ckpt) if f.isdigit()) == stopped and not os.path.exists(out)
    logs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = residual.train_residual(root, images, "dog", out, steps=stopped + 1, checkpoint_dir=ckpt,
                                          checkpoint_every=1, resume=True, progress=False,
                                          overrides=dict(resolution=RES, lr=LR, keep_checkpoints=2), log=logs.append)
    assert any(f"resumed from step {stopped}" in s for s in logs), logs
    assert np.isfinite(resumed.delta).all() and os.path.exists(out)


def _cli_env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd(), XLA_FLAGS="",
                CONES_JAX_CACHE=os.path.join(os.path.expanduser("~/.cache/cones_jax"), "tests_cli"))


KILL_STEPS = 12


@pytest.fixture(scope="module")
def kill_reference(tiny, tmp_path_factory):
    """Δ of an uninterrupted KILL_STEPS-step run (checkpointing does not change the result)."""
    root, images = tiny
    out = str(tmp_path_factory.mktemp("ref") / "dog.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return residual.train_residual(root, images, "dog", out, steps=KILL_STEPS, progress=False,
                                       overrides=dict(resolution=RES, lr=LR), log=lambda s: None).delta


# One seed runs by default; all ten with `-m slow` as well (about 25 s each).
@pytest.mark.parametrize("seed", [0] + [pytest.param(s, marks=pytest.mark.slow) for s in range(1, 10)])
def test_sigkill_at_a_random_point_resumes_to_the_same_delta(tiny, kill_reference, tmp_path, seed):
    """SIGKILL at a random moment after the first checkpoint write began (so also in the middle of
    writes and of orbax deleting old steps); `--resume` must give the uninterrupted run's Δ."""
    import signal
    import subprocess
    import sys
    import time

    root, images = tiny
    ckpt = str(tmp_path / "ckpt")
    argv = ["residual", "--model", root, "--images", images, "--word", "dog", "--out", str(tmp_path / "a.safetensors"),
            "--resolution", str(RES), "--lr", str(LR), "--steps", str(KILL_STEPS), "--checkpoint-every", "1",
            "--checkpoint-dir", ckpt, "--no-progress", "--set", "keep_checkpoints=2"]
    proc = subprocess.Popen([sys.executable, "-m", "cones_jax.train", *argv], env=_cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and not (os.path.isdir(ckpt) and os.listdir(ckpt)):
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(np.random.default_rng(seed).uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = residual.train_residual(root, images, "dog", str(tmp_path / "b.safetensors"), steps=KILL_STEPS,
                                          checkpoint_dir=ckpt, checkpoint_every=1, resume=True, progress=False,
                                          overrides=dict(resolution=RES, lr=LR, keep_checkpoints=2),
                                          log=lambda s: None)
    np.testing.assert_allclose(resumed.delta, kill_reference, atol=1e-6, rtol=0)


def test_artifact_roundtrip_and_width(tiny, full_run, tmp_path):
    from cones_jax.pipeline import load_pipeline

    res, out, _ = full_run
    sd = load_pipeline(tiny[0], components=("text_encoder", "tokenizer"))
    loaded = artifacts.load_residual(out, word="dog", dim=32, text_encoder=sd.text_encoder_fingerprint)
    np.testing.assert_array_equal(loaded.delta, res.delta)
    assert loaded.delta.shape == (1, 32) and loaded.word == "dog" and loaded.preset == "official"
    assert list(loaded.token_ids) == sd.tokenizer.word_ids("dog")
    assert loaded.text_encoder == sd.text_encoder_fingerprint
    with pytest.raises(artifacts.ArtifactError, match="32-d"):
        artifacts.load_residual(out, dim=1024)
    big = str(tmp_path / "big.safetensors")
    artifacts.save_residual(big, artifacts.Residual(np.zeros((1, 1024), np.float32), "dog", (5,), "x" * 16, "official"))
    assert os.path.getsize(big) < 8 * 1024


# ---------------------------------------------------------------------------------------------- CLI


def _cli(capsys, argv):
    rc = train_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, [line for line in err if line.startswith("error:")], err


def test_cli_bad_input(tiny, full_run, tmp_path, capsys):
    root, images = tiny
    out = str(tmp_path / "o.safetensors")
    base = ["residual", "--model", root, "--word", "dog", "--out", out, "--resolution", str(RES), "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png at all")
    cases = {
        "empty folder": base + ["--images", str(empty)],
        "unreadable image": base + ["--images", str(broken)],
        "word is nothing": ["residual", "--model", root, "--word", "  ", "--out", out, "--images", images],
        "no images flag": base,
        "pickle without opt-in": base + ["--import-official", str(tmp_path / "r.pt")],
    }
    import torch
    torch.save(torch.ones(1, 32), str(tmp_path / "r.pt"))
    for name, argv in cases.items():
        rc, errors, err = _cli(capsys, argv)
        assert rc == 2 and len(errors) == 1, (name, err)
        assert not os.path.exists(out), name
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary files left

    # An existing --out is kept unless --overwrite.
    with open(out, "wb") as f:
        f.write(b"keep me")
    rc, errors, _ = _cli(capsys, base + ["--images", images])
    assert rc == 2 and "--overwrite" in errors[0] and open(out, "rb").read() == b"keep me"
    os.unlink(out)

    # A checkpoint made for another base model is refused before training.
    other = training.Checkpointer(str(tmp_path / "other"), every=1, keep=1,
                                  metadata={"kind": residual.CHECKPOINT_KIND, "fingerprint": "0123456789abcdef",
                                            "word": "dog", "preset": "official"})
    other.save(1, {"step": jnp.ones((), jnp.int32)})
    other.close()
    rc, errors, _ = _cli(capsys, base + ["--images", images, "--checkpoint-dir", str(tmp_path / "other"), "--resume"])
    assert rc == 2 and "fingerprint" in errors[0] and not os.path.exists(out)


def test_disk_full_and_interrupted_writes(tiny, full_run, tmp_path, capsys, monkeypatch):
    import errno

    from cones_jax import fileio

    root, images = tiny
    # A disk that fills up while the artifact is written: one line, non-zero exit, no file, no temporary.
    out = str(tmp_path / "full" / "dog.safetensors")
    os.makedirs(os.path.dirname(out))

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    argv = ["residual", "--model", root, "--images", images, "--word", "dog", "--out", out, "--resolution",
            str(RES), "--steps", "1", "--lr", str(LR), "--no-progress"]
    rc, errors, err = _cli(capsys, argv)
    assert rc != 0 and len(errors) == 1 and "No space left" in errors[0], err
    assert os.listdir(os.path.dirname(out)) == []
    monkeypatch.undo()

    # A run killed in the middle of writing its step-6 checkpoint leaves orbax's temporary folder:
    # resuming ignores it and continues from the last complete checkpoint (step 4).
    res, _, ckpt = full_run
    killed = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, killed)
    partial = os.path.join(killed, "6.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(os.path.join(killed, "4"), partial)
    for d, _, fs in os.walk(partial):
        for f in fs:
            with open(os.path.join(d, f), "wb") as fh:
                fh.write(b"\0" * 3)  # truncated garbage
    resumed, logs = _resume(root, images, killed, str(tmp_path / "dog.safetensors"))
    assert any("resumed from step 4" in s for s in logs), logs
    np.testing.assert_allclose(resumed.delta, res.delta, atol=1e-6, rtol=0)


def test_cli_import_official(tiny, tmp_path, capsys):
    import torch

    root, _ = tiny
    pt = str(tmp_path / "residual.pt")
    torch.save(torch.arange(32, dtype=torch.float32).reshape(1, 32), pt)
    out = str(tmp_path / "dog.safetensors")
    rc = train_cli.main(["residual", "--model", root, "--word", "dog", "--out", out, "--import-official", pt,
                         "--allow-pickle"])
    assert rc == 0, capsys.readouterr().err
    res = artifacts.load_residual(out, dim=32)
    assert res.preset == "imported" and res.word == "dog"
    np.testing.assert_array_equal(res.delta[0], np.arange(32))


@pytest.mark.slow
def test_train_step_benchmark_tiny():
    """benchmarks/train_step.py runs end to end on the tiny config (full-size configs are for a GPU)."""
    from benchmarks import train_step as bench

    result = bench.main(["--config", "tiny", "--resolution", "64", "--iters", "2", "--warmup", "1"])
    assert result["jax_median_s"] > 0 and result["torch_median_s"] > 0 and result["ratio_torch_over_jax"] > 0
