"""The many-subject step (cones_jax.subjects) on 8 CPU devices: each subject's update is exactly the
update of its own single-subject run, whatever the mesh, and the stacked state checkpoints and
resumes like a single one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cones_jax import subjects, training

STEPS, BATCH, WIDTH = 4, 2, 128


def loss_fn(params, frozen, batch, rng):
    noise = jax.random.normal(rng, batch["x"].shape)  # the step's randomness: per subject, per step
    pred = (batch["x"] + 0.1 * noise) @ params["w"] * frozen["scale"] + frozen["b"][None]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"part": 2 * loss}


def subject_data(n):
    rng = np.random.default_rng(0)
    return [{"b": np.full((WIDTH,), i, np.float32),
             "x": rng.normal(size=(STEPS, BATCH, WIDTH)).astype(np.float32),
             "y": rng.normal(size=(STEPS, BATCH, WIDTH)).astype(np.float32)} for i in range(n)]


def single_runs(data, optimizer, w0, seeds):
    out = []
    for d, seed in zip(data, seeds):
        mesh = training.make_mesh(BATCH)
        step = training.make_train_step(loss_fn, optimizer, mesh, {"scale": jnp.float32(2.0), "b": jnp.asarray(d["b"])})
        state = step.put_state(training.init_state(jax.tree.map(jnp.array, w0), optimizer, seed))
        for k in range(STEPS):
            state, _ = step(state, step.put_batch({"x": d["x"][k], "y": d["y"][k]}))
        out.append(np.asarray(state["params"]["w"]))
    return out


def many_step(data, optimizer, model):
    n = len(data)
    mesh = subjects.make_subject_mesh(n, BATCH, model=model)
    per = subjects.stack_subjects([{"b": d["b"]} for d in data], mesh)
    return subjects.SubjectsStep(loss_fn, optimizer, mesh, {"scale": jnp.float32(2.0)}, per, n)


def fetcher(data, k):
    return lambda i: {"x": data[i]["x"][k], "y": data[i]["y"][k]}


@pytest.mark.parametrize("n,model", [(3, 1), (3, 2), (1, 1), (9, 1)])
def test_multi_subject_step_equals_single_runs(n, model, tmp_path):
    optimizer = optax.adamw(1e-2)
    w0 = {"w": np.ones((WIDTH, WIDTH), np.float32)}
    data, seeds = subject_data(n), list(range(10, 10 + n))
    step = many_step(data, optimizer, model)
    assert step.mesh.devices.size == jax.device_count()  # one mesh over every device, whatever N
    assert step.local_subjects == list(range(n))         # one process holds them all
    state = step.init_states(w0, optimizer, seeds)
    state, history = training.run_loop(step, state, lambda k: fetcher(data, k), total_steps=STEPS, progress=False,
                                       log=lambda s: None)
    assert len(history) == STEPS and np.isfinite(history[-1]["loss"])
    got = step.gather(state["params"]["w"])
    want = single_runs(data, optimizer, w0, seeds)
    assert got.shape == (n, WIDTH, WIDTH)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_multi_subject_state_checkpoints_and_resumes(tmp_path):
    optimizer = optax.adamw(1e-2)
    w0 = {"w": np.ones((WIDTH, WIDTH), np.float32)}
    data = subject_data(3)
    step = many_step(data, optimizer, 2)
    ckpt = training.Checkpointer(str(tmp_path / "ck"), every=2, keep=2, metadata={"kind": "test"})
    state = step.init_states(w0, optimizer, [0, 1, 2])
    state, _ = training.run_loop(step, state, lambda k: fetcher(data, k), total_steps=2, checkpointer=ckpt,
                                 progress=False, log=lambda s: None)
    ckpt.close()
    # a new run: a fresh state laid out on the mesh, restored from step 2, then to the end
    ckpt = training.Checkpointer(str(tmp_path / "ck"), every=2, keep=2, metadata={"kind": "test"})
    fresh = step.init_states(w0, optimizer, [0, 1, 2])
    resumed = ckpt.resume_state(fresh, log=lambda s: None)
    assert int(resumed["step"]) == 2
    assert resumed["params"]["w"].sharding == fresh["params"]["w"].sharding
    resumed, _ = training.run_loop(step, resumed, lambda k: fetcher(data, k), total_steps=STEPS,
                                   progress=False, log=lambda s: None)
    ckpt.close()
    want = single_runs(data, optimizer, w0, [0, 1, 2])
    np.testing.assert_allclose(step.gather(resumed["params"]["w"]), np.stack(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,batch,devices,model,want", [
    (3, 1, 8, 1, (8, 1, 1)),     # batch 1: every device trains subjects
    (3, 2, 8, 1, (4, 2, 1)),     # one subject per device either way: the data split halves its rows
    (16, 2, 8, 1, (8, 1, 1)),    # many subjects: no data split, no gradient all-reduce
    (3, 4, 8, 2, (1, 4, 2)),    # 3 subjects × 1 row per device beats 2 × 2
    (1, 8, 8, 1, (1, 8, 1)),     # one subject, batch 8: plain data parallelism
])
def test_mesh_shape(n, batch, devices, model, want):
    assert subjects.mesh_shape(n, batch, devices, model) == want


def test_padding_is_spread_over_the_devices():
    assert subjects.slot_of(2, 8) == [0, 4]  # two hosts of four devices: one subject each
    assert subjects.slot_of(3, 4) == [0, 1, 2]
    assert sorted(set(subjects.slot_of(9, 16))) == subjects.slot_of(9, 16)


def test_multi_subject_a_diverging_subject_stops_alone():
    """Subject 1's data turns non-finite at step 2: it stops at its last finite state and is flagged;
    the others train on exactly as their own runs do."""
    optimizer = optax.adamw(1e-2)
    w0 = {"w": np.ones((WIDTH, WIDTH), np.float32)}
    data = subject_data(3)
    data[1]["x"][2] = np.inf
    step = many_step(data, optimizer, 1)
    state = step.init_states(w0, optimizer, [0, 1, 2])
    state, history = training.run_loop(step, state, lambda k: fetcher(data, k), total_steps=STEPS, progress=False,
                                       log=lambda s: None)
    assert step.stopped(state) == [1]
    assert [h["subjects_alive"] for h in history] == [3, 3, 2, 2]
    assert all(np.isfinite(h["loss"]) for h in history)
    got = step.gather(state["params"]["w"])
    want = single_runs([data[0], data[2]], optimizer, w0, [0, 2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], want[1], rtol=1e-5, atol=1e-6)
    # subject 1 holds its state after step 2 (two finite steps), as its own run had before it diverged
    two = {**data[1], "x": data[1]["x"][:2], "y": data[1]["y"][:2]}
    mesh = training.make_mesh(BATCH)
    one = training.make_train_step(loss_fn, optimizer, mesh, {"scale": jnp.float32(2.0), "b": jnp.asarray(two["b"])})
    s1 = one.put_state(training.init_state(jax.tree.map(jnp.array, w0), optimizer, 1))
    for k in range(2):
        s1, _ = one(s1, one.put_batch({"x": two["x"][k], "y": two["y"][k]}))
    np.testing.assert_allclose(got[1], np.asarray(s1["params"]["w"]), rtol=1e-5, atol=1e-6)


def test_multi_subject_every_subject_diverging_stops_the_run():
    optimizer = optax.adamw(1e-2)
    data = subject_data(2)
    for d in data:
        d["x"][1] = np.nan
    step = many_step(data, optimizer, 1)
    state = step.init_states({"w": np.ones((WIDTH, WIDTH), np.float32)}, optimizer, [0, 1])
    with pytest.raises(training.DivergedError, match="step 1"):
        training.run_loop(step, state, lambda k: fetcher(data, k), total_steps=STEPS, progress=False,
                          log=lambda s: None)
