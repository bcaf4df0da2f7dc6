"""Many subjects in one run: the subjects list, a (subject, data, model) mesh, and one jitted step that
trains every subject's state side by side.

Each subject's trainable state (a text encoder and its AdamW state for residuals, ξ for concept
neurons) is one slice of a stacked tree whose leading axis is sharded over the `subject` mesh axis;
each subject's batch is split over `data`; the frozen UNet (and whatever else every subject shares)
is replicated, or sharded over `model` (FSDP-style: XLA gathers each weight where it is used) when it
does not fit on one device. One code path serves 1 CPU, 8 fake CPU devices and a pod: N subjects
need not divide the device count, the stack is padded to a multiple of the subject axis and the
padding slots are masked out of the metrics and never written.

Multi-host: the mesh spans every process's devices; a process builds only the batch rows of the
slots its devices hold (`SubjectsStep.local_subjects`), so it reads and encodes only those
subjects' photos. `gather` brings a per-subject result (a Δ, a score tree) to every process, and
only process 0 writes artifacts (`is_writer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cones_jax import training
from cones_jax.errors import ConesError, ConfigError, DataError

SUBJECT_AXIS = "subject"
DATA_AXIS = training.DATA_AXIS
MODEL_AXIS = "model"
MESH_AXES = (SUBJECT_AXIS, DATA_AXIS, MODEL_AXIS)
# Leaves smaller than this stay whole on every `model` device: splitting a bias or a norm scale saves
# nothing and costs a gather.
MIN_SPLIT_SIZE = 2 ** 14

# --------------------------------------------------------------------------------------------
# The subjects list
# --------------------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True)
class SubjectEntry:
    """One subject of a many-subject run: its artifact's name (the file stem under --out-dir), its
    photo folder, its word, and its own config overrides (on top of the run's)."""

    name: str
    images: str
    word: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def read_subjects(path: str) -> list[SubjectEntry]:
    """The subjects of `path`: a JSON file or a folder of folders.

    JSON: `{"subjects": [{"images": "photos/rex", "word": "rex", "name": "rex", "overrides": {...}}]}`
    (or the bare list); `name` defaults to the word, and relative folders are read from the JSON
    file's folder. A folder of folders: each sub-folder `word` or `word-anything` is one subject,
    named after the folder (so `dog-rex` and `dog-max` both train the word "dog").
    """
    if os.path.isdir(path):
        return _subjects_of_folder(path)
    if not os.path.isfile(path):
        raise DataError(f"subjects file {path!r} does not exist; pass a JSON file or a folder of subject folders")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"subjects file {path} is not valid JSON ({e})") from None
    items = data.get("subjects") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise DataError(f"subjects file {path} must hold a non-empty list of subjects "
                        '(`{"subjects": [{"images": ..., "word": ...}]}`)')
    base = os.path.dirname(os.path.abspath(path))
    entries = []
    for i, item in enumerate(items):
        where = f"subjects file {path}, entry {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where} is not an object with `images` and `word`")
        unknown = sorted(set(item) - {"images", "word", "name", "overrides"})
        if unknown:
            raise DataError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: images, word, name, overrides")
        for key in ("images", "word"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DataError(f"{where} needs a non-empty string `{key}`")
        overrides = item.get("overrides", {})
        if not isinstance(overrides, dict):
            raise DataError(f"{where}: `overrides` must be an object of config keys")
        name = item.get("name", item["word"].strip())
        entries.append(SubjectEntry(_check_name(name, where), os.path.join(base, item["images"]),
                                    item["word"].strip(), dict(overrides)))
    _check_unique(entries, path)
    return entries


def _subjects_of_folder(folder: str) -> list[SubjectEntry]:
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))
    if not names:
        raise DataError(f"subjects folder {folder} holds no sub-folders; make one folder per subject, named "
                        "`word` or `word-anything`, holding its photos")
    entries = [SubjectEntry(_check_name(n, f"subject folder {os.path.join(folder, n)}"), os.path.join(folder, n),
                            n.split("-", 1)[0]) for n in names]
    _check_unique(entries, folder)
    return entries


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"{where}: name {name!r} cannot be a file name; use letters, digits, '.', '_' and '-'")
    return name


def _check_unique(entries: Sequence[SubjectEntry], path: str) -> None:
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise DataError(f"{path} names subject {e.name!r} twice; give each subject its own `name`")
        seen.add(e.name)


def artifact_path(out_dir: str, entry: SubjectEntry, suffix: str) -> str:
    return os.path.join(out_dir, entry.name + suffix)


