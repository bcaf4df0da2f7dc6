"""Test-wide settings: 8 fake CPU devices (sharding tests), a persistent compilation cache,
strict rank promotion, and session-scoped tiny checkpoints built offline."""

import os

# Must precede the first jax import: sharded code is tested on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("CONES_JAX_TEST_CACHE", os.path.expanduser("~/.cache/cones_jax/jax_tests")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_numpy_rank_promotion", "raise")
