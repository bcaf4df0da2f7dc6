"""Layout files -> validated subject regions -> per-resolution attention maps (Cones 2 layout guidance).

A layout says, for each subject word of the prompt, where in the image it should appear.

  schema    the `Layout` and `Subject` values, `LayoutError`, and the checks of single fields
  parse     our layout file (JSON or YAML; its schema is that module's docstring) and `load_layout`
  official  the official Cones 2 config list
  images    mask and colour-map images
  maps      regions, γ maps, token positions and the per-resolution maps M of Cones 2, Eq. 7
  draw      a layout drawn over an image, attention heat maps, image grids

Import from here: the names below are the package's interface.
"""

from cones_jax.layout.draw import draw_layout, heatmap_overlay, image_grid, subject_heatmaps, to_uint8
from cones_jax.layout.maps import (
                                   LayoutMaps,
                                   attention_maps,
                                   attention_resolutions,
                                   check_prompt_length,
                                   gamma_maps,
                                   layout_maps,
                                   region_masks,
                                   resize_bilinear_aligned,
                                   subject_positions,
                                   token_occurrences,
                                   token_positions,
)
from cones_jax.layout.parse import NEAR_COLOR_DISTANCE, NEAR_COLOR_MIN_PIXELS, load_layout, parse_layout
from cones_jax.layout.schema import DEFAULT_STRENGTH, Layout, LayoutError, LayoutWarning, Subject, parse_color

__all__ = [
    "DEFAULT_STRENGTH", "NEAR_COLOR_DISTANCE", "NEAR_COLOR_MIN_PIXELS", "Layout", "LayoutError", "LayoutMaps",
    "LayoutWarning", "Subject", "attention_maps", "attention_resolutions", "check_prompt_length", "draw_layout",
    "gamma_maps", "heatmap_overlay", "image_grid", "layout_maps", "load_layout", "parse_color", "parse_layout",
    "region_masks", "resize_bilinear_aligned", "subject_heatmaps", "subject_positions", "to_uint8",
    "token_occurrences", "token_positions",
]
