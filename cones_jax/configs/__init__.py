"""The presets: one module per config, each with `get_config()` returning a typed config
(`cones_jax.config`). Load them with `cones_jax.config.load_config(name)`."""
