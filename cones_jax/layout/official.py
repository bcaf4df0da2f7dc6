"""The official Cones 2 inference config as a layout.

The official inference JSON is a list of entries (the first is used; ``index=`` picks another)::

    [{"prompt": "a mug and a dog on the beach",
      "residual_dict": {"dog": "residuals/dog.pt", "mug": "residuals/mug.pt"},
      "color_context": {"255,192,0": ["mug", 2.5], "255,0,0": ["dog", 2.5]},
      "guidance_steps": 50, "guidance_weight": 0.08, "weight_negative": -1e8,
      "layout": "layouts/layout_example.png",
      "subject_list": [["mug", 2], ["dog", 5]]}]

Each ``color_context`` entry becomes a colour subject, in order; a word named in ``subject_list``
gets its ``residual_dict`` path (as in the official code, other words get no residual). The
hand-typed ``subject_list`` token indices (start token = 0) are kept in `Subject.token_indices` and
checked against the tokenizer (in `subject_positions`, or at load when a tokenizer is passed): an
index that is not the first sub-word of an occurrence of the word is an error naming both indices.
Every ``subject_list`` word needs a colour (a subject without a region cannot be represented).
Our ``negative_prompt`` and ``size`` keys are accepted in an official entry too. The official code
resizes the layout PNG to 768x768 with PIL's default filter; we use NEAREST, to the image size.
"""

from __future__ import annotations

from cones_jax.layout.schema import (
    FieldContext,
    Layout,
    Subject,
    check_keys,
    common_values,
    parse_color,
    read_integer,
    read_number,
    short,
)

_OFFICIAL_KEYS = ("prompt", "residual_dict", "color_context", "guidance_steps", "guidance_weight",
                  "weight_negative", "layout", "subject_list", "negative_prompt", "size")


def parse_official_entry(ctx: FieldContext, obj: dict) -> Layout:
    check_keys(ctx, obj, _OFFICIAL_KEYS, "")
    common = common_values(ctx, obj)
    contexts = obj.get("color_context")
    if not isinstance(contexts, dict) or not contexts:
        raise ctx.err("color_context", f"expected {{\"R,G,B\": [word, strength], ...}} with at least one "
                                       f"entry, got {short(contexts)}")
    residual_dict = obj.get("residual_dict") or {}
    if not isinstance(residual_dict, dict):
        raise ctx.err("residual_dict", f"expected {{word: path}}, got {short(residual_dict)}")
    listed = obj.get("subject_list") or []
    if not isinstance(listed, list):
        raise ctx.err("subject_list", f"expected [[word, token index], ...], got {short(listed)}")
    indices: dict[str, list[int]] = {}
    for k, item in enumerate(listed):
        field = f"subject_list[{k}]"
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ctx.err(field, f"expected [word, token index], got {short(item)}")
        index = read_integer(ctx, item[1], field, minimum=0)
        indices.setdefault(item[0].strip(), []).append(index)
    subjects, fields = [], []
    for key, value in contexts.items():
        field = f"color_context[{key!r}]"
        color = parse_color(key, ctx.prefix + field, ctx.source)
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)):
            raise ctx.err(field, f"expected [word, strength], got {short(value)}")
        word = value[0].strip()
        if not word:
            raise ctx.err(field, f"word {value[0]!r} tokenises to nothing")
        strength = read_number(ctx, value[1], field + " strength")
        residual = None
        if word in indices:
            if word not in residual_dict:
                raise ctx.err("residual_dict", f"has no entry for {word!r}, which subject_list names")
            residual = ctx.path(residual_dict[word], f"residual_dict[{word!r}]")
        subjects.append(Subject(word=word, strength=strength, residual=residual, color=color,
                                token_indices=tuple(indices.get(word, ()))))
        fields.append(ctx.prefix + field)
    words = {sub.word for sub in subjects}
    for k, item in enumerate(listed):
        if item[0].strip() not in words:
            raise ctx.err(f"subject_list[{k}]", f"{item[0]!r} has no colour in color_context; every subject "
                                                "needs a region")
    if obj.get("layout") is None:
        raise ctx.err("layout", "missing; the colour-map image that color_context refers to")
    color_map = ctx.path(obj["layout"], "layout")
    return Layout(subjects=tuple(subjects), color_map_path=color_map, source=ctx.source, format="official",
                  subject_fields=tuple(fields), **common)
