#!/usr/bin/env python
"""Cones concept-neuron search step (Alg. A2): ours (JAX, jitted) against the same step in PyTorch.

    python -m benchmarks.neurons_step --config sd15 --batch 2 --resolution 512 --iters 3   # paper setting
    python -m benchmarks.neurons_step --config tiny --resolution 64 --iters 3              # smoke test

Both frameworks run the same random diffusers UNet (seed 0, converted into our params) and the same
step: the to_k/to_v kernels of every cross-attention reparametrised as ξ⊙θ, L_con = L_sub + L_pr
(Eq. 4) over B subject and B class latents in one UNet call of 2B with two fixed prompt encodings
(the text encoder is frozen in Cones), and one plain gradient-descent step on ξ. Timed calls
alternate; the ratio is torch seconds / jax seconds (>1: ours is faster). Also prints the searched
weight count and the size of a .cones file at 0.1% sparsity.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import PREDICTION, TEXT_CONFIGS, torch_to_jax  # noqa: E402
from benchmarks.train_step import JaxRunner, _log, alternate, build_models, report, torch_noised  # noqa: E402
from cones_jax import neurons, training  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--config", default="tiny", choices=sorted(TEXT_CONFIGS))
    p.add_argument("--batch", type=int, default=2, help="subject images per step (as many class images)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rho", type=float, default=2e-5)
    p.add_argument("--json")
    args = p.parse_args(argv)

    import torch

    from cones_jax.models.vae import VAEConfig
    from cones_jax.schedulers import SchedulerConfig, alphas_cumprod

    torch.set_num_threads(os.cpu_count() or 1)
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    _log(f"building {args.config} UNet (seed 0) and converting it")
    unet_t, _ = build_models(args.config)
    unet_t, text_t = unet_t, _
    converted = torch_to_jax(unet_t, text_t)
    unet, unet_params = converted.unet, converted.params["unet"]
    ptype = PREDICTION[args.config]
    ac = alphas_cumprod(SchedulerConfig.from_dict(dict(beta_start=0.00085, beta_end=0.012,
                                                       beta_schedule="scaled_linear", prediction_type=ptype)))
    ac = ac.astype(np.float32)
    paths = neurons.search_paths(unet_params, neurons.CROSS_ATTENTION_KV)
    shapes = neurons.unet_shapes(unet_params)
    searched = int(sum(np.prod(shapes[p]) for p in paths))
    b, lat = args.batch, args.resolution // 8
    rng = np.random.default_rng(0)
    d = unet.config.cross_attention_dim
    ctx = rng.standard_normal((2, 77, d), dtype=np.float32)
    batch = {k: rng.standard_normal((b, lat, lat, 4), dtype=np.float32) for k in ("mean", "prior_mean")}
    batch.update(std=np.full((b, lat, lat, 4), 0.05, np.float32), prior_std=np.full((b, lat, lat, 4), 0.05, np.float32))

    # ---- ours
    spec = neurons.LossSpec(unet=unet, vae_config=VAEConfig(), alphas_cumprod_T=ac, prediction_type=ptype)
    frozen = {"unet": unet_params, "ctx_subject": jnp.asarray(ctx[0]), "ctx_prior": jnp.asarray(ctx[1])}
    opt = neurons.make_optimizer(args.rho)
    step = training.make_train_step(neurons.make_loss_fn(spec), opt, training.make_mesh(b), frozen)
    state = step.put_state(training.init_state({"xi_offset": neurons.initial_offsets(unet_params, paths)}, opt, seed=0))
    jax_run = JaxRunner(step, state, batch)
    _log(f"jax step compiled in {step.compile_seconds:.1f} s; {len(paths)} tensors, {searched} searched weights")

    # ---- PyTorch: ξ⊙θ through torch.func.functional_call, SGD on ξ only
    unet_t = unet_t.to(tdev).eval().requires_grad_(False)
    names = [n for n, _ in unet_t.named_parameters() if "attn2.to_k.weight" in n or "attn2.to_v.weight" in n]
    assert len(names) == len(paths), (len(names), len(paths))
    theta = dict(unet_t.named_parameters())
    xi = {n: torch.ones_like(theta[n], requires_grad=True) for n in names}
    sgd = torch.optim.SGD(list(xi.values()), lr=args.rho)
    ac_t = torch.from_numpy(ac).to(tdev)
    mean_np = np.concatenate([batch["mean"], batch["prior_mean"]]).transpose(0, 3, 1, 2).copy()
    mean_t = torch.from_numpy(mean_np).to(tdev)
    std_t = torch.full_like(mean_t, 0.05)
    ctx_t = torch.from_numpy(np.repeat(ctx, b, axis=0)).to(tdev)

    def torch_run():
        noisy, t, target = torch_noised(mean_t, std_t, ac_t, ptype)
        scaled = {n: xi[n] * theta[n] for n in names}
        pred = torch.func.functional_call(unet_t, scaled, (noisy, t), {"encoder_hidden_states": ctx_t}).sample
        err = (pred - target).square().flatten(1).mean(1)
        loss = err[:b].mean() + err[b:].mean()
        loss.backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        return float(loss.detach())

    jt, tt = alternate(jax_run, torch_run, args.warmup, args.iters)

    # artifact size at 0.1% sparsity from this run's scores
    scores = neurons.neuron_scores(jax.device_get(jax_run.state["params"]["xi_offset"]), args.rho)
    idx = neurons.select_neurons(scores, neurons.tau_for_sparsity(scores, 1e-3))
    cn = neurons.ConceptNeurons(idx, {p: shapes[p] for p in paths}, ("sks",), ("dog",), "bench")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.cones")
        neurons.save_neurons(path, cn)
        size = os.path.getsize(path)
    result = dict(config=args.config, batch=b, resolution=args.resolution,
                  device=f"{jax.devices()[0].platform}/{jax.devices()[0].device_kind}", torch_device=tdev,
                  jax_compile_s=round(step.compile_seconds, 2), jax_median_s=statistics.median(jt),
                  torch_median_s=statistics.median(tt), iters=args.iters, searched_weights=searched,
                  neurons_at_0_1pct=cn.count, artifact_bytes=size)
    print(f"searched {searched} weights; 0.1% = {cn.count} neurons in {size / 1024:.1f} KiB")
    return report(result, f"{args.config}, batch {b}+{b}, {args.resolution} px, {result['device']}", args.json)


if __name__ == "__main__":
    main()
