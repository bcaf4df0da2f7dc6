"""What the tokenizer and the safetensors reader cost: ours against the libraries that do the same job.

    python -m benchmarks.dependencies --runs 3

Each case runs in a fresh interpreter, `--runs` times, after `import jax` (as any use of cones_jax
does; jax brings numpy and ml_dtypes): the seconds to import what the case needs, then to load the
demo model's tokenizer folder (or read its text-encoder safetensors file) and do the first
tokenization (or touch every tensor). The table gives the median of each, and what each option adds
to an install of the package's other requirements (`BASE`): the installed megabytes of the
distributions in its dependency closure that `BASE`'s closure lacks. Libraries that are not
installed are reported n/a.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence

from benchmarks.common import format_table, host_description, write_json

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(_ROOT, "examples", "demo_model", "tokenizer")
WEIGHTS = os.path.join(_ROOT, "examples", "demo_model", "text_encoder", "model.safetensors")
PROMPT = "a photo of a red star and a blue moon"
BASE = ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "Pillow", "tqdm", "PyYAML")

# case name -> (import statement, first-use statement, distribution whose closure it needs)
CASES: dict[str, tuple[str, str, str]] = {
    "tokenizer: ours (cones_jax.tokenizer on `tokenizers`)": (
        "from cones_jax.tokenizer import load_tokenizer",
        "load_tokenizer(FOLDER)([PROMPT])", "tokenizers"),
    "tokenizer: transformers.CLIPTokenizerFast": (
        "from transformers import CLIPTokenizerFast",
        "CLIPTokenizerFast.from_pretrained(FOLDER)([PROMPT], padding='max_length', truncation=True)",
        "transformers"),
    "tokenizer: transformers.CLIPTokenizer": (
        "from transformers import CLIPTokenizer",
        "CLIPTokenizer.from_pretrained(FOLDER)([PROMPT], padding='max_length', truncation=True)", "transformers"),
    "safetensors: ours (cones_jax.fileio)": (
        "from cones_jax.fileio import load_safetensors",
        "[t.sum() for t in load_safetensors(WEIGHTS)[0].values()]", "ml-dtypes"),
    "safetensors: safetensors.numpy": (
        "from safetensors.numpy import load_file",
        "[t.sum() for t in load_file(WEIGHTS).values()]", "safetensors"),
}

_CHILD = """
import time
import jax
t0 = time.perf_counter()
{imp}
t1 = time.perf_counter()
FOLDER, WEIGHTS, PROMPT = {folder!r}, {weights!r}, {prompt!r}
{use}
t2 = time.perf_counter()
print("TIMES", t1 - t0, t2 - t1)
"""


def time_case(imp: str, use: str) -> tuple[float, float] | None:
    """(import seconds, first-use seconds) in a fresh interpreter, or None if it cannot import."""
    code = _CHILD.format(imp=imp, use=use, folder=TOKENIZER, weights=WEIGHTS, prompt=PROMPT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=_ROOT)
    line = [x for x in out.stdout.splitlines() if x.startswith("TIMES")]
    if out.returncode != 0 or not line:
        return None
    _, a, b = line[-1].split()
    return float(a), float(b)


def _requirements(dist: md.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        if ";" in req and "extra ==" in req.split(";", 1)[1]:
            continue  # an optional extra, not installed by default
        names.append(re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0])
    return names


def closure(names: Sequence[str]) -> dict[str, md.Distribution] | None:
    """The installed distributions `names` need, themselves included (None if one is not installed)."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        n = todo.pop().lower().replace("_", "-")
        if n in seen:
            continue
        try:
            seen[n] = md.distribution(n)
        except md.PackageNotFoundError:
            if n in (x.lower() for x in names):
                return None
            continue  # a requirement for another platform or Python
        todo.extend(_requirements(seen[n]))
    return seen


def added_mb(name: str) -> tuple[float, list[str]] | None:
    """Installed megabytes of the distributions `name` needs beyond `BASE`'s, and their names."""
    need, base = closure([name]), closure(BASE) or {}
    if need is None:
        return None
    extra = {n: d for n, d in need.items() if n not in base}
    total = 0
    for dist in extra.values():
        for f in dist.files or []:
            path = dist.locate_file(f)
            if os.path.isfile(path):
                total += os.path.getsize(path)
    return total / 1e6, sorted(extra)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    print(f"command: python -m benchmarks.dependencies --runs {args.runs}\n"
          f"date: {datetime.date.today()}; host: {host_description()}; Python {sys.version.split()[0]}")
    rows, result = [], {}
    for case, (imp, use, dist) in CASES.items():
        runs = [time_case(imp, use) for _ in range(args.runs)]
        size = added_mb(dist)
        if any(r is None for r in runs):
            rows.append((case, "n/a", "n/a", "not installed"))
            continue
        imp_s = statistics.median(r[0] for r in runs)
        use_s = statistics.median(r[1] for r in runs)
        mb = "n/a" if size is None else f"{size[0]:.1f} MB ({len(size[1])} distributions)"
        rows.append((case, f"{imp_s:.2f}", f"{use_s:.3f}", mb))
        result[case] = {"import_s": [r[0] for r in runs], "first_use_s": [r[1] for r in runs],
                        "adds_mb": None if size is None else size[0],
                        "adds": None if size is None else size[1]}
    print(format_table(rows, header=("case", "import s (median)", "first use s", "adds to the install")))
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
