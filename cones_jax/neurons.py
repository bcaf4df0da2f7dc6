"""Cones (concept neurons, ICML 2023): find the few UNet weights whose shutting renders a subject.

    from cones_jax.neurons import train_neurons
    cn = train_neurons("/models/sd15", "photos/my_dog", "dog", "dog.cones", overrides={"steps": 1000},
                       sparsity=1e-3)

Algorithm A2 of the paper: every searched kernel θ (by default the `to_k`/`to_v` kernels of each
cross-attention) is reparametrised as ξ⊙θ with ξ = 1; K steps of plain gradient descent on ξ with
learning rate ρ minimise the concept-implanting loss L_con = L_sub + λ·L_pr (Eq. 4); the scores
M_p = (1 − ξ)/ρ then approximate the sum over the K steps of θ·∂L/∂θ, and the concept neurons are
the weights with M_p > τ (Theorem 3.1: shutting θ lowers the loss, to first order, iff θ·∂L/∂θ > 0).
The subject is rendered by the model with those weights set to zero.

`train_neurons_many` searches many subjects in one run: the model loads once and one jitted step
(`cones_jax.subjects.SubjectsStep`) trains every subject's ξ side by side over a (subject, data,
model) mesh, each subject's result the one its own `train_neurons` run gives.

Only ξ is optimised: it is its own small pytree, and the UNet is a frozen argument of the jitted
step. `restrict_updates` (an optax transformation with an elementwise mask, `search(allowed=...)`)
confines a search to a subset of the weights: `finetune_union` (Sec. 3.3) re-runs it with the
summed loss of several subjects over the union of their neurons and keeps the union's best.

Found neurons are saved as a `.cones` file (`cones_jax.artifacts`: the format, `save_neurons`,
`load_neurons`; re-exported here). Several files apply together: the union of their index sets is
shut (the product of their masks).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from cones_jax import training
from cones_jax.artifacts import (  # noqa: F401
    NEURONS_FORMAT,
    SCORES_SUFFIX,
    ConceptNeurons,
    NeuronScores,
    check_indices,
    decode_indices,
    encode_indices,
    load_neuron_scores,
    load_neurons,
    save_neuron_scores,
    save_neurons,
    scores_path,
)
from cones_jax.config import load_config
from cones_jax.convert import flatten, unflatten
from cones_jax.errors import CheckpointError, DivergedError, NeuronsError
from cones_jax.models.vae import scale_latents
from cones_jax.schedulers import alphas_cumprod

if TYPE_CHECKING:
    from cones_jax.pipeline import StableDiffusion

CHECKPOINT_KIND = "cones1_neurons"
CROSS_ATTENTION_KV = (r"attn2/to_k/kernel$", r"attn2/to_v/kernel$")
SELF_ATTENTION_KV = (r"attn1/to_k/kernel$", r"attn1/to_v/kernel$")


# --------------------------------------------------------------------------------------------
# The searched tensors and the reparametrisation
# --------------------------------------------------------------------------------------------


def search_paths(unet_params: Mapping, patterns: Sequence[str]) -> list[str]:
    """"/"-joined paths of the UNet kernels matching any of the regex `patterns`, sorted."""
    names = ["/".join(p) for p in flatten(unet_params)]
    try:
        regs = [re.compile(p) for p in patterns]
    except re.error as e:
        raise NeuronsError(f"bad search pattern: {e}") from None
    paths = sorted(n for n in names if any(r.search(n) for r in regs))
    if not paths:
        raise NeuronsError(f"no UNet parameter matches the search patterns {list(patterns)}; "
                           "patterns are regexes over paths like down_blocks_0/attentions_0/"
                           "transformer_blocks_0/attn2/to_k/kernel")
    return paths


def scale_params(unet_params: Mapping, xi: dict[str, jax.Array]) -> dict:
    """Cones, Alg. A2: the searched kernels θ replaced by ξ⊙θ (the other parameters untouched)."""
    flat = flatten(unet_params)
    for path, x in xi.items():
        key = tuple(path.split("/"))
        flat[key] = (x * flat[key].astype(jnp.float32)).astype(flat[key].dtype)
    return unflatten(flat)


def initial_offsets(unet_params: Mapping, paths: Sequence[str]) -> dict[str, jax.Array]:
    """ξ − 1 per searched kernel, all zero at the start.

    ξ is stored as its offset from 1: with float32 ξ itself, updates of ρ·θ·∂L/∂θ (about 1e-8 at the
    paper's ρ = 2e-5) would be below the spacing of floats near 1 (6e-8) and vanish. Gradient descent
    on the offset is the same descent on ξ.
    """
    flat = flatten(unet_params)
    return {p: jnp.zeros(flat[tuple(p.split("/"))].shape, jnp.float32) for p in paths}


def xi_of(offsets: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: 1.0 + v for k, v in offsets.items()}


def restrict_updates(allowed: dict[str, Any] | None) -> optax.GradientTransformation:
    """Zeroes the updates of ξ outside `allowed` ({path: elementwise 0/1 mask}); None allows all.
    Acts on the search's params tree, {"xi_offset": {path: ξ − 1}}."""

    def init(params: Any):
        del params
        return optax.EmptyState()

    def update(updates: dict, state: optax.EmptyState, params: Any = None):
        del params
        if allowed is None:
            return updates, state
        return {"xi_offset": {k: u * allowed[k] for k, u in updates["xi_offset"].items()}}, state

    return optax.GradientTransformation(init, update)


def make_optimizer(rho: float, allowed: dict[str, Any] | None = None) -> optax.GradientTransformation:
    """Plain gradient descent on ξ with learning rate ρ (Alg. A2), optionally restricted elementwise."""
    if not rho > 0:
        raise NeuronsError(f"rho must be positive, got {rho}")
    return optax.chain(restrict_updates(allowed), optax.sgd(rho))


# --------------------------------------------------------------------------------------------
# Loss (Eq. 4)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    unet: Any
    vae_config: Any
    alphas_cumprod_T: np.ndarray
    prediction_type: str
    prior_weight: float = 1.0  # λ


def concept_errors(spec: LossSpec, xi_offset: dict, unet_params: Mapping, ctx_NxLxD: jax.Array, mean: jax.Array,
                   std: jax.Array, rng: jax.Array) -> jax.Array:
    """Per-example denoising errors of latents drawn from N(mean, std²), under the kernels ξ⊙θ."""
    ac_T = jnp.asarray(spec.alphas_cumprod_T, jnp.float32)
    k_lat, k_noise, k_t = jax.random.split(rng, 3)
    latents = scale_latents(spec.vae_config, mean + std * jax.random.normal(k_lat, mean.shape))
    noise = jax.random.normal(k_noise, latents.shape)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, ac_T.shape[0])
    return training.denoising_errors(spec.unet, scale_params(unet_params, xi_of(xi_offset)), ctx_NxLxD, latents,
                                     noise, t, ac_T, spec.prediction_type)