def pending_subjects(entries: Sequence[SubjectEntry], out_dir: str, suffix: str, *, overwrite: bool,
                     log: Callable[[str], None], resuming: bool = False) -> list[SubjectEntry]:
    """The subjects still to train: one whose artifact exists is skipped unless `overwrite`, so a
    re-run after a crash does only what is left.

    `resuming` (a resumed, checkpointed run) keeps every subject: the checkpoint holds the stack of
    the run's whole list, and a run that stopped while writing its files left some written. Those
    are kept as they are (`keep_existing`), and the others written from the restored state.
    """
    done = [e for e in entries if os.path.exists(artifact_path(out_dir, e, suffix))]
    if done and not overwrite:
        names = f"{', '.join(e.name for e in done[:5])}{', ...' if len(done) > 5 else ''}"
        if resuming:
            log(f"resuming: {len(done)} subject(s) already have their {suffix} file in {out_dir}, kept as they "
                f"are: {names}")
            return list(entries)
        log(f"skipping {len(done)} subject(s) whose {suffix} file already exists in {out_dir} "
            f"(pass --overwrite to retrain them): {names}")
        return [e for e in entries if e not in done]
    return list(entries)


def keep_existing(path: str, *, overwrite: bool, resuming: bool) -> bool:
    """Whether a resumed run leaves `path`, written before it stopped, as it is."""
    return resuming and not overwrite and os.path.exists(path)


def check_subjects(entries: Sequence[SubjectEntry], check_one: Callable[[SubjectEntry], None], *,
                   skip_bad: bool, log: Callable[[str], None],
                   check_photos: Callable[[SubjectEntry], None] | None = None) -> list[SubjectEntry]:
    """Runs `check_one` (which raises a `ConesError`) on every subject before any work starts, and
    `check_photos` (the same, for what reads the photos) on each subject once across all processes.

    Each bad subject is one line naming it. Any bad subject refuses the whole run, unless
    `skip_bad`, which drops them and goes on with the rest. Every process reaches the same verdict.
    """
    why: dict[int, str] = {}
    for i, e in enumerate(entries):
        try:
            check_one(e)
        except ConesError as err:
            why[i] = str(err)
    if check_photos is not None:
        why.update(_shared_checks(entries, check_photos, skip=set(why)))
    bad = [(entries[i], why[i]) for i in sorted(why)]
    good = [e for i, e in enumerate(entries) if i not in why]
    for e, reason in bad:
        log(f"{'skipping' if skip_bad else 'bad'} subject {e.name!r} ({e.images}): {reason}")
    if bad and not skip_bad:
        raise DataError(f"{len(bad)} of {len(entries)} subject(s) are bad ({', '.join(repr(e.name) for e, _ in bad)}; "
                        "each is named above); fix them or pass --skip-bad-subjects to train the rest")
    if not good:
        raise DataError(f"no subject of {len(entries)} is usable; fix the subjects named above")
    return good


_REASON_BYTES = 512  # a check's one-line reason, as shared between processes


