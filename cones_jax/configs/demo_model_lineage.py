"""The shipped demo model's lineage: the `cones_jax.demo.base_model` sittings that made it, in order.

    python -m cones_jax.demo.retrain --workdir /tmp/demo_retrain --out /tmp/demo_model

replays them (`cones_jax/demo/retrain.py`). Each sitting is a dict: `name`, and `runs`, the flags of
each `base_model` invocation (option name without `--`, with `_` for `-`; `stop_at` is `--stop-at`)
made in the sitting's own workdir. Every sitting after the first starts `--init-from` the previous
sitting's export. The history, with each sitting's measurements: docs/demo_model_training.md.
Every recipe flag is given, so the lineage does not move when the recipe's defaults
(`demo_base_model.py`) do.
"""

from cones_jax.config import DemoLineageConfig

# The plain recipe of the third run (the first at f = 2), as it then stood.
_PLAIN = dict(scenes=30000, batch=16, lr=4e-4, weighting="clipped_v", single_object_fraction=0.0,
              multi_object_fraction=0.0, scene_sizes="words", timestep_power=0.0, grounding_weight=0.0,
              grounding_pixel_weight=0.0)
# The fourth sitting's options: more high-noise timesteps and more one-object scenes.
_SHAPE = dict(_PLAIN, single_object_fraction=0.625, timestep_power=1.0)
# From the 17 400-step model on: plus the token grounding loss.
_GROUNDED = dict(_SHAPE, grounding_weight=0.05)
# From the 25 000-step model on: fewer one-object scenes, twice the grounding weight.
_MULTI = dict(_GROUNDED, single_object_fraction=0.3, grounding_weight=0.1)


def get_config() -> DemoLineageConfig:
    return DemoLineageConfig(sittings=(
        # Third run, from scratch at f = 2: the VAE, then the UNet to step 2500 of a 3600-step
        # cosine, resumed in the same workdir with the schedule lengthened to 5400 (5400 steps).
        dict(name="third run", runs=(
            dict(_PLAIN, vae_steps=1200, vae_batch=32, steps=3600, stop_at=2500),
            dict(_PLAIN, vae_steps=1200, vae_batch=32, steps=5400),
        )),
        # Fourth sitting: shape is made above t = 0.85 T and shape words were barely read, so draw
        # more high-noise timesteps and more one-object scenes (11 400).
        dict(name="fourth sitting", runs=(dict(_SHAPE, steps=6000),)),
        # Fifth sitting: the same recipe for 6000 more steps of a 7000-step schedule, stopped at its
        # step-6000 checkpoint to leave time for a probe (17 400).
        dict(name="fifth sitting", runs=(dict(_SHAPE, steps=7000, stop_at=6000),)),
        # Grounding probe: words' attention barely sat on their objects, which layout guidance
        # needs; 400 steps with the token grounding loss (17 800).
        dict(name="grounding probe", runs=(dict(_GROUNDED, steps=400),)),
        # The probe continued for 1200 more grounded steps (19 000).
        dict(name="grounding continued", runs=(dict(_GROUNDED, steps=1200),)),
        # Sixth sitting: 6000 grounded steps (25 000).
        dict(name="sixth sitting", runs=(dict(_GROUNDED, steps=6000),)),
        # Seventh sitting: the fidelity gates put the limit in multi-object drawing, so 30% one-object
        # scenes and grounding weight 0.1 (31 000).
        dict(name="seventh sitting", runs=(dict(_MULTI, steps=6000),)),
        # Eighth sitting: the same recipe again (37 000).
        dict(name="eighth sitting", runs=(dict(_MULTI, steps=6000),)),
        # Ninth sitting: 4000 more steps of it, so that a sitting and its shipping fit one working
        # session (41 000).
        dict(name="ninth sitting", runs=(dict(_MULTI, steps=4000),)),
        # Tenth sitting: three and four objects are where the gates fail, so 5 of every 16 scenes
        # come from those of 3 or more objects (45 000).
        dict(name="tenth sitting", runs=(dict(_MULTI, multi_object_fraction=0.3, steps=4000),)),
        # Fourteenth sitting (the eleventh to thirteenth, from the tenth, were not shipped): guided
        # objects overflowed their boxes, so the shape words' pixel grounding loss asks their
        # attention to cover their objects; its export is the shipped model (49 000).
        dict(name="fourteenth sitting", runs=(dict(_MULTI, multi_object_fraction=0.3, grounding_pixel_weight=0.05,
                                                   steps=4000),)),
    ))