def concept_loss(spec: LossSpec, params: dict, frozen: dict, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
    """Cones, Eq. 4: L_con = L_sub + λ·L_pr.

    L_sub: denoising loss of the subject latents with the identifier prompt ("photo of a V* dog");
    L_pr: the same on class images with the class prompt ("photo of a dog"). Both halves go through
    one UNet call. params = {"xi_offset": {path: ξ − 1}}; frozen = {"unet", "ctx_subject" [L, D], "ctx_prior"}.
    """
    mean = jnp.concatenate([batch["mean"], batch["prior_mean"]])
    std = jnp.concatenate([batch["std"], batch["prior_std"]])
    b = batch["mean"].shape[0]
    ctx = jnp.concatenate([jnp.broadcast_to(frozen["ctx_subject"], (b,) + frozen["ctx_subject"].shape),
                           jnp.broadcast_to(frozen["ctx_prior"], (mean.shape[0] - b,) + frozen["ctx_prior"].shape)])
    err = concept_errors(spec, params["xi_offset"], frozen["unet"], ctx, mean, std, rng)
    l_sub, l_pr = jnp.mean(err[:b]), jnp.mean(err[b:])
    return l_sub + spec.prior_weight * l_pr, {"loss_sub": l_sub, "loss_prior": l_pr}


def joint_concept_loss(spec: LossSpec, params: dict, frozen: dict, batch: dict,
                       rng: jax.Array) -> tuple[jax.Array, dict]:
    """Cones, Sec. 3.3: the multi-concept-implanting loss, Σ_s L_con^s (Eq. 4 per subject s).

    Every subject's and class's latents go through one UNet call. batch arrays are [B, S, ...] (the
    batch axis first, so it shards as any batch); frozen = {"unet", "ctx_subject" [S, L, D], "ctx_prior"}.
    With S = 1 this is `concept_loss`, draw for draw.
    """
    b, n_subj = batch["mean"].shape[:2]

    def subject_major(x: jax.Array):  # [B, S, ...] -> [S*B, ...]
        return jnp.swapaxes(x, 0, 1).reshape((n_subj * b,) + x.shape[2:])

    mean = jnp.concatenate([subject_major(batch["mean"]), subject_major(batch["prior_mean"])])
    std = jnp.concatenate([subject_major(batch["std"]), subject_major(batch["prior_std"])])
    ctx = jnp.concatenate([jnp.repeat(frozen["ctx_subject"], b, axis=0), jnp.repeat(frozen["ctx_prior"], b, axis=0)])
    err = concept_errors(spec, params["xi_offset"], frozen["unet"], ctx, mean, std, rng)
    l_sub = jnp.mean(err[:n_subj * b].reshape(n_subj, b), axis=1)
    l_pr = jnp.mean(err[n_subj * b:].reshape(n_subj, b), axis=1)
    return jnp.sum(l_sub + spec.prior_weight * l_pr), {"loss_sub": jnp.mean(l_sub), "loss_prior": jnp.mean(l_pr)}


def make_loss_fn(spec: LossSpec) -> training.LossFn:
    return lambda params, frozen, batch, rng: concept_loss(spec, params, frozen, batch, rng)


# --------------------------------------------------------------------------------------------
# Scores, τ and masks
# --------------------------------------------------------------------------------------------


def neuron_scores(xi_offset: dict[str, Any], rho: float) -> dict[str, np.ndarray]:
    """Cones, Alg. A2: M_p = (1 − ξ)/ρ, which approximates Σ_k θ^k·∂L/∂θ(θ^k) (Eq. 9). Takes ξ − 1."""
    return {k: -np.asarray(v, np.float32) / rho for k, v in xi_offset.items()}


def tau_for_sparsity(scores: dict[str, np.ndarray], sparsity: float) -> float:
    """The τ that shuts the top `sparsity` fraction of all searched weights (by score)."""
    if not 0.0 < sparsity < 1.0:
        raise NeuronsError(f"`sparsity` must be in (0, 1), got {sparsity}")
    allv = np.concatenate([v.ravel() for v in scores.values()])
    k = max(1, int(round(sparsity * allv.size)))
    # τ just below the k-th largest score: exactly k neurons pass `> τ` (barring ties)
    kth = np.partition(allv, allv.size - k)[allv.size - k]
    below = allv[allv < kth]
    if not below.size:
        raise NeuronsError("every searched weight has the same score: the search did not move ξ; "
                           "run more --steps or raise --rho")
    return float((kth + below.max()) / 2)


def select_neurons(scores: dict[str, np.ndarray], tau: float) -> dict[str, np.ndarray]:
    """Flat indices (sorted int64) of the concept neurons, M_p > τ, per searched tensor."""
    out = {k: np.flatnonzero(v.ravel() > tau).astype(np.int64) for k, v in scores.items()}
    n = sum(len(v) for v in out.values())
    total = sum(v.size for v in scores.values())
    if n == 0:
        top = max(float(v.max()) for v in scores.values())
        raise NeuronsError(f"tau {tau:g} selects no neuron (the largest score is {top:g}); lower --tau or use "
                           "--sparsity")
    if n == total:
        raise NeuronsError(f"tau {tau:g} selects every searched weight ({total}); raise --tau or use --sparsity")
    return out


def cut(ns: NeuronScores, tau: float | None, sparsity: float | None, out: str) -> ConceptNeurons:
    """The concept neurons of the scores `ns`: M_p > τ, with τ from `sparsity` when no `tau` is given."""
    if tau is None:
        tau = tau_for_sparsity(ns.scores, sparsity)
    indices = select_neurons(ns.scores, tau)
    return ConceptNeurons(indices, {k: tuple(v.shape) for k, v in ns.scores.items()}, ns.identifiers, ns.classes,
                          ns.unet, {"tau": f"{tau:.6g}", **ns.meta}, out)


def write_neurons(ns: NeuronScores, cn: ConceptNeurons, *, overwrite: bool, keep_scores: bool,
                  log: Callable[[str], None]) -> ConceptNeurons:
    """Writes `cn`, cut from `ns`, to `cn.path` (and, with `keep_scores`, the scores beside it for
    `neurons-cut`)."""
    out = cn.path
    _check_out(out, overwrite)
    if keep_scores:
        save_neuron_scores(scores_path(out), ns)
    save_neurons(out, cn)
    log(f"wrote {out}: {cn.count} concept neurons of {cn.searched} searched weights "
        f"({100 * cn.count / cn.searched:.3f}%), {os.path.getsize(out) / 1024:.1f} KiB"
        + (f"; scores in {scores_path(out)}" if keep_scores else ""))
    return cn


def cut_scores(scores_files: Sequence[str], *, out: str | None = None, out_dir: str | None = None,
               tau: float | None = None, sparsity: float | None = None, overwrite: bool = False,
               log: Callable[[str], None] | None = None) -> list[ConceptNeurons]:
    """`train.py neurons-cut`: `.cones` files from kept scores at another τ or sparsity, with no search.

    One scores file to `out`, or any number to `out_dir/<name>.cones` (the name the search gave
    them). Every file is read and checked before any is written."""
    log = log or (lambda s: print(s, file=sys.stderr))
    if (tau is None) == (sparsity is None):
        raise NeuronsError("give --tau or --sparsity (how many of the scored weights to shut)")
    selection(tau, sparsity, {}, name="--sparsity")
    if (out is None) == (out_dir is None):
        raise NeuronsError("give --out FILE.cones (one scores file) or --out-dir DIR (any number)")
    if out is not None and len(scores_files) != 1:
        raise NeuronsError(f"--out takes one scores file, got {len(scores_files)}; use --out-dir for several")
    if out_dir is not None and os.path.isfile(out_dir):
        raise NeuronsError(f"--out-dir {out_dir} is a file; give a folder")
    loaded = [load_neuron_scores(f) for f in scores_files]
    names = [os.path.basename(f)[:-len(SCORES_SUFFIX)] if f.endswith(SCORES_SUFFIX)
             else os.path.splitext(os.path.basename(f))[0] for f in scores_files]
    outs = [out] if out is not None else [os.path.join(out_dir, n + ".cones") for n in names]
    if len(set(outs)) != len(outs):
        raise NeuronsError("two scores files have the same name; cut them into separate --out-dir folders")
    sets = [cut(ns, tau, sparsity, o) for ns, o in zip(loaded, outs)]  # all checked before writing
    for o in outs:
        _check_out(o, overwrite)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    for ns, cn in zip(loaded, sets):
        write_neurons(ns, cn, overwrite=overwrite, keep_scores=False, log=log)
    return sets


# --------------------------------------------------------------------------------------------
# Sets of neurons applied to a UNet
# --------------------------------------------------------------------------------------------


def union(sets: Sequence[ConceptNeurons]) -> dict[str, np.ndarray]:
    """Cones Sec. 3.2: the concept neurons of several subjects together (sorted unique indices)."""
    out: dict[str, list] = {}
    for cn in sets:
        for k, v in cn.indices.items():
            out.setdefault(k, []).append(np.asarray(v, np.int64))
    return {k: np.unique(np.concatenate(v)) for k, v in out.items()}


def masks(indices: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """M per tensor: 0 at the concept neurons, 1 elsewhere."""
    out = {}
    for k, idx in indices.items():
        m = np.ones(int(np.prod(shapes[k])), np.float32)
        m[idx] = 0.0
        out[k] = m.reshape(shapes[k])
    return out


def only_at(indices: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The complement of `masks`: 1 at the indices, 0 elsewhere, for every tensor of `shapes` (e.g.
    where a joint fine-tune may move ξ: the union of several subjects' neurons)."""
    return {k: 1.0 - m for k, m in masks({k: indices.get(k, np.zeros(0, np.int64)) for k in shapes},
                                         shapes).items()}


def unet_shapes(unet_params: Mapping) -> dict[str, tuple[int, ...]]:
    return {"/".join(k): tuple(v.shape) for k, v in flatten(unet_params).items()}


def apply_neurons(unet_params: Mapping, sets: Sequence[ConceptNeurons]) -> Mapping:
    """M⊙θ with M the product of the sets' masks (their union shut), computed once outside the sampler."""
    if not sets:
        return unet_params
    shapes = unet_shapes(unet_params)
    shut = union(sets)
    mask = masks(shut, {k: shapes[k] for k in shut})
    return scale_params(unet_params, {k: jnp.asarray(m) for k, m in mask.items()})


def load_for_model(paths: Sequence[str], unet_params: Mapping, *,
                   fingerprint: str | None = None) -> list[ConceptNeurons]:
    """The `.cones` files at `paths`, checked against the UNet of `unet_params` and `fingerprint`: the
    loaded model's own (`StableDiffusion.unet_fingerprint`, the same in any dtype). Without it the
    fingerprint of `unet_params` as they are is used, which is the model's own only for fp32 params
    of fp32 weights."""
    from cones_jax.pipeline import fingerprint_params

    fp = fingerprint if fingerprint is not None else fingerprint_params(unet_params)
    shapes = unet_shapes(unet_params)
    return [load_neurons(p, unet_fingerprint=fp, unet_shapes=shapes) for p in paths]


def params_with_neurons(sd: StableDiffusion, paths: Sequence[str]) -> tuple[dict, int]:
    """`sd.params` with the union of the concept neurons of the `.cones` files at `paths` shut in the
    UNet (M⊙θ, once, outside the sampler; checked against `sd`'s UNet), and how many that shuts."""
    sets = load_for_model(list(paths), sd.params["unet"], fingerprint=sd.unet_fingerprint)
    return dict(sd.params, unet=apply_neurons(sd.params["unet"], sets)), sum(len(v) for v in union(sets).values())


# --------------------------------------------------------------------------------------------
# Setup and search
# --------------------------------------------------------------------------------------------


def load_train_config(config: str | None = None, overrides: dict | None = None) -> dict:
    return load_config(config or "cones1_train", {k: v for k, v in (overrides or {}).items() if v is not None})


def default_train_config(model_dir: str, config: str | None,
                         overrides: Mapping[str, Any]) -> tuple[dict, str | None]:
    """`config`, else the model's own (`training.model_training_config`: the demo model's
    cones1_train_demo), else cones1_train; its numbers checked. With no `config`, also a line
    saying which."""
    chosen = None
    if config is None:
        config, _, why = training.model_training_config(model_dir, "neurons")
        if config is None:
            config, why = "cones1_train", "the default (at the model's native resolution)"
        chosen = f"config: {config}, from {why} (--config chooses another)"
    cfg = load_train_config(config, overrides)
    training.check_numbers(cfg, lr_key="rho")
    return cfg, chosen


class Subject(NamedTuple):
    """One subject of a search: its photos, class word and identifier."""

    images: str
    class_word: str
    identifier: str


@dataclasses.dataclass
class NeuronSetup:
    cfg: dict
    spec: LossSpec
    paths: list[str]
    frozen: dict
    subject: training.LatentCache
    prior: training.LatentCache
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]

    def initial_params(self) -> dict:
        return {"xi_offset": initial_offsets(self.frozen["unet"], self.paths)}

    def host_batch(self, step: int) -> dict:
        return search_batch(self.cfg, self.subject, self.prior, step)

    def loss_fn(self) -> training.LossFn:
        return make_loss_fn(self.spec)


def search_batch(cfg: Mapping[str, Any], subject: training.LatentCache, prior: training.LatentCache,
                 step: int) -> dict:
    """The host batch of a search's `step`: cfg["batch"] subject and as many class latents, a pure
    function of (step, cfg["seed"])."""
    b, seed = cfg["batch"], cfg["seed"]
    sub = subject.batch(training.batch_indices(step, b, len(subject), seed), training.data_rng(step, seed))
    pri = prior.batch(training.batch_indices(step, b, len(prior), seed + 1), training.data_rng(step, seed + 1))
    return {"mean": sub["mean"], "std": sub["std"], "prior_mean": pri["mean"], "prior_std": pri["std"]}


def class_images(sd: StableDiffusion, folder: str, class_word: str, cfg: dict, *, log: Callable[[str], None]) -> None:
    """Fills `folder` up to cfg["num_class_images"] images of the class prompt, made by the base model
    with our sampler (kept for later runs)."""
    from PIL import Image

    from cones_jax.fileio import atomic_output
    from cones_jax.sampler import sample_prompts

    os.makedirs(folder, exist_ok=True)
    have = len(training.list_images(folder)) if os.listdir(folder) else 0
    need = cfg["num_class_images"] - have
    if need <= 0:
        return
    prompt = cfg["class_prompt"].format(cls=class_word)
    log(f"generating {need} class image(s) of {prompt!r} into {folder}")
    seeds = list(range(10_000 + have, 10_000 + have + need))
    images = sample_prompts(sd, [prompt] * need, seeds, steps=cfg["class_steps"], cfg_scale=cfg["class_cfg"])
    for s, img in zip(seeds, images):
        with atomic_output(os.path.join(folder, f"class_{s:06d}.png")) as f:
            Image.fromarray(img).save(f, format="PNG")


def default_class_dir(unet_fingerprint: str, cfg: dict, class_word: str) -> str:
    """Where generated class images are kept when no folder is given: a per-user cache
    ($CONES_JAX_CACHE, else $XDG_CACHE_HOME/cones_jax or ~/.cache/cones_jax) keyed by the base UNet's
    fingerprint and the prompt and sampler settings that made them, so that subjects of one class
    share them and a folder of photos (or a repository) never gets images written beside it."""
    from cones_jax.fileio import user_cache_dir

    root = user_cache_dir()
    prompt = re.sub(r"[^A-Za-z0-9]+", "_", cfg["class_prompt"].format(cls=class_word)).strip("_")
    return os.path.join(root, "class_images", unet_fingerprint,
                        f"{prompt}_steps{cfg['class_steps']}_cfg{cfg['class_cfg']:g}")


def check_prompts(tok: Any, cfg: Mapping[str, Any], class_word: str, identifier: str) -> tuple[str, str]:
    """The instance and class prompts of a subject, checked: both words tokenise, and the identifier
    survives the token limit. Needs only the tokenizer, so it runs before the model loads."""
    for word, what in ((class_word, "--class"), (identifier, "--identifier")):
        tok.word_ids(word.strip())  # raises on a word that tokenises to nothing
        if not word.strip():
            raise NeuronsError(f"{what} is empty")
    instance = cfg["instance_prompt"].format(identifier=identifier.strip(), cls=class_word.strip())
    prior_prompt = cfg["class_prompt"].format(cls=class_word.strip())
    ids = tok.encode([instance, prior_prompt])
    if not tok.find_word(ids[0], identifier.strip()):
        raise NeuronsError(f"instance prompt {instance!r} loses the identifier to the token limit")
    return instance, prior_prompt


def prompt_contexts(sd: StableDiffusion, cfg: Mapping[str, Any], class_word: str,
                    identifier: str) -> tuple[np.ndarray, np.ndarray]:
    """The text encodings [L, D] of the instance prompt ("photo of a sks dog") and the class prompt."""
    from cones_jax.residual import encode_prompts

    instance, prior_prompt = check_prompts(sd.tokenizer, cfg, class_word, identifier)
    ctx = encode_prompts(sd.text_encoder, sd.params["text_encoder"], sd.tokenizer.encode([instance, prior_prompt]))
    return ctx[0], ctx[1]


def encode_folder(sd: StableDiffusion, cfg: Mapping[str, Any], folder: str) -> training.LatentCache:
    """The latent Gaussians of the images of `folder`, at the search's resolution and crop."""
    factor = sd.latent_factor
    res = cfg["resolution"] or sd.unet.config.sample_size * factor
    images = training.load_images(folder, res, crop=cfg["crop"], multiple=factor)
    return training.encode_images(sd.vae, sd.params["vae"], images, (res // factor,) * 2)


def loss_spec(sd: StableDiffusion, cfg: Mapping[str, Any]) -> LossSpec:
    return LossSpec(unet=sd.unet, vae_config=sd.vae.config,
                    alphas_cumprod_T=alphas_cumprod(sd.scheduler).astype(np.float32),
                    prediction_type=sd.scheduler.prediction_type, prior_weight=cfg["prior_weight"])


def setup_neurons(model_dir: str, subj: Subject, *, cfg: dict, class_dir: str | None = None,
                  dtype: str = "fp32", log: Callable[[str], None] = print,
                  sd: StableDiffusion | None = None) -> NeuronSetup:
    """Loads the model (unless `sd`, a loaded pipeline, is given), encodes subject and class images
    once, precomputes the two prompt encodings."""
    from cones_jax.pipeline import load_pipeline

    sd = sd if sd is not None else load_pipeline(model_dir, dtype=dtype)
    ctx_subject, ctx_prior = prompt_contexts(sd, cfg, subj.class_word, subj.identifier)
    subject = encode_folder(sd, cfg, subj.images)
    fingerprint = sd.unet_fingerprint
    class_dir = class_dir or default_class_dir(fingerprint, cfg, subj.class_word.strip())
    class_images(sd, class_dir, subj.class_word.strip(), cfg, log=log)
    prior = encode_folder(sd, cfg, class_dir)
    paths = search_paths(sd.params["unet"], cfg["search"])
    frozen = {"unet": sd.params["unet"], "ctx_subject": jnp.asarray(ctx_subject), "ctx_prior": jnp.asarray(ctx_prior)}
    return NeuronSetup(cfg, loss_spec(sd, cfg), paths, frozen, subject, prior, fingerprint,
                       unet_shapes(sd.params["unet"]))


@dataclasses.dataclass
class JointSetup:
    """Several subjects' searches as one (Sec. 3.3): the same UNet and searched kernels, every
    subject's batch in each step, the summed loss."""

    setups: list[NeuronSetup]

    def __post_init__(self) -> None:
        first = self.setups[0]
        self.cfg, self.paths, self.fingerprint, self.shapes = first.cfg, first.paths, first.fingerprint, first.shapes
        self.spec = first.spec
        self.frozen = {"unet": first.frozen["unet"],
                       "ctx_subject": jnp.stack([s.frozen["ctx_subject"] for s in self.setups]),
                       "ctx_prior": jnp.stack([s.frozen["ctx_prior"] for s in self.setups])}

    def initial_params(self) -> dict:
        return self.setups[0].initial_params()

    def host_batch(self, step: int) -> dict:
        parts = [s.host_batch(step) for s in self.setups]
        return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}

    def loss_fn(self) -> training.LossFn:
        return lambda params, frozen, batch, rng: joint_concept_loss(self.spec, params, frozen, batch, rng)


def search(setup: NeuronSetup | JointSetup, *, steps: int, checkpointer: training.Checkpointer | None = None,
           resume: bool = False, progress: bool = True, allowed: dict | None = None, mesh: Mesh | None = None,
           log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], list[dict]]:
    """K steps of gradient descent on ξ; returns the scores M_p per tensor and the step metrics."""
    cfg = setup.cfg
    opt = make_optimizer(cfg["rho"], allowed)
    state = training.init_state(setup.initial_params(), opt, cfg["seed"])
    if checkpointer is not None and resume:
        state = checkpointer.resume_state(state, log)
    mesh = mesh if mesh is not None else training.make_mesh(cfg["batch"])
    step_fn = training.make_train_step(setup.loss_fn(), opt, mesh, setup.frozen)
    state = step_fn.put_state(state)
    state, history = training.run_loop(step_fn, state, setup.host_batch, total_steps=steps,
                                       checkpointer=checkpointer, progress=progress, log=log)
    return neuron_scores(jax.device_get(state["params"]["xi_offset"]), cfg["rho"]), history


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How `train_neurons` runs (the flags of `train.py neurons`).

    `overrides` (config key -> value: steps, rho, batch, identifier, checkpoint_every, ...) go on
    top of `config` (default cones1_train). Give `tau` or `sparsity`, not both; neither: the config's.
    """

    config: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tau: float | None = None
    sparsity: float | None = None
    class_dir: str | None = None  # class images; default a per-user cache keyed by model and prompt
    checkpoint_dir: str | None = None
    resume: bool = False
    dtype: str = "fp32"
    overwrite: bool = False
    progress: bool = True
    keep_scores: bool = False  # also write the scores M_p beside each file, for `cut_scores`


def train_neurons(model_dir: str, images_dir: str, class_word: str, out: str, options: SearchOptions | None = None,
                  *, history: list | None = None, log: Callable[[str], None] | None = None,
                  **fields: Any) -> ConceptNeurons:
    """Finds a subject's concept neurons (Alg. A2) from the photos in `images_dir`; writes `out` atomically.

    `fields` replace fields of `options`; `history` (a list) receives the per-step metrics.
    """
    opts = dataclasses.replace(options or SearchOptions(), **fields)
    log = log or (lambda s: print(s, file=sys.stderr))
    _check_out(out, opts.overwrite)
    tau, sparsity = opts.tau, opts.sparsity
    if tau is not None and sparsity is not None:
        raise NeuronsError("give `tau` or `sparsity`, not both")
    class_word = training.check_word(class_word, "class_word")
    cfg, chosen = default_train_config(model_dir, opts.config, opts.overrides)
    tau, sparsity = selection(tau, sparsity, cfg)
    training.check_checkpoint_dir(opts.checkpoint_dir, opts.resume)
    training.check_images(images_dir, cfg["resolution"])
    if opts.class_dir and os.path.isfile(opts.class_dir):
        raise NeuronsError(f"`class_dir` {opts.class_dir} is a file, not a folder")
    if chosen:
        log(chosen)
    subj = Subject(images_dir, class_word, cfg["identifier"])
    setup = setup_neurons(model_dir, subj, cfg=cfg, class_dir=opts.class_dir, dtype=opts.dtype, log=log)
    ckpt = None
    if opts.checkpoint_dir:
        ckpt = training.Checkpointer(opts.checkpoint_dir, every=cfg["checkpoint_every"], keep=cfg["keep_checkpoints"],
                                     metadata={"kind": CHECKPOINT_KIND, "fingerprint": setup.fingerprint,
                                               "class": class_word, "identifier": subj.identifier})
        ckpt.refuse_unless_resuming(opts.resume)
    try:
        scores, hist = search(setup, steps=cfg["steps"], checkpointer=ckpt, resume=opts.resume,
                              progress=opts.progress, log=log)
    finally:
        if ckpt is not None:
            ckpt.close()
    if history is not None:
        history.extend(hist)
    _check_finite(scores, ckpt)
    ns = NeuronScores(scores, (subj.identifier,), (class_word,), setup.fingerprint, search_meta(cfg))
    return write_neurons(ns, cut(ns, tau, sparsity, out), overwrite=opts.overwrite, keep_scores=opts.keep_scores,
                         log=log)


def search_meta(cfg: Mapping[str, Any]) -> dict:
    """What a `.cones` file records of the search that found it (besides τ)."""
    return {"rho": cfg["rho"], "steps": cfg["steps"], "batch": cfg["batch"]}


@dataclasses.dataclass(frozen=True)
class JointOptions:
    """How `finetune_union` runs (the flags of `train.py neurons-joint`); `overrides` as in
    `SearchOptions`. Give `tau` or `keep`, not both."""

    config: str | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tau: float | None = None
    keep: float | None = None  # keep this top fraction of the union by joint score
    class_dirs: Sequence[str] = ()  # one per subject; default the per-user cache
    dtype: str = "fp32"
    overwrite: bool = False
    progress: bool = True


def finetune_union(model_dir: str, neuron_paths: Sequence[str], images_dirs: Sequence[str], out: str,
                   options: JointOptions | None = None, *, history: list | None = None,
                   log: Callable[[str], None] | None = None, **fields: Any) -> ConceptNeurons:
    """Cones, Sec. 3.3: re-runs the search on ξ with the summed loss of all subjects, updating ξ only at
    the union of their concept neurons (an optax mask), and keeps the union's neurons whose joint score
    M_p exceeds τ (default `joint_tau`: those whose shutting lowers the summed loss to first order), or
    the top `keep` fraction of the union by that score. Each subject's class word and identifier come
    from its .cones file; writes `out` atomically."""
    from cones_jax.pipeline import load_pipeline

    opts = dataclasses.replace(options or JointOptions(), **fields)
    tau, keep, class_dirs = opts.tau, opts.keep, list(opts.class_dirs)
    log = log or (lambda s: print(s, file=sys.stderr))
    _check_out(out, opts.overwrite)
    if len(neuron_paths) < 2:
        raise NeuronsError("`neurons` needs the files of at least two subjects")
    if len(images_dirs) != len(neuron_paths):
        raise NeuronsError(f"`images` names {len(images_dirs)} folder(s) for {len(neuron_paths)} `neurons` file(s); "
                           "give one folder of photos per file, in the same order")
    if class_dirs and len(class_dirs) != len(neuron_paths):
        raise NeuronsError(f"`class_images` names {len(class_dirs)} folder(s) for {len(neuron_paths)} subjects")
    if tau is not None and keep is not None:
        raise NeuronsError("give `tau` or `keep`, not both")
    if keep is not None and not 0.0 < keep <= 1.0:
        raise NeuronsError(f"`keep` must be in (0, 1], got {keep}")
    cfg, chosen = default_train_config(model_dir, opts.config, opts.overrides)
    for images in images_dirs:
        training.check_images(images, cfg["resolution"])
    if chosen:
        log(chosen)
    if tau is None and keep is None:
        tau = cfg["joint_tau"]
    sd = load_pipeline(model_dir, dtype=opts.dtype)
    sets = load_for_model(neuron_paths, sd.params["unet"], fingerprint=sd.unet_fingerprint)
    setups = []
    for k, (cn, images) in enumerate(zip(sets, images_dirs)):
        if len(cn.identifiers) != 1:
            raise NeuronsError(f"{cn.path} holds {len(cn.identifiers)} subjects; give single-subject files")
        subj = Subject(images, cn.classes[0], cn.identifiers[0])
        setups.append(setup_neurons(model_dir, subj, cfg=cfg, class_dir=class_dirs[k] if class_dirs else None,
                                    log=log, sd=sd))
    joint = JointSetup(setups)
    shut = union(sets)
    outside = sorted(set(shut) - set(joint.paths))
    if outside:
        raise NeuronsError(f"{outside[0]} holds concept neurons but is not searched by this config's patterns; "
                           "use the config the files were made with (--config)")
    searched = {k: joint.shapes[k] for k in joint.paths}
    allowed = only_at(shut, searched)
    scores, hist = search(joint, steps=cfg["steps"], progress=opts.progress, allowed=allowed, log=log)
    if history is not None:
        history.extend(hist)
    _check_finite(scores, None)
    in_union = {k: v.ravel()[shut[k]] if k in shut else np.zeros(0, v.dtype) for k, v in scores.items()}
    if tau is None:  # --keep: the top fraction of the union, as --sparsity picks it from all searched weights
        tau = -np.inf if keep == 1.0 else tau_for_sparsity(in_union, keep)
    indices = {k: np.asarray(shut[k], np.int64)[in_union[k] > tau] if k in shut else np.zeros(0, np.int64)
               for k in scores}
    if not sum(len(v) for v in indices.values()):
        raise NeuronsError(f"tau {tau:g} keeps none of the union's neurons (the largest joint score is "
                           f"{max(float(v.max()) for v in in_union.values() if v.size):g}); lower --tau or use --keep")
    cn = ConceptNeurons(indices, searched,
                        tuple(c.identifiers[0] for c in sets), tuple(c.classes[0] for c in sets), joint.fingerprint,
                        {"tau": f"{tau:.6g}", "rho": cfg["rho"], "steps": cfg["steps"], "batch": cfg["batch"],
                         "joint_of": ",".join(os.path.basename(p) for p in neuron_paths)}, out)
    _check_out(out, opts.overwrite)
    save_neurons(out, cn)
    log(f"wrote {out}: {cn.count} of the union's {sum(len(v) for v in shut.values())} concept neurons kept "
        f"after {cfg['steps']} joint steps, {os.path.getsize(out) / 1024:.1f} KiB")
    return cn


# --------------------------------------------------------------------------------------------
# Many subjects in one run
# --------------------------------------------------------------------------------------------

MANY_CHECKPOINT_KIND = "cones1_neurons_many"
# Per-subject overrides a many-subject run takes: what changes a subject's prompt, its randomness and
# which neurons are kept, never a shape or the shared step (rho, steps, batch, resolution, search, ...).
SUBJECT_OVERRIDES = ("seed", "identifier", "instance_prompt", "tau", "sparsity")


@dataclasses.dataclass(frozen=True)
class SubjectPlan:
    """One subject of `train_neurons_many`, its overrides applied: its config (seed, identifier,
    prompt) and how its neurons are picked (`tau`, else `sparsity`)."""

    entry: Any  # subjects.SubjectEntry
    cfg: Any
    tau: float | None
    sparsity: float | None

    @property
    def identifier(self) -> str:
        return self.cfg["identifier"].strip()

    @property
    def class_word(self) -> str:
        return self.entry.word.strip()


def selection(tau: float | None, sparsity: float | None, cfg: Mapping[str, Any], where: str = "",
              name: str = "`sparsity`") -> tuple[float | None, float | None]:
    """How a search's neurons are picked: the given `tau` or `sparsity`, else the config's; a
    sparsity outside (0, 1) is refused, naming it as `name` (`where` names the subject of a
    many-subject run)."""
    if tau is None and sparsity is None:
        tau, sparsity = cfg["tau"], cfg["sparsity"]
    if sparsity is not None and not 0.0 < sparsity < 1.0:
        raise NeuronsError(f"{where}{name} must be in (0, 1), got {sparsity}")
    return tau, sparsity


def subject_plan(cfg: Any, entry: Any, tau: float | None, sparsity: float | None) -> SubjectPlan:
    """`entry`'s config: the run's `cfg` with the subject's overrides (only `SUBJECT_OVERRIDES`; any
    other key is refused, one line naming the subject and the key). A subject's `tau` or `sparsity`
    replaces the run's selection rule; giving both is refused."""
    overrides = dict(entry.overrides)
    bad = [k for k in overrides if k not in SUBJECT_OVERRIDES]
    if bad:
        raise NeuronsError(f"subject {entry.name!r}: override {bad[0]!r} cannot differ between the subjects of one "
                           f"run (it sets a shape or the shared step); per-subject overrides: "
                           f"{', '.join(SUBJECT_OVERRIDES)}; set {bad[0]!r} for the whole run or train the "
                           "subject in a run of its own")
    if overrides.get("tau") is not None and overrides.get("sparsity") is not None:
        raise NeuronsError(f"subject {entry.name!r}: give `tau` or `sparsity`, not both")
    try:
        sub_cfg = cfg.override(overrides, source=f"subject {entry.name!r}:")
    except ValueError as e:
        raise NeuronsError(str(e)) from None
    if overrides.get("tau") is not None:
        tau, sparsity = sub_cfg["tau"], None
    elif overrides.get("sparsity") is not None:
        tau, sparsity = None, sub_cfg["sparsity"]
    tau, sparsity = selection(tau, sparsity, sub_cfg, f"subject {entry.name!r}: ")
    return SubjectPlan(entry, sub_cfg, tau, sparsity)


def class_folder(class_dir: str | None, unet_fingerprint: str, cfg: Mapping[str, Any], class_word: str) -> str:
    """A many-subject run's class images of `class_word`: `class_dir/<class word>` when a folder is
    given (one sub-folder per class word, filled up to num_class_images as needed), else the per-user
    cache of `default_class_dir` that single runs share."""
    if class_dir:
        return os.path.join(class_dir, class_word)
    return default_class_dir(unet_fingerprint, cfg, class_word)


def train_neurons_many(model_dir: str, entries: Sequence[Any], out_dir: str, options: SearchOptions | None = None,
                       *, skip_bad: bool = False, history: list | None = None, scores: list | None = None,
                       log: Callable[[str], None] | None = None, **fields: Any) -> list[ConceptNeurons]:
    """Finds the concept neurons of many subjects (`subjects.SubjectEntry`: name, photo folder, class
    word, overrides) in one run; writes `out_dir/<name>.cones` per subject, each the file
    `train_neurons` writes for that subject alone (same fields and metadata).

    The model loads once; class images are made (or read) once per class word; one jitted step
    (`subjects.SubjectsStep`) runs every subject's search side by side, its ξ one slice of a stack
    sharded over the `subject` mesh axis, the frozen UNet replicated or, with config
    `model_parallel` > 1, split over the `model` axis. A subject's `word` is its class word; its
    identifier is the config's unless its overrides give one. Per-subject overrides are
    `SUBJECT_OVERRIDES` (seed, identifier, instance_prompt, tau, sparsity).

    Every subject is checked before the model loads (photos, words, overrides): a bad one refuses the
    run, unless `skip_bad`, which trains the rest. Subjects whose file exists are skipped unless
    `options.overwrite`. With `options.checkpoint_dir` the stacked state is checkpointed; a resume
    with another list of subjects is refused. `options.class_dir` holds one sub-folder per class word.
    Multi-host: the caller initialises jax.distributed; each process encodes only the photos of the
    subjects its devices train, and only process 0 writes. Returns the subjects' sets, in order (the
    skipped ones left out); `history` receives the per-step metrics (means over the subjects) and
    `scores` each trained subject's scores M_p ({path: array}), in order.
    """
    from cones_jax import subjects
    from cones_jax.pipeline import load_pipeline

    opts = dataclasses.replace(options or SearchOptions(), **fields)
    log = subjects.writer_log(log)
    if opts.tau is not None and opts.sparsity is not None:
        raise NeuronsError("give `tau` or `sparsity`, not both")
    if os.path.isfile(out_dir):
        raise NeuronsError(f"--out-dir {out_dir} is a file; give a folder (one .cones file per subject goes there)")
    if opts.class_dir and os.path.isfile(opts.class_dir):
        raise NeuronsError(f"`class_dir` {opts.class_dir} is a file, not a folder (of one folder per class word)")
    cfg, chosen = default_train_config(model_dir, opts.config, opts.overrides)
    tau, sparsity = selection(opts.tau, opts.sparsity, cfg)
    training.check_checkpoint_dir(opts.checkpoint_dir, opts.resume)
    model = cfg["model_parallel"]
    if model < 1 or jax.device_count() % model:
        raise NeuronsError(f"`model_parallel` {model} must be at least 1 and divide the device count "
                           f"{jax.device_count()}")
    if chosen:
        log(chosen)
    resuming = bool(opts.resume and opts.checkpoint_dir)
    todo = subjects.pending_subjects(entries, out_dir, ".cones", overwrite=opts.overwrite, log=log, resuming=resuming)
    if not todo:
        log(f"every subject's .cones file is already in {out_dir}; nothing to do")
        return []

    tok = load_pipeline(model_dir, components=("tokenizer",)).tokenizer
    plans: dict[str, SubjectPlan] = {}

    def check_one(entry: Any) -> None:
        plan = subject_plan(cfg, entry, tau, sparsity)
        training.check_word(entry.word, "word")
        check_prompts(tok, plan.cfg, plan.class_word, plan.identifier)
        plans[entry.name] = plan

    def check_photos(entry: Any) -> None:
        training.check_images(entry.images, cfg["resolution"])

    todo = subjects.check_subjects(todo, check_one, skip_bad=skip_bad, log=log, check_photos=check_photos)
    plan_list = [plans[e.name] for e in todo]
    n = len(plan_list)
    log(f"searching the concept neurons of {n} subject(s) in one run")

    sd = load_pipeline(model_dir, dtype=opts.dtype)
    fingerprint = sd.unet_fingerprint
    paths = search_paths(sd.params["unet"], cfg["search"])
    mesh = subjects.make_subject_mesh(n, cfg["batch"], model=model)
    log(f"mesh: {dict(mesh.shape)} over {mesh.size} device(s)")
    per_subject = []
    for p in plan_list:
        ctx_subject, ctx_prior = prompt_contexts(sd, p.cfg, p.class_word, p.identifier)
        per_subject.append({"ctx_subject": np.asarray(ctx_subject), "ctx_prior": np.asarray(ctx_prior)})
    opt = make_optimizer(cfg["rho"])
    stacked = subjects.stack_subjects(per_subject, mesh)
    step_fn = subjects.SubjectsStep(make_loss_fn(loss_spec(sd, cfg)), opt, mesh, {"unet": sd.params["unet"]},
                                    stacked, n)

    # Each process encodes only the photos of the subjects it trains; class latents once per class word.
    local = step_fn.local_subjects
    priors: dict[str, training.LatentCache] = {}
    caches: dict[int, tuple[training.LatentCache, training.LatentCache]] = {}
    for i in local:
        p = plan_list[i]
        if p.class_word not in priors:
            folder = class_folder(opts.class_dir, fingerprint, cfg, p.class_word)
            class_images(sd, folder, p.class_word, cfg, log=log)
            priors[p.class_word] = encode_folder(sd, cfg, folder)
        caches[i] = (encode_folder(sd, cfg, p.entry.images), priors[p.class_word])

    # A process whose devices hold only padding slots (fewer subjects than processes) reads no photos:
    # its rows are zeros of the batch's shape.
    res = cfg["resolution"] or sd.unet.config.sample_size * sd.latent_factor
    zeros = np.zeros((cfg["batch"], res // sd.latent_factor, res // sd.latent_factor, sd.vae.config.latent_channels),
                     np.float32)
    padding = {"mean": zeros, "std": zeros, "prior_mean": zeros, "prior_std": zeros}

    def batches(step: int) -> Callable[[int], dict]:
        return lambda i: search_batch(plan_list[i].cfg, *caches[i], step) if i in caches else padding

    ckpt = None
    if opts.checkpoint_dir:
        ckpt = training.Checkpointer(
            opts.checkpoint_dir, every=cfg["checkpoint_every"], keep=cfg["keep_checkpoints"],
            metadata={"kind": MANY_CHECKPOINT_KIND, "fingerprint": fingerprint,
                      "subjects": [p.entry.name for p in plan_list],
                      "settings": [[p.class_word, p.identifier, p.cfg["seed"]] for p in plan_list]})
        ckpt.refuse_unless_resuming(opts.resume)
    try:
        state = step_fn.init_states({"xi_offset": initial_offsets(sd.params["unet"], paths)}, opt,
                                    [p.cfg["seed"] for p in plan_list])
        if ckpt is not None and opts.resume:
            _check_checkpoint_subjects(ckpt, [p.entry.name for p in plan_list])
            state = ckpt.resume_state(state, log)
        state = step_fn.put_state(state)
        state, hist = training.run_loop(step_fn, state, batches, total_steps=cfg["steps"], checkpointer=ckpt,
                                        progress=opts.progress and subjects.is_writer(), log=log)
    finally:
        if ckpt is not None:
            ckpt.close()
    if history is not None:
        history.extend(hist)
    offsets = step_fn.gather(state["params"]["xi_offset"])
    stopped = set(step_fn.stopped(state))

    out: list[ConceptNeurons] = []
    failed: list[str] = []
    if subjects.is_writer():
        os.makedirs(out_dir, exist_ok=True)
    for i, p in enumerate(plan_list):
        name = p.entry.name
        m_p = neuron_scores({k: v[i] for k, v in offsets.items()}, cfg["rho"])
        if scores is not None:
            scores.append(m_p)
        path = subjects.artifact_path(out_dir, p.entry, ".cones")
        ns = NeuronScores(m_p, (p.identifier,), (p.class_word,), fingerprint, search_meta(cfg))
        try:
            if i in stopped or not all(np.isfinite(v).all() for v in m_p.values()):
                raise DivergedError("its search diverged (non-finite loss or ξ); lower the learning rate (rho)")
            cn = cut(ns, p.tau, p.sparsity, path)
        except (NeuronsError, DivergedError) as e:
            log(f"subject {name!r}: nothing written: {e}")
            failed.append(name)
            continue
        if subjects.is_writer() and not subjects.keep_existing(path, overwrite=opts.overwrite, resuming=resuming):
            write_neurons(ns, cn, overwrite=opts.overwrite, keep_scores=opts.keep_scores, log=log)
        out.append(cn)
    if failed:
        raise NeuronsError(f"{len(failed)} of {n} subject(s) got no .cones file ({', '.join(map(repr, failed))}; each "
                           f"is named above); the other {n - len(failed)} were written")
    return out


def _check_checkpoint_subjects(ckpt: training.Checkpointer, names: list[str]) -> None:
    """One line when the checkpoint holds another list of subjects than this run's (the generic
    metadata check would print both lists whole)."""
    step = ckpt.latest_step()
    if step is None:
        return
    try:
        meta = ckpt.manager.restore(step, args=ckpt._ocp.args.Composite(meta=ckpt._ocp.args.JsonRestore()))["meta"]
    except Exception:  # noqa: BLE001 - a damaged step: `resume_state` sets it aside
        return
    have = meta.get("subjects") if isinstance(meta, dict) else None
    if have is not None and have != names:
        extra = [s for s in have if s not in names]
        missing = [s for s in names if s not in have]
        diff = (f"it lacks {missing[0]!r}" if missing else f"it also holds {extra[0]!r}" if extra
                else "in another order")
        raise CheckpointError(f"checkpoint {ckpt.directory} (step {step}) holds {len(have)} subject(s), this run "
                              f"trains {len(names)} ({diff}); resume with the same subjects, or use another "
                              "--checkpoint-dir")


def _check_out(out: str, overwrite: bool) -> None:
    training.check_output(out, overwrite, ".cones")


def _check_finite(scores: dict[str, np.ndarray], checkpointer: training.Checkpointer | None) -> None:
    """No .cones file from a search whose ξ went non-finite (its scores would pick arbitrary neurons)."""
    if not all(np.isfinite(v).all() for v in scores.values()):
        raise DivergedError("the neuron scores are not finite; nothing written; lower the learning rate (rho); "
                            f"{training.resume_hint(checkpointer) or 'no checkpoint was saved'}")