def _shared_checks(entries: Sequence[SubjectEntry], check: Callable[[SubjectEntry], None],
                   skip: set[int]) -> dict[int, str]:
    """`check` on each subject (but those in `skip`) by one process only, subject i by process
    i mod P, so that no host decodes every photo of a pod-sized list; the reasons are then
    all-gathered, so every process drops the same subjects."""
    procs, me = jax.process_count(), jax.process_index()
    reasons = np.zeros((len(entries), _REASON_BYTES), np.uint8)
    for i, e in enumerate(entries):
        if i % procs != me or i in skip:
            continue
        try:
            check(e)
        except ConesError as err:
            raw = str(err).encode()[:_REASON_BYTES - 1] or b"?"
            reasons[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    if procs > 1:
        from jax.experimental import multihost_utils

        reasons = np.asarray(multihost_utils.process_allgather(reasons)).max(axis=0)
    return {i: bytes(r[r > 0]).decode(errors="replace") for i, r in enumerate(reasons) if r.any()}


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def mesh_shape(num_subjects: int, batch: int, num_devices: int, model: int = 1) -> tuple[int, int, int]:
    """(subject, data, model) sizes over all `num_devices`.

    `model` devices hold one copy of the frozen weights between them. Of the rest, the split that
    gives each device the least work (subjects per device × batch rows per device) wins, more
    subjects per axis on a tie: subjects never talk to each other, data shards all-reduce gradients.
    """
    if model < 1 or num_devices % model:
        raise ConfigError(f"model_parallel {model} must divide the device count {num_devices}")
    rest = num_devices // model
    best = None
    for data in range(1, rest + 1):
        if rest % data or batch % data:
            continue
        subject = rest // data
        work = -(-num_subjects // subject) * (batch // data)
        key = (work, data)
        if best is None or key < best[0]:
            best = (key, (subject, data, model))
    return best[1]


def make_subject_mesh(num_subjects: int, batch: int, *, model: int = 1,
                      devices: Sequence[Any] | None = None) -> Mesh:
    """The (subject, data, model) mesh over every device of every process.

    Devices come in process order, so the inner axes (model, data) stay within a host where they can
    and each process holds whole subjects: it then reads only those subjects' photos.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(num_subjects, batch, len(devices), model)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def padded_count(num_subjects: int, mesh: Mesh) -> int:
    """Slots in the stack: the subjects, rounded up to a multiple of the subject axis."""
    n = mesh.shape[SUBJECT_AXIS]
    return -(-num_subjects // n) * n


def slot_of(num_subjects: int, slots: int) -> list[int]:
    """The stack slot of each subject: spread evenly, so that the padding is spread over the devices
    (and hosts) and no host holds only padding while another holds every subject."""
    return [(i * slots) // num_subjects for i in range(num_subjects)]


def local_subjects(mesh: Mesh, num_subjects: int) -> list[int]:
    """The subjects (indices into the run's list) that this process's devices train: the ones whose
    photos it must read. Known from the mesh alone, before anything is stacked."""
    slots = padded_count(num_subjects, mesh)
    subject_at = {s: i for i, s in enumerate(slot_of(num_subjects, slots))}
    idx = NamedSharding(mesh, P(SUBJECT_AXIS)).addressable_devices_indices_map((slots,))
    local = sorted({s for sl in idx.values() for s in range(*sl[0].indices(slots))})
    return [subject_at[s] for s in local if s in subject_at]


def stack_subjects(per_subject_host: Sequence[Any], mesh: Mesh) -> Any:
    """Host trees, one per subject (same structure and shapes), stacked into [slots, ...] in the
    mesh's slot order; padding slots repeat the first subject's values (finite, and masked out).
    What `SubjectsStep` takes as `per_subject`."""
    n = len(per_subject_host)
    slots = padded_count(n, mesh)
    subject_at = {s: i for i, s in enumerate(slot_of(n, slots))}
    order = [per_subject_host[subject_at.get(s, 0)] for s in range(slots)]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *order)


def model_spec(shape: tuple[int, ...], model: int, leading: tuple = ()) -> P:
    """FSDP-style: the largest dimension that `model` divides is split over the model axis (small
    leaves, biases and norms, stay whole)."""
    spec: list = [None] * len(shape)
    if model > 1:
        dims = [i for i in np.argsort(shape)[::-1] if shape[i] % model == 0 and shape[i] >= model]
        if dims and int(np.prod(shape)) >= MIN_SPLIT_SIZE:
            spec[int(dims[0])] = MODEL_AXIS
    return P(*leading, *spec)


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


def subjects_step_fn(loss_fn: training.LossFn, optimizer: optax.GradientTransformation,
                     ema_decay: float = 0.999) -> Callable:
    """The pure step `(state, shared, per_subject, batch, weight_S) -> (state, metrics)` before jit:
    `training.train_step_fn` mapped over the subject axis, so each subject's update is exactly its
    single-subject update. state holds the scalar "step" and, stacked [S, ...], everything else,
    "alive" among it.

    A subject whose loss or parameters turn non-finite is stopped, not the run: its state stays at
    its last finite step and its "alive" flag drops; the others go on. Metrics are the means over
    the live real subjects (padding has weight 0), plus "subjects_alive"; the loss is non-finite,
    and `training.run_loop` stops, only when no subject is left.
    """
    one = training.train_step_fn(loss_fn, optimizer, ema_decay)

    def step(state: dict, shared: Any, per_subject: Any, batch: dict, weight_S: jax.Array) -> tuple[dict, dict]:
        def per(sub_state: dict, sub_frozen: Any, sub_batch: dict) -> tuple[dict, dict]:
            new, metrics = one({**sub_state, "step": state["step"]}, {**shared, **sub_frozen}, sub_batch)
            return {k: v for k, v in new.items() if k != "step"}, metrics

        stacked = {k: v for k, v in state.items() if k not in ("step", "alive")}
        new, metrics_S = jax.vmap(per)(stacked, per_subject, batch)
        alive_S = state["alive"] & metrics_S["params_finite"] & jnp.isfinite(metrics_S["loss"])
        keep = lambda n, o: jnp.where(alive_S.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
        new = jax.tree.map(keep, new, stacked)
        w_S = weight_S * alive_S
        metrics = {k: jnp.sum(jnp.where(alive_S, w_S * v.astype(jnp.float32), 0.0)) / jnp.sum(w_S)
                   for k, v in metrics_S.items() if k != "params_finite"}
        metrics["params_finite"] = jnp.bool_(True)  # a subject that is not is stopped above
        metrics["loss_max"] = jnp.max(jnp.where(w_S > 0, metrics_S["loss"], -jnp.inf))
        metrics["subjects_alive"] = jnp.sum(w_S)
        return {**new, "alive": alive_S, "step": state["step"] + 1}, metrics

    return step


class SubjectsStep:
    """The jitted many-subject step, with the same interface as `training.TrainStep` (so
    `training.run_loop` drives it): `put_state`, `put_batch`, `compile`, `flops`, `__call__`.

    `shared` is every subject's frozen input (the UNet params); `per_subject` is a tree stacked
    [slots, ...] (a prompt's ids, its preservation targets). `batches(step)` for the loop returns a
    function `subject index -> host batch dict`, called only for the subjects this process holds.
    """

    def __init__(self, loss_fn: training.LossFn, optimizer: optax.GradientTransformation, mesh: Mesh,
                 shared: Any, per_subject: Any, num_subjects: int, *, ema_decay: float = 0.999) -> None:
        self.mesh = mesh
        self.num_subjects = num_subjects
        self.slots = padded_count(num_subjects, mesh)
        self.slot_of = slot_of(num_subjects, self.slots)
        self.subject_at = {s: i for i, s in enumerate(self.slot_of)}
        model = mesh.shape[MODEL_AXIS]
        self.shared_sharding = jax.tree.map(lambda x: NamedSharding(mesh, model_spec(np.shape(x), model)), shared)
        self.frozen = jax.device_put(shared, self.shared_sharding)
        self.per_subject = self.put_subjects(per_subject)
        weight = np.zeros(self.slots, np.float32)
        weight[self.slot_of] = 1.0
        self.weight = jax.device_put(weight, self.subject_sharding())
        self._fn = subjects_step_fn(loss_fn, optimizer, ema_decay)
        self._compiled = None
        self.compile_seconds = 0.0

    # -- shardings ------------------------------------------------------------------------------

    def subject_sharding(self, ndim: int = 1) -> NamedSharding:
        return NamedSharding(self.mesh, P(SUBJECT_AXIS, *([None] * (ndim - 1))))

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, P(SUBJECT_AXIS, DATA_AXIS, *([None] * (ndim - 2))))

    def state_sharding(self, state: dict) -> dict:
        """Each slot's state on its subject's devices, whole on each of them. Not split over `model`:
        with the trained encoder's kernels split too, its gradients came out wrong (a larger norm)
        on jax 0.10.2's CPU backend, where the frozen UNet's split (`shared_sharding`) is exact."""
        rep = NamedSharding(self.mesh, P())
        return {k: (rep if k == "step" else jax.tree.map(lambda x: self.subject_sharding(np.ndim(x)), v))
                for k, v in state.items()}

    @property
    def local_subjects(self) -> list[int]:
        """The subjects (indices into the run's list) whose photos this process must read."""
        return local_subjects(self.mesh, self.num_subjects)

    # -- placing data ---------------------------------------------------------------------------

    def put_subjects(self, stacked: Any) -> Any:
        """A host tree stacked [slots, ...] onto the mesh, each slot on the devices that train it."""
        return jax.tree.map(lambda x: self._from_host(np.asarray(x), self.subject_sharding(np.ndim(x))), stacked)

    def _from_host(self, x: np.ndarray, sharding: NamedSharding) -> jax.Array:
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put_state(self, state: dict) -> dict:
        """A stacked state (from `init_states` or a restored checkpoint) onto the mesh."""
        sharding = self.state_sharding(state)
        if all(isinstance(x, jax.Array) and x.sharding == s
               for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(sharding))):
            return state
        return jax.tree.map(lambda x, s: self._from_host(np.asarray(x), s), state, sharding)

    def init_states(self, params: Any, optimizer: optax.GradientTransformation, seeds: Sequence[int]) -> dict:
        """Every slot's `training.init_state(params, optimizer, seed)`, built on the devices that
        hold it (a pod never materialises S copies of a text encoder on one host)."""
        seed_S = np.zeros(self.slots, np.int32)
        for i, s in enumerate(self.slot_of):
            seed_S[s] = seeds[i]

        def init(p: Any, seeds_S: jax.Array) -> dict:
            states = jax.vmap(lambda seed: training.init_state(p, optimizer, seed))(seeds_S)
            return {**states, "alive": jnp.ones(seeds_S.shape, bool), "step": jnp.zeros((), jnp.int32)}

        shape = jax.eval_shape(init, params, seed_S)
        return jax.jit(init, out_shardings=self.state_sharding(shape))(
            params, self._from_host(seed_S, self.subject_sharding()))

    def put_batch(self, fetch: Callable[[int], dict]) -> dict:
        """The global batch [slots, B, ...] of one step. `fetch(i)` gives subject i's host batch;
        it is called only for the subjects this process holds, once each. Padding slots get zeros."""
        local = self.local_subjects
        cache: dict[int, dict] = {}

        def of(i: int) -> dict:
            if i not in cache:
                cache[i] = fetch(i)
            return cache[i]

        template = of(local[0]) if local else fetch(0)  # a host with only padding still needs shapes
        out = {}
        for key, leaf in template.items():
            leaf = np.asarray(leaf)
            shape = (self.slots,) + leaf.shape

            def rows(idx: tuple, key: str = key, leaf: np.ndarray = leaf) -> np.ndarray:
                slots = range(*idx[0].indices(self.slots))
                return np.stack([of(self.subject_at[s])[key][idx[1:]] if s in self.subject_at
                                 else np.zeros_like(leaf[idx[1:]]) for s in slots])

            out[key] = jax.make_array_from_callback(shape, self.batch_sharding(len(shape)), rows)
        return out

    # -- running --------------------------------------------------------------------------------

    def compile(self, state: dict, batch: dict) -> None:
        t0 = time.perf_counter()
        # Explicit out-shardings: the state stays where it is (donated in place), and the metrics are
        # replicated, so every process reads them.
        out = (self.state_sharding(state), NamedSharding(self.mesh, P()))
        jitted = jax.jit(self._fn, donate_argnums=0, out_shardings=out)
        self._compiled = jitted.lower(state, self.frozen, self.per_subject, batch, self.weight).compile()
        self.compile_seconds = time.perf_counter() - t0

    def flops(self) -> float | None:
        return training.step_flops(self._compiled) if self._compiled is not None else None

    def memory_gib(self) -> dict[str, float] | None:
        return training.step_memory_gib(self._compiled) if self._compiled is not None else None

    def __call__(self, state: dict, batch: dict) -> tuple[dict, dict]:
        if self._compiled is None:
            self.compile(state, batch)
        return self._compiled(state, self.frozen, self.per_subject, batch, self.weight)

    # -- results --------------------------------------------------------------------------------

    def gather(self, tree_S: Any) -> Any:
        """A subject-stacked device tree as host numpy arrays, [num_subjects, ...] in the run's order,
        on every process (an all-gather across hosts)."""
        rep = NamedSharding(self.mesh, P())
        full = jax.jit(lambda t: t, out_shardings=jax.tree.map(lambda _: rep, tree_S))(tree_S)
        return jax.tree.map(lambda x: np.asarray(jax.device_get(x))[self.slot_of], full)

    def stopped(self, state: dict) -> list[int]:
        """The subjects (indices into the run's list) stopped by a non-finite loss or parameter."""
        return [i for i, ok in enumerate(self.gather(state["alive"])) if not ok]

    def map_subjects(self, fn: Callable, *args: Any, shared: Any = None) -> Any:
        """`fn` (a pure function of one subject's slice of each arg) over every slot, on the devices
        that hold it, gathered to every process as [num_subjects, ...]; the jit is cached on `fn`.
        With `shared` (a tree every subject reads whole, e.g. frozen weights), `fn(shared, *slices)`;
        it is replicated over the mesh."""
        if shared is None:
            return self.gather(_vmapped(fn, False)(*args))
        shared = jax.device_put(shared, NamedSharding(self.mesh, P()))
        return self.gather(_vmapped(fn, True)(shared, *args))


_VMAPPED: dict[tuple[Callable, bool], Callable] = {}


def _vmapped(fn: Callable, with_shared: bool) -> Callable:
    key = (fn, with_shared)
    if key not in _VMAPPED:
        if with_shared:
            _VMAPPED[key] = jax.jit(lambda shared, *args: jax.vmap(lambda *a: fn(shared, *a))(*args))
        else:
            _VMAPPED[key] = jax.jit(jax.vmap(fn))
    return _VMAPPED[key]


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def is_writer() -> bool:
    """Only process 0 writes artifacts and logs in a multi-host run."""
    return jax.process_index() == 0


def writer_log(log: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """`log` on process 0; silence on the others (every process runs the same loop)."""
    log = log or (lambda s: print(s, file=sys.stderr))
    return log if is_writer() else (lambda s: None)
