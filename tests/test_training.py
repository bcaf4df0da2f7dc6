"""The training loop on a tiny linear model: the history and checkpoints it gives without a host sync
per step equal stepping by hand, a non-finite loss names its step, and the throughput arithmetic
(FLOPs per device from XLA, peaks by device kind)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cones_jax import training

BATCH, DIN, DOUT = 2, 4, 3


def _loss(params, frozen, batch, rng):
    del frozen
    pred_BxO = batch["x"] @ params["w"] + 0.01 * jax.random.normal(rng, (BATCH, DOUT))
    err_B = jnp.mean(jnp.square(pred_BxO - batch["y"]), axis=1)
    loss = jnp.mean(batch["scale"] * err_B)
    return loss, {"err": jnp.mean(err_B)}


def _batches(nan_at=None):
    def batch(step):
        rng = np.random.default_rng(step)
        scale = np.full((BATCH,), np.nan if step == nan_at else 1.0, np.float32)
        return {"x": rng.normal(size=(BATCH, DIN)).astype(np.float32),
                "y": rng.normal(size=(BATCH, DOUT)).astype(np.float32), "scale": scale}
    return batch


def _step_and_state():
    opt = optax.adam(1e-2)
    step = training.make_train_step(_loss, opt, training.make_mesh(1), frozen={})
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(DIN, DOUT)), jnp.float32)}
    return step, step.put_state(training.init_state(params, opt, seed=0))


def test_history_and_checkpoints_equal_stepping_by_hand(tmp_path):
    steps, batches = 5, _batches()
    step, state = _step_and_state()
    ckpt = training.Checkpointer(str(tmp_path / "ckpt"), every=2, keep=5, metadata={"kind": "test"})
    logs = []
    state, history = training.run_loop(step, state, batches, total_steps=steps, checkpointer=ckpt,
                                       progress=False, log=logs.append)

    _, by_hand = _step_and_state()
    want, params_after = [], {}
    for k in range(steps):
        by_hand, metrics = step(by_hand, step.put_batch(batches(k)))
        # "params_finite" is checked by the loop, not kept in the history.
        want.append({k: float(v) for k, v in jax.device_get(metrics).items() if k != "params_finite"})
        params_after[k + 1] = np.asarray(by_hand["params"]["w"])
    assert history == want  # every step, the last one included, in order, as Python floats
    assert all(type(v) is float for m in history for v in m.values())
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), params_after[steps])
    assert sorted(ckpt.manager.all_steps()) == [2, 4, 5]
    for saved in (2, 4, 5):
        restored = ckpt.restore(jax.device_get(state), saved)
        np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), params_after[saved])
    ckpt.close()
    assert any(f"{steps} steps in" in s and "steps/s" in s and "TFLOP/s" in s for s in logs), logs
    _, state = _step_and_state()
    assert training.run_loop(step, state, batches, total_steps=steps, progress=False, log=logs.append)[1] == want


def test_metrics_are_read_after_the_next_step_is_queued(monkeypatch):
    step, state = _step_and_state()
    events = []
    batches = _batches()
    get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: events.append("read") or get(x))
    training.run_loop(step, state, lambda k: events.append(f"batch {k}") or batches(k), total_steps=4,
                      progress=False, log=lambda s: None)
    assert events == ["batch 0", "batch 1", "read", "batch 2", "read", "batch 3", "read", "read"]


@pytest.mark.parametrize("nan_at", [1, 4])  # one mid-run, one at the last step (read after the loop)
def test_a_non_finite_loss_names_its_step(nan_at):
    step, state = _step_and_state()
    # The NaN reaches the params too, so every later loss is NaN as well: the first one is named.
    with pytest.raises(FloatingPointError, match=rf"^loss became nan at step {nan_at}; lower the learning rate$"):
        training.run_loop(step, state, _batches(nan_at), total_steps=5, progress=False, log=lambda s: None)


def test_a_non_finite_state_is_not_checkpointed(tmp_path):
    step, state = _step_and_state()
    ckpt = training.Checkpointer(str(tmp_path / "ckpt"), every=1, keep=10, metadata={"kind": "test"})
    with pytest.raises(FloatingPointError, match="at step 2;"):
        training.run_loop(step, state, _batches(2), total_steps=5, checkpointer=ckpt, progress=False,
                          log=lambda s: None)
    ckpt.close()
    assert sorted(ckpt.manager.all_steps()) == [1, 2]  # the states after steps 0 and 1; not step 2's


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_stops_after_the_step_and_saves_it(tmp_path, sig, code):
    import os
    import signal

    step, state = _step_and_state()
    ckpt = training.Checkpointer(str(tmp_path / "ckpt"), every=10, keep=10, metadata={"kind": "test"})
    inner = _batches()

    def batches(k):  # the signal arrives while step 2's batch is being made
        if k == 2:
            os.kill(os.getpid(), getattr(signal, sig))
        return inner(k)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(training.TrainingStopped, match=r"after step 3 of 5; step 3 is saved in") as info:
        training.run_loop(step, state, batches, total_steps=5, checkpointer=ckpt, progress=False,
                          log=lambda s: None)
    ckpt.close()
    assert info.value.exit_code == code and sorted(ckpt.manager.all_steps()) == [3]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_step_flops_are_per_device_on_a_sharded_mesh():
    assert len(jax.devices()) == 8
    m, k, n = 64, 128, 256
    flops = {}
    for devices in (1, 8):
        mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
        matmul = jax.jit(lambda x, w: x @ w, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
        compiled = matmul.lower(jax.ShapeDtypeStruct((m, k), jnp.float32),
                                jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
        flops[devices] = training.step_flops(compiled)
    assert flops[1] == 2 * m * k * n and flops[8] == flops[1] / 8


class _Compiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def cost_analysis(self):
        return self.analysis


def test_step_flops_reads_every_form_of_cost_analysis():
    assert training.step_flops(_Compiled({"flops": 10.0, "bytes accessed": 3.0})) == 10.0
    assert training.step_flops(_Compiled([{"flops": 10.0}, {"flops": 5.0}])) == 15.0  # one dict per module
    for nothing in (None, {}, [{}], [], {"bytes accessed": 3.0}):
        assert training.step_flops(_Compiled(nothing)) is None


def test_peak_by_device_kind_dtype_and_precision():
    assert training.peak_tflops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989.0
    assert training.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert training.peak_tflops("NVIDIA H200", jnp.float16) == 989.0
    assert training.peak_tflops("NVIDIA A100-SXM4-80GB", jnp.float32, "highest") == 19.5
    assert training.peak_tflops("NVIDIA A100-SXM4-80GB", jnp.float32) == 156.0  # TF32: jax's default
    assert training.peak_tflops("NVIDIA H100 80GB HBM3", jnp.float32, "HIGHEST") == 67.0
    assert training.peak_tflops("TPU v4", jnp.bfloat16) == 275.0
    assert training.peak_tflops("TPU v5 lite", jnp.bfloat16) == 197.0
    assert training.peak_tflops("TPU v5", jnp.float32) == 459.0  # v5p; fp32 is one bf16 pass by default
    assert training.peak_tflops("TPU v6 lite", jnp.bfloat16) == 918.0
    for kind, dtype, precision in (("cpu", jnp.bfloat16, None), ("TPU v4 lite", jnp.bfloat16, None),
                                   ("TPU v5p", jnp.float32, "highest"), ("NVIDIA H100 PCIe", jnp.float32, "high"),
                                   ("NVIDIA H100 PCIe", jnp.int8, None)):
        assert training.peak_tflops(kind, dtype, precision) is None, (kind, dtype, precision)


def test_throughput_arithmetic():
    tflops, mfu = training.throughput(2e12, steps=10, seconds=4.0, peak=100.0)
    assert math.isclose(tflops, 5.0) and math.isclose(mfu, 0.05)
    assert training.throughput_fields(tflops, mfu) == {"TFLOP/s": "5", "MFU": "5.0%"}
    assert training.throughput(2e12, 10, 4.0, None)[1] is None  # unknown device: TFLOP/s, no MFU
    assert training.throughput_fields(*training.throughput(2e12, 10, 4.0, None)) == {"TFLOP/s": "5"}
    assert training.throughput(None, 10, 4.0, 100.0) == (None, None)
    assert training.throughput_fields(None, None) == {}


def test_matmul_dtype_is_that_of_most_parameters():
    tree = {"unet": jnp.zeros((64, 64), jnp.bfloat16), "ids": jnp.zeros((1000,), jnp.int32)}
    assert training.matmul_dtype(tree, {"text": jnp.zeros((8, 8), jnp.float32)}) == jnp.bfloat16
    assert training.matmul_dtype({}, {"w": jnp.zeros((2,), jnp.float32)}) == jnp.float32
